/**
 * One event, top to bottom: decode the delivery, admit it, run `reconcile`,
 * decide what its outcome leads to, then carry that out (publish logs and
 * result, acknowledge, retry later, terminate or hand back), within bounded
 * time and without throwing.
 *
 * @module
 */
import type { Logger } from "@logtape/logtape";
import { headers as natsHeaders, type NatsConnection } from "@nats-io/transport-node";
import { context as otelContext } from "@opentelemetry/api";
import type { JsMsg } from "@nats-io/jetstream";
import * as v from "valibot";
import { backoff, errorText, isRecord, pause, setLongTimeout } from "./_util.ts";
import type { Client } from "./client.ts";
import type { Fleet } from "./consumer.ts";
import {
  admit,
  type AttemptPolicy,
  decide,
  type Decision,
  fitResult,
  type Outcome,
  RESULT_SUBJECT,
  resultMsgId,
} from "./decide.ts";
import { callReconcile, type Driver, type ReconcileContext } from "./driver.ts";
import {
  type InvalidMessageError,
  PublishError,
  ReconcileTimeoutError,
  ShutdownError,
} from "./errors.ts";
import { createRunLog, type RunLog } from "./logger.ts";
import type { PubAcks } from "./pubacks.ts";
import type { EventTelemetry, Telemetry } from "./telemetry.ts";
import {
  type DriverMessage,
  type DriverResult,
  MAX_ID_LENGTH,
  parseDriverMessage,
  type Resource,
  ResourceSchema,
} from "./types.ts";

/** Counters of a running driver, for health checks and metrics. */
export interface DriverStats {
  /** Messages received from the consumer. */
  received: number;
  /** Results published with `success: true`. */
  succeeded: number;
  /** Results published with `success: false` (returned, permanent, or out of attempts). */
  failed: number;
  /** Failed attempts handed back for a later retry. */
  retried: number;
  /** Malformed messages terminated. */
  invalid: number;
  /** Events acknowledged without a reconcile: no version of the driver handles their event name. */
  skipped: number;
  /**
   * Deliveries handed back without a result: on shutdown, after a publish
   * failure, or because this instance does not handle them.
   */
  requeued: number;
  /** Reconciles running now, hung ones included (each holds a concurrency slot). */
  inFlight: number;
  /**
   * Reconciles still running after the runtime gave up on them (timeout or
   * shutdown) because they ignore `ctx.signal`; their events were settled.
   */
  hung: number;
  /** Events pulled ahead, waiting for a slot. */
  queued: number;
  /** Events whose reconcile ended, their logs, result and ack being stored. */
  settling: number;
  /** When the driver started (ms since the epoch): every counter counts from then. */
  startedAt: number;
  /**
   * The latest failure: a failed attempt, a failure result, a malformed
   * message, or logs and result that could not be stored.
   */
  lastError?: { message: string; runId?: string; at: number };
}

/** Records the latest failure in the stats. */
function noteError(deps: EventDeps, message: string, runId?: string): void {
  deps.stats.lastError = { message: message.slice(0, 1_000), runId, at: Date.now() };
}

/** How long a reconcile that was aborted gets to return before the runtime moves on. */
export const ABORT_GRACE_MS = 1_000;
/**
 * The result publish's own timeout per try. Short, so that a publish whose
 * reply was lost with its connection is retried while the stream leader that
 * stored it still leads: a leader restarted since may not know its Nats-Msg-Id.
 */
const PUBLISH_TIMEOUT_MS = 2_000;
/** How long one try to have an ack confirmed waits for the reply. */
const CONFIRM_TIMEOUT_MS = 5_000;

