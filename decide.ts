/**
 * What happens to an event, as pure functions (no I/O, no clock): whether a
 * delivery may run ({@link admit}), what its outcome leads to
 * ({@link decide}), and the result as published ({@link fitResult}). Each
 * row of the README's "what reconcile does decides what is reported" table
 * is a branch here, and a case in `decide_test.ts`.
 *
 * @module
 */
import { backoff, errorName, errorText } from "./_util.ts";
import { PermanentError } from "./errors.ts";
import * as v from "valibot";
import { type DriverResult, DriverResultSchema } from "./types.ts";

/** Subject driver results are published to (stream `pipeline-engine`). */
export const RESULT_SUBJECT = "pipelines.driver.result";

/** The attempt budget and retry delays, from the options. */
export interface AttemptPolicy {
  /** Deliveries of one event before it is reported as failed. */
  maxAttempts: number;
  /** First retry delay, in ms. */
  retryDelay: number;
  /** Cap of the retry delay, in ms. */
  retryMaxDelay: number;
}

/** A delivery, as far as admission is concerned. */
export interface Delivery {
  /** JetStream's delivery count, 1 on first delivery. */
  attempt: number;
  /** The resource type the event came for (its subject's last token). */
  type: string;
  /** Whether this instance handles that resource type. */
  handlesType: boolean;
  /** The event name. */
  event: string;
  /**
   * Who handles the event name: this instance, only another version of the
   * driver sharing the consumer, or no version at all.
   */
  eventHandler: "this" | "other" | "none";
  /**
   * Whether an earlier delivery of the same event is still in progress here:
   * a hung reconcile, or its result still being stored.
   */
  runningHere: boolean;
}

/** What to do with a delivery before reconcile. */
export type Admission =
  | { action: "run" }
  | { action: "skip"; reason: string }
  | { action: "handBack"; delay: number; reason: string }
  | { action: "fail"; result: DriverResult; reason: string };

/** How reconcile ended. */
export type Outcome =
  | { kind: "returned"; value: unknown }
  | { kind: "threw"; error: unknown }
  | { kind: "timedOut"; error: unknown }
  | { kind: "abandoned" };

/** What to do after reconcile. */
export type Decision =
  | { action: "report"; result: DriverResult; then: "ack" | "term"; error?: unknown }
  | { action: "retry"; delay: number; reason: string; error: unknown }
  | { action: "handBack"; reason: string };

/** Name in a failure's `data.error` when an event ran out of deliveries. */
export const ATTEMPTS_EXHAUSTED = "AttemptsExhaustedError";
/** Name in a failure's `data.error` when no instance handles an event. */
export const NOT_HANDLED = "NotHandledError";
/** Name in a failure's `data.error` when the result does not fit the server's `max_payload`. */
export const RESULT_TOO_LARGE = "ResultTooLargeError";
/** Name in a failure's `data.error` when the result cannot be encoded as JSON. */
export const RESULT_NOT_JSON = "ResultEncodingError";

function failure(message: string, data: Record<string, unknown>): DriverResult {
  return { success: false, message, data };
}

/**
 * Whether a delivery may run reconcile. Checked in this order: an event no
 * version handles is skipped; one delivered more than `maxAttempts` times is
 * reported as failed before reconcile runs again; one whose earlier attempt
 * still runs here, or that only another version handles, is handed back
 * (reported as failed on its last attempt).
 */
export function admit(d: Delivery, p: AttemptPolicy, random?: () => number): Admission {
  if (d.handlesType && d.eventHandler === "none") {
    return { action: "skip", reason: `no version of the driver handles event "${d.event}"` };
  }
  if (d.attempt > p.maxAttempts) {
    const message = `gave up after ${d.attempt - 1} deliveries without a result ` +
      `(maxAttempts ${p.maxAttempts}): each failed, was handed back, or its instance was lost`;
    return {
      action: "fail",
      reason: message,
      result: failure(message, { error: ATTEMPTS_EXHAUSTED, attempts: d.attempt - 1 }),
    };
  }
  const delay = backoff(d.attempt, p, random);
  if (d.runningHere) {
    return { action: "handBack", delay, reason: "an earlier attempt is still in progress here" };
  }
  if (!d.handlesType || d.eventHandler === "other") {
    const what = d.handlesType ? `event "${d.event}"` : `resource type "${d.type}"`;
    if (d.attempt >= p.maxAttempts) {
      const message = `no instance that received it handles ${what} ` +
        `(delivered ${d.attempt} times; maxAttempts ${p.maxAttempts})`;
      return {
        action: "fail",
        reason: message,
        result: failure(message, { error: NOT_HANDLED, attempts: d.attempt }),
      };
    }
    return { action: "handBack", delay, reason: `this instance does not handle ${what}` };
  }
  return { action: "run" };
}