/** What the per-event path needs from the runtime that runs it. */
export interface EventDeps {
  driver: Driver;
  /** The attempt budget and retry delays. */
  policy: AttemptPolicy;
  /** Limit for one reconcile in ms (0 or Infinity: none). */
  reconcileTimeout: number;
  /** How long storing an event's logs and result is retried, in ms. */
  settleTimeout: number;
  nc: NatsConnection;
  /** Publishes that wait for the server's acknowledgement (logs, results, acks). */
  pubacks: PubAcks;
  /** The runtime's own LogTape logger. */
  log: Logger;
  client?: Client;
  stats: DriverStats;
  /** Resource types this instance handles. */
  types: ReadonlySet<string>;
  /** Event names this instance handles; all when undefined. */
  events?: ReadonlySet<string>;
  /** The consumer's current settings, as last read. */
  fleet(): Fleet;
  /** Reads the consumer's settings now (concurrent calls share one read). */
  refreshFleet(): Promise<Fleet>;
  /** Stream sequences whose reconcile runs here now (hung ones included), with a count. */
  running: Map<number, number>;
  /**
   * Stream sequences of deliveries in progress here: admitted, not yet
   * acknowledged, terminated or handed back.
   */
  inProgress: Set<number>;
  /** Acks and terms waiting for the server's confirmation. */
  confirming: Set<Promise<void>>;
  /** Deliveries told "still working" on every heartbeat. */
  working: Set<JsMsg>;
  /** Events whose result is stored and whose ack is not confirmed yet. */
  memory: ResultMemory;
  /** Aborted (reason `ShutdownError`) when a shutdown stops waiting for reconciles. */
  shutdown: AbortSignal;
  /** Aborted when a second signal asks to stop at once: no grace. */
  force: AbortSignal;
  /**
   * Running reconciles to tell when `shutdown` (false) or `force` (true)
   * aborts: one listener per runtime rather than two per event.
   */
  interrupts: Set<(force: boolean) => void>;
  /** Aborted when settling must end: what is not settled is handed back. */
  settleDeadline: AbortSignal;
  /** Spans and metrics. */
  telemetry: Telemetry;
}

/**
 * Events whose result this instance stored and whose acknowledgement the
 * server has not confirmed yet, by stream sequence and result `Nats-Msg-Id`. Should the
 * ack be lost (a node of the cluster dies), the redelivery is acknowledged
 * again rather than reconciled and reported twice: a restarted stream leader
 * may no longer know the id to drop a second result. Bounded in entries and
 * in age; confirmed acks leave it at once.
 */
export class ResultMemory {
  readonly #entries = new Map<string, number>();
  readonly #max: number;
  #ttl: number;
  /** Keeps at most `max` entries, each for `ttl` ms. */
  constructor(max: number, ttl: number) {
    this.#max = max;
    this.#ttl = ttl;
  }
  /** Sets how long entries are kept, in ms. */
  set ttl(ms: number) {
    this.#ttl = ms;
  }
  /** Remembers that the result with this id is stored. */
  add(id: string, now: number = Date.now()): void {
    this.#entries.delete(id);
    this.#entries.set(id, now + this.#ttl);
    if (this.#entries.size > this.#max) {
      this.#entries.delete(this.#entries.keys().next().value!);
    }
  }
  /** Whether the result with this id is known stored (and its ack unconfirmed). */
  has(id: string, now: number = Date.now()): boolean {
    const until = this.#entries.get(id);
    if (until === undefined) return false;
    if (until >= now) return true;
    this.#entries.delete(id);
    return false;
  }
  /** Forgets an id: its ack is confirmed. */
  delete(id: string): void {
    this.#entries.delete(id);
  }
  /** Drops expired entries (oldest first). */
  prune(now: number = Date.now()): void {
    for (const [id, until] of this.#entries) {
      if (until >= now) break;
      this.#entries.delete(id);
    }
  }
  /** Entries held. */
  get size(): number {
    return this.#entries.size;
  }
}

const decoder = new TextDecoder();

/**
 * Handles one delivery until it is settled (acknowledged, terminated or
 * handed back). `onReconciled` is called once the reconcile's outcome is
 * known, before its logs and result are stored, with a promise that settles
 * when the driver's code has really returned (not at all for an event that
 * is not reconciled). Never rejects: an unexpected error hands the event back
 * (counted against its attempts) or, on its last attempt, terminates it.
 */
export async function handleDelivery(
  m: JsMsg,
  deps: EventDeps,
  onReconciled?: (userDone: Promise<void>) => void,
): Promise<void> {
  deps.stats.received++;
  const seq = m.info.streamSequence;
  if (deps.inProgress.has(seq)) {
    // Handed out again while its delivery is still in progress here (a new
    // consumer leader that had not replicated the first delivery): that one's
    // +WPI, ack or nak settles the stream sequence. A nak here would schedule
    // yet another delivery, each counting against maxAttempts.
    deps.log.info("event at stream sequence {seq} delivered again while in progress here", {
      seq,
    });
    return;
  }
  const t = deps.telemetry.begin(m);
  try {
    await handle(m, deps, t, onReconciled);
  } catch (err) {
    // A runtime bug or a lost connection: hand the event back rather than
    // drop it; its delivery count keeps this from looping for ever.
    const attempt = m.info.deliveryCount;
    deps.log.error("event at stream sequence {seq} failed in the runtime: {error}", {
      seq: m.info.streamSequence,
      error: errorText(err),
      cause: err,
    });
    noteError(deps, `runtime error: ${errorText(err)}`);
    deps.working.delete(m);
    const last = attempt >= deps.policy.maxAttempts;
    t.end(last ? "terminated" : "retried", { error: err });
    try {
      if (last) m.term(`runtime error: ${errorText(err)}`.slice(0, 1_000));
      else m.nak(backoff(attempt, deps.policy));
    } catch { /* connection gone: ack_wait redelivers it */ }
    return;
  }
}

async function handle(
  m: JsMsg,
  deps: EventDeps,
  t: EventTelemetry,
  onReconciled: ((userDone: Promise<void>) => void) | undefined,
): Promise<void> {
  const seq = m.info.streamSequence;
  const attempt = m.info.deliveryCount;
  const decoded = decode(m);
  if (!decoded.ok) {
    t.identify({ type: m.subject.slice(m.subject.lastIndexOf(".") + 1) });
    await reject(m, decoded.error, decoded.raw, deps, t);
    return;
  }
  const { message: msg, resourceJson } = decoded;
  const type = typeOf(m.subject, msg.payload);
  t.identify({
    type,
    event: msg.event,
    name: msg.payload.name,
    runId: msg.run_id,
    messageId: msg.id,
  });
  const msgId = resultMsgId(deps.driver.name, msg.run_id, msg.id);
  if (deps.memory.has(memoryKey(seq, msgId))) {
    // Its result is stored; the ack was lost. Acknowledge, do not rerun.
    deps.log.info("run {runId}: its result is already stored; acknowledging again", {
      runId: msg.run_id,
    });
    settleConfirmed(m, "+ACK", msgId, deps);
    t.end("skipped");
    return;
  }
  let handler = eventHandler(msg.event, deps.events, deps.fleet());
  if (handler === "none") {
    // Skipping is final: make sure no version that started a moment ago
    // handles this event before acknowledging it unprocessed.
    handler = eventHandler(msg.event, deps.events, await deps.refreshFleet());
  }
  const admission = admit({
    attempt,
    type,
    handlesType: deps.types.has(type),
    event: msg.event,
    eventHandler: handler,
    // A reconcile that ignored its signal still runs here: do not run beside it.
    runningHere: deps.running.has(seq),
  }, deps.policy);
  switch (admission.action) {
    case "skip":
      deps.stats.skipped++;
      deps.log.debug("run {runId}: skipped: {reason}", {
        runId: msg.run_id,
        reason: admission.reason,
      });
      m.ack();
      t.end("skipped");
      return;
    case "handBack":
      deps.stats.requeued++;
      deps.log.info("run {runId}: handed back for {delay} ms: {reason}", {
        runId: msg.run_id,
        delay: admission.delay,
        reason: admission.reason,
      });
      m.nak(admission.delay);
      t.end("handed_back");
      return;
    case "fail":
      deps.log.error("run {runId}: failed before reconcile: {reason}", {
        runId: msg.run_id,
        reason: admission.reason,
      });
      deps.inProgress.add(seq);
      try {
        await carryOut(
          m,
          msg,
          resourceJson,
          msgId,
          { action: "report", result: admission.result, then: "term" },
          undefined,
          deps,
          t,
        );
      } finally {
        deps.inProgress.delete(seq);
      }
      return;
    case "run":
      break;
  }

  deps.inProgress.add(seq);
  deps.working.add(m);
  try {
    const run = createRunLog({
      nc: deps.nc,
      js: deps.pubacks,
      driver: deps.driver.name,
      runId: msg.run_id,
      pipeline: msg.payload.pipeline || undefined,
      attempts: Infinity,
      headers: t.headers(),
      onLate: (line) =>
        deps.log.warn(
          "run {runId}: lines logged after reconcile returned are not stored (first: {line})",
          { runId: msg.run_id, line: line.slice(0, 200) },
        ),
    });
    t.logs(run);
    const began = performance.now();
    const { outcome, userDone } = reconcile(m, msg, run, deps, t);
    const ended = await outcome;
    t.reconciled(performance.now() - began);
    onReconciled?.(userDone);
    run.seal();
    const decision = decide(ended, attempt, deps.policy);
    await carryOut(m, msg, resourceJson, msgId, decision, run, deps, t);
  } finally {
    deps.inProgress.delete(seq);
  }
}