/**
 * What an outcome of reconcile leads to, on delivery `attempt`: report a
 * result and acknowledge, retry later without a result, report a failure
 * and terminate, or (shutdown) hand the event back.
 */
export function decide(
  outcome: Outcome,
  attempt: number,
  p: AttemptPolicy,
  random?: () => number,
): Decision {
  switch (outcome.kind) {
    case "abandoned":
      return { action: "handBack", reason: "the driver is shutting down" };
    case "returned": {
      const value = outcome.value;
      if (value === undefined || value === null) {
        return { action: "report", result: { success: true, message: "" }, then: "ack" };
      }
      const parsed = v.safeParse(DriverResultSchema, value);
      if (parsed.success) return { action: "report", result: parsed.output, then: "ack" };
      const issues = parsed.issues.map((i) => `${v.getDotPath(i) || "result"}: ${i.message}`);
      return {
        action: "report",
        then: "term",
        result: failure(`reconcile returned an invalid DriverResult: ${issues.join("; ")}`, {
          error: "PermanentError",
          attempts: attempt,
        }),
      };
    }
    case "threw":
    case "timedOut": {
      const err = outcome.error;
      const permanent = err instanceof PermanentError;
      if (!permanent && attempt < p.maxAttempts) {
        return {
          action: "retry",
          delay: backoff(attempt, p, random),
          reason: errorText(err),
          error: err,
        };
      }
      return {
        action: "report",
        then: "term",
        result: failure(errorText(err), { error: errorName(err), attempts: attempt }),
        error: err,
      };
    }
  }
}

/** What {@link fitResult} needs besides the result. */
export interface ResultFrame {
  /** The driver's name. */
  driver: string;
  /** The run the result belongs to. */
  runId: string;
  /** The Resource as received, as JSON text (spliced into the envelope as is). */
  resourceJson: string;
  /** Largest message the server takes, in bytes (its `max_payload`). */
  maxPayload: number;
  /** The delivery attempt, for the failure's `data.attempts`. */
  attempt: number;
}

/** A result encoded for publishing, or the reason it cannot be. */
export type FittedResult =
  | { ok: true; body: Uint8Array | string; result: DriverResult; replaced?: string }
  | { ok: false; reason: string };

/** Room for the protocol line and the Nats-Msg-Id header. */
const PAYLOAD_SLACK = 1024;
const encoder = new TextEncoder();

/**
 * Encodes `result` in the server's envelope. A result that cannot be encoded
 * as JSON, or does not fit the server's `max_payload`, becomes a failure
 * result that says so (no retry can fix either). Never throws.
 */
export function fitResult(result: DriverResult, frame: ResultFrame): FittedResult {
  const limit = frame.maxPayload - PAYLOAD_SLACK;
  const attempt = (r: DriverResult): { body: Uint8Array | string } | { error: unknown } => {
    try {
      const body = `{"event":"driver.result","run_id":${JSON.stringify(frame.runId)},` +
        `"resource":${frame.resourceJson},"driverresult":${
          JSON.stringify({
            success: r.success,
            message: r.message,
            data: r.data ?? null,
            driver: frame.driver,
          })
        }}`;
      // A UTF-16 unit never takes more than 3 bytes: measure only when it may not fit.
      if (body.length * 3 <= limit) return { body };
      const bytes = encoder.encode(body);
      if (bytes.length <= limit) return { body: bytes };
      return { error: bytes.length };
    } catch (err) {
      return { error: err };
    }
  };
  const first = attempt(result);
  if ("body" in first) return { ok: true, body: first.body, result };
  const replaced = typeof first.error === "number"
    ? failure(
      `the result takes ${first.error} bytes, more than the server's max_payload ` +
        `of ${frame.maxPayload} bytes allows; its data and message were dropped`,
      { error: RESULT_TOO_LARGE, bytes: first.error, maxPayload: frame.maxPayload },
    )
    : failure(
      `reconcile returned data that cannot be encoded as JSON: ${errorText(first.error)}`,
      { error: RESULT_NOT_JSON, attempts: frame.attempt },
    );
  const second = attempt(replaced);
  if ("body" in second) {
    return { ok: true, body: second.body, result: replaced, replaced: replaced.message };
  }
  return {
    ok: false,
    reason: `not even a failure result fits the server's max_payload (${frame.maxPayload} ` +
      `bytes) for this resource`,
  };
}

/**
 * The `Nats-Msg-Id` of a result: equal for every delivery of the same event.
 *
 * @example
 * ```ts
 * import { resultMsgId } from "@conveyor/driver";
 * resultMsgId("builder", "0b7e1c1e-8d4e-4f7a-9a52-4a3b2c1d0e9f", "42");
 * // "driver.result.builder.0b7e1c1e-8d4e-4f7a-9a52-4a3b2c1d0e9f.42"
 * ```
 */
export function resultMsgId(driver: string, runId: string, messageId: string): string {
  return `driver.result.${driver}.${runId}.${messageId}`;
}