/** Type of the event's resource: its subject's last token (what the filter matched). */
function typeOf(subject: string, resource: Resource): string {
  const dot = subject.lastIndexOf(".");
  return subject.startsWith("resources.") || subject.startsWith("drivers.")
    ? subject.slice(dot + 1)
    : resource.resource;
}

function eventHandler(
  event: string,
  mine: ReadonlySet<string> | undefined,
  fleet: Fleet,
): "this" | "other" | "none" {
  if (!mine || mine.has(event)) return "this";
  return fleet.events === "*" || fleet.events.has(event) ? "other" : "none";
}

type Decoded =
  | { ok: true; message: DriverMessage; resourceJson: string }
  | { ok: false; error: InvalidMessageError; raw: unknown };

function decode(m: JsMsg): Decoded {
  let raw: unknown;
  try {
    raw = JSON.parse(decoder.decode(m.data));
  } catch {
    // parseDriverMessage below reports it with the parser's words.
  }
  try {
    const message = parseDriverMessage(raw ?? m.data, m.subject);
    return { ok: true, message, resourceJson: resourceJsonOf(raw, message.payload) };
  } catch (err) {
    return { ok: false, error: err as InvalidMessageError, raw };
  }
}

/**
 * The Resource as received, as JSON: the server's payload string as is
 * (nothing to re-encode, and it cannot fail on deep nesting), else the
 * object encoded; should that fail, the resource without its spec.
 */
function resourceJsonOf(raw: unknown, resource: Resource): string {
  if (isRecord(raw) && typeof raw.payload === "string") return raw.payload;
  try {
    return JSON.stringify(resource);
  } catch {
    const { spec: _spec, ...rest } = resource;
    try {
      return JSON.stringify({ ...rest, spec: null });
    } catch {
      return JSON.stringify({
        id: resource.id,
        name: resource.name,
        resource: resource.resource,
        metadata: {},
        spec: null,
      });
    }
  }
}

/** Runs the driver's reconcile with its deadline; see {@link handle}. */
function reconcile(
  m: JsMsg,
  msg: DriverMessage,
  run: RunLog,
  deps: EventDeps,
  t: EventTelemetry,
): { outcome: Promise<Outcome>; userDone: Promise<void> } {
  const seq = m.info.streamSequence;
  // ctx.signal is made when first read: many reconciles never look at it,
  // and an AbortController was a few per cent of the CPU per event on Node.
  let ac: AbortController | undefined;
  let aborted = false;
  let abortReason: unknown;
  const signalOf = (): AbortSignal => {
    if (!ac) {
      ac = new AbortController();
      if (aborted) ac.abort(abortReason);
    }
    return ac.signal;
  };
  let settle!: (o: Outcome) => void;
  let ended = false;
  const outcome = new Promise<Outcome>((resolve) => {
    settle = (o) => {
      if (ended) return;
      ended = true;
      resolve(o);
    };
  });

  let grace: ReturnType<typeof setLongTimeout> | undefined;
  const giveUp = (reason: unknown) => {
    if (aborted) return;
    aborted = true;
    abortReason = reason;
    ac?.abort(reason);
    const abandoned = (): Outcome =>
      reason instanceof ReconcileTimeoutError
        ? { kind: "timedOut", error: reason }
        : { kind: "abandoned" };
    // A cooperative reconcile gets a moment to return; then the runtime
    // settles the event and the code, if it keeps running, is hung.
    if (deps.force.aborted) settle(abandoned());
    else grace = setLongTimeout(() => settle(abandoned()), ABORT_GRACE_MS);
  };
  const onShutdown = () => giveUp(deps.shutdown.reason ?? new ShutdownError());
  const onForce = () => {
    giveUp(new ShutdownError());
    settle({ kind: "abandoned" });
  };
  const interrupt = (force: boolean) => force ? onForce() : onShutdown();
  if (deps.shutdown.aborted) queueMicrotask(onShutdown);
  deps.interrupts.add(interrupt);
  const limit = deps.reconcileTimeout;
  const timer = limit > 0 && limit !== Infinity
    ? setLongTimeout(() => giveUp(new ReconcileTimeoutError(limit)), limit)
    : undefined;

  deps.running.set(seq, (deps.running.get(seq) ?? 0) + 1);
  deps.stats.inFlight++;
  const ctx: ReconcileContext = {
    resource: msg.payload,
    message: msg,
    event: msg.event,
    runId: msg.run_id,
    logger: run.logger,
    get signal() {
      return signalOf();
    },
    attempt: m.info.deliveryCount,
    client: deps.client,
    traceContext: t.context,
  };
  // The span is the active context around reconcile: spans the driver starts
  // (and the API client's requests) join its trace when a context manager is set.
  const user = new Promise((resolve) =>
    resolve(otelContext.with(t.context, callReconcile, undefined, deps.driver, ctx))
  );
  let finished = false;
  let hung = false;
  const userDone = user.then(
    (value) => {
      finished = true;
      settle({ kind: "returned", value });
    },
    (error) => {
      finished = true;
      const reason = aborted ? abortReason : undefined;
      settle(
        reason === undefined
          ? { kind: "threw", error }
          : reason instanceof ReconcileTimeoutError
          ? { kind: "timedOut", error: reason }
          : { kind: "abandoned" },
      );
    },
  ).finally(() => {
    const n = deps.running.get(seq)! - 1;
    if (n === 0) deps.running.delete(seq);
    else deps.running.set(seq, n);
    deps.stats.inFlight--;
    if (hung) deps.stats.hung--;
  });

  outcome.then(() => {
    timer?.clear();
    grace?.clear();
    deps.interrupts.delete(interrupt);
    if (finished) return;
    // Still running after the runtime gave up on it: it keeps its slot.
    hung = true;
    deps.stats.hung++;
    deps.log.warn(
      "run {runId}: reconcile ignores ctx.signal and still runs; it keeps its slot until it returns",
      { runId: msg.run_id },
    );
  });
  return { outcome, userDone };
}

/** Carries out a decision: logs, result, then ack, nak or term. Never throws. */
async function carryOut(
  m: JsMsg,
  msg: DriverMessage,
  resourceJson: string,
  msgId: string,
  decision: Decision,
  run: RunLog | undefined,
  deps: EventDeps,
  t: EventTelemetry,
): Promise<void> {
  const attempt = m.info.deliveryCount;
  const deadline = Date.now() + deps.settleTimeout;
  try {
    if (decision.action === "retry" || decision.action === "handBack") {
      // The logs of a failed or interrupted attempt are kept, best effort.
      await run?.flush({ signal: deps.settleDeadline, deadline: Date.now() + 10_000 })
        .catch(() => {});
      if (decision.action === "retry") {
        deps.stats.retried++;
        noteError(deps, decision.reason, msg.run_id);
        deps.log.warn(
          "run {runId}: attempt {attempt}/{max} failed, retrying in {delay} ms: {error}",
          {
            runId: msg.run_id,
            attempt,
            max: deps.policy.maxAttempts,
            delay: decision.delay,
            error: decision.reason,
            cause: decision.error,
          },
        );
        m.nak(decision.delay);
        t.end("retried", { error: decision.error, message: decision.reason });
      } else {
        deps.stats.requeued++;
        deps.log.info("run {runId}: handed back to the stream: {reason}", {
          runId: msg.run_id,
          reason: decision.reason,
        });
        m.nak();
        t.end("handed_back");
      }
      return;
    }

    const fitted = fitResult(decision.result, {
      driver: deps.driver.name,
      runId: msg.run_id,
      resourceJson,
      maxPayload: deps.nc.info?.max_payload ?? 1024 * 1024,
      attempt,
    });
    if (!fitted.ok) {
      deps.stats.failed++;
      noteError(deps, fitted.reason, msg.run_id);
      deps.log.error("run {runId}: terminated without a result: {reason}", {
        runId: msg.run_id,
        reason: fitted.reason,
      });
      m.term(fitted.reason.slice(0, 1_000));
      t.end("terminated", { message: fitted.reason });
      return;
    }
    const result = fitted.result;
    const then = fitted.replaced ? "term" : decision.then;
    if (fitted.replaced) {
      deps.log.error("run {runId}: {error}", { runId: msg.run_id, error: fitted.replaced });
    } else if (!result.success && then === "term") {
      deps.log.error("run {runId}: failed after {attempt} attempt(s): {error}", {
        runId: msg.run_id,
        attempt,
        error: result.message,
      });
    }
    try {
      await run?.flush({ signal: deps.settleDeadline, deadline });
      await publishResult(fitted.body, msgId, deps, deadline, t);
    } catch (err) {
      // Nothing was reported: let the event come back and try again.
      deps.stats.requeued++;
      noteError(deps, `cannot store the logs or result: ${errorText(err)}`, msg.run_id);
      deps.log.error(
        "run {runId}: cannot store the logs or result, the event will be redelivered: {error}",
        { runId: msg.run_id, error: errorText(err) },
      );
      m.nak(deps.settleDeadline.aborted ? undefined : backoff(attempt, deps.policy));
      t.end("handed_back", { error: err });
      return;
    }
    if (result.success) deps.stats.succeeded++;
    else {
      deps.stats.failed++;
      noteError(deps, result.message, msg.run_id);
    }
    settleConfirmed(
      m,
      then === "ack" ? "+ACK" : `+TERM ${`failed: ${result.message}`.slice(0, 1_000)}`,
      msgId,
      deps,
    );
    if (result.success) t.end("succeeded");
    else t.end("failed", { error: failureError(decision), message: result.message });
  } finally {
    deps.working.delete(m);
  }
}

/**
 * What the result memory is keyed by: a redelivery of the same stream
 * message (its ack lost) with the same result id. Another message carrying
 * the same event (published twice) is reconciled again, its result then
 * dropped by the duplicate window; and a recreated stream that reuses
 * sequences does not match.
 */
function memoryKey(seq: number, msgId: string): string {
  return `${seq} ${msgId}`;
}

/**
 * Acknowledges (or terminates) an event whose result is stored, and has the
 * server confirm it, as `JsMsg.ackAck()` does: a replicated consumer replies
 * only once the ack is committed through raft, so no reply means the ack may
 * be lost (its node killed, the consumer leader moved) and the event would
 * come back after `ack_wait`. Until confirmed, the result's id stays in the
 * memory (a redelivery is acknowledged, not rerun) and the ack is sent again
 * in the background (a repeated ack is harmless) until `ack_wait` has passed.
 * By hand because `ackAck()` sends nothing the second time and cannot carry
 * `+TERM`. The slot does not wait for it; a shutdown does, within its bound.
 */
function settleConfirmed(
  m: JsMsg,
  payload: "+ACK" | `+TERM ${string}`,
  msgId: string,
  deps: EventDeps,
): void {
  // JsMsg does not declare `reply` (the ack subject); every delivery has one.
  const reply = (m as unknown as { reply?: string }).reply;
  if (!reply) {
    if (payload === "+ACK") m.ack();
    else m.term(payload.slice("+TERM ".length));
    return;
  }
  const key = memoryKey(m.info.streamSequence, msgId);
  deps.memory.add(key);
  const until = Date.now() + deps.fleet().ackWaitMs;
  const confirming = (async () => {
    for (let i = 0;; i++) {
      try {
        await deps.pubacks.publish(reply, payload, { timeout: CONFIRM_TIMEOUT_MS });
        deps.memory.delete(key);
        return;
      } catch { /* no reply: lost, or not committed yet */ }
      if (deps.nc.isClosed() || Date.now() > until || deps.settleDeadline.aborted) return;
      await pause(Math.min(5_000, 250 * 2 ** i), deps.settleDeadline);
    }
  })();
  deps.confirming.add(confirming);
  void confirming.finally(() => deps.confirming.delete(confirming));
}

/**
 * Publishes an encoded result, retrying with the same Nats-Msg-Id (JetStream
 * stores it once) until it is stored, `deadline` passes or the settle
 * deadline aborts.
 */
async function publishResult(
  body: Uint8Array | string,
  msgID: string,
  deps: EventDeps,
  deadline: number,
  t: EventTelemetry,
): Promise<void> {
  let last: unknown;
  const trace = t.headers();
  for (let i = 0;; i++) {
    let headers;
    if (trace) {
      headers = natsHeaders();
      for (const k in trace) headers.set(k, trace[k]);
    }
    try {
      await deps.pubacks.publish(RESULT_SUBJECT, body, {
        msgID,
        timeout: PUBLISH_TIMEOUT_MS,
        headers,
      });
      return;
    } catch (err) {
      last = err;
    }
    if (deps.settleDeadline.aborted || Date.now() >= deadline) break;
    await pause(Math.min(5_000, 100 * 2 ** i), deps.settleDeadline);
    if (deps.settleDeadline.aborted) break;
  }
  throw new PublishError(RESULT_SUBJECT, { cause: last });
}

/** Terminates a message that can never be processed, reporting it where possible. */
async function reject(
  m: JsMsg,
  error: InvalidMessageError,
  raw: unknown,
  deps: EventDeps,
  t: EventTelemetry,
): Promise<void> {
  deps.stats.invalid++;
  noteError(deps, error.message);
  const attempt = m.info.deliveryCount;
  deps.log.error("terminating message {seq} on {subject}: {error}", {
    seq: m.info.streamSequence,
    subject: m.subject,
    error: error.message,
    issues: error.issues,
  });
  const runId = isRecord(raw) && typeof raw.run_id === "string" &&
      v.is(v.pipe(v.string(), v.uuid()), raw.run_id)
    ? raw.run_id
    : undefined;
  const resource = isRecord(raw) ? readResource(raw.payload) : undefined;
  if (runId && resource) {
    // An id unfit for a header (the reason it may be invalid) is replaced by
    // the stream sequence: still the same for every delivery.
    // deno-lint-ignore no-control-regex
    const id = isRecord(raw) && typeof raw.id === "string" && /^[^\x00-\x1f\x7f]+$/.test(raw.id) &&
        raw.id.length <= MAX_ID_LENGTH
      ? raw.id
      : `seq-${m.info.streamSequence}`;
    const result: DriverResult = {
      success: false,
      message: error.message,
      data: { error: error.name, issues: error.issues },
    };
    const fitted = fitResult(result, {
      driver: deps.driver.name,
      runId,
      resourceJson: resource.json,
      maxPayload: deps.nc.info?.max_payload ?? 1024 * 1024,
      attempt,
    });
    if (fitted.ok) {
      try {
        await publishResult(
          fitted.body,
          resultMsgId(deps.driver.name, runId, id),
          deps,
          Date.now() + 10_000,
          t,
        );
        deps.stats.failed++;
      } catch (err) {
        if (attempt < deps.policy.maxAttempts) {
          deps.log.error("cannot report the invalid message of run {runId}, retrying: {error}", {
            runId,
            error: errorText(err),
          });
          m.nak(backoff(attempt, deps.policy));
          t.end("retried", { error: err });
          return;
        }
        deps.log.error("cannot report the invalid message of run {runId}: {error}", {
          runId,
          error: errorText(err),
        });
      }
    }
  }
  m.term(error.message.slice(0, 1_000));
  t.end("terminated", { error });
}

/** The error behind a failure result, for its span: what reconcile threw, if anything. */
function failureError(decision: Decision): unknown {
  return decision.action === "report" ? decision.error : undefined;
}

function readResource(payload: unknown): { json: string } | undefined {
  let value = payload;
  if (typeof value === "string") {
    try {
      value = JSON.parse(value);
    } catch {
      return undefined;
    }
  }
  const r = v.safeParse(ResourceSchema, value);
  if (!r.success) return undefined;
  return { json: resourceJsonOf({ payload }, r.output) };
}
