/**
 * The driver author's testing kit, re-exported by `@conveyor/driver/testing`:
 * {@link reconcileOnce} runs a driver's `reconcile` without NATS under the
 * runtime's own rules; {@link startTestConveyor} gives a throw-away NATS set
 * up as the Conveyor server sets it up, to run a driver for real.
 *
 * @module
 */
import type { NatsConnection } from "@nats-io/transport-node";
import { openNats } from "./_nats.ts";
import { jetstreamManager } from "@nats-io/jetstream";
import type { Client } from "./client.ts";
import { admit, decide, fitResult, type Outcome, RESULT_SUBJECT } from "./decide.ts";
import { callReconcile, type Driver, type ReconcileContext } from "./driver.ts";
import { ReconcileTimeoutError } from "./errors.ts";
import type { DriverLogger, Labels, Level } from "./logger.ts";
import { context as otelContext } from "@opentelemetry/api";
import {
  createConveyorStreams,
  type EventInit,
  type NatsServer,
  type NatsServerOptions,
  type PublishedEvent,
  publishEvent,
  startNatsServer,
} from "./local_nats.ts";
import {
  type DriverMessage,
  type DriverResult,
  type LogEntry,
  LogEntrySchema,
  type Resource,
  type ResultEnvelope,
  ResultEnvelopeSchema,
} from "./types.ts";
import * as v from "valibot";

// ---------------------------------------------------------------------------
// reconcileOnce: no NATS.

/** A resource for {@link reconcileOnce}: what is not given gets a test value. */
export interface TestResource<Spec = unknown> {
  /** The resource's name. */
  name: string;
  /** Its type. @default the driver's first resource type */
  resource?: string;
  /** Its spec, as the server would send it. @default {} */
  spec?: Spec;
  /** Its pipeline, when it has one. */
  pipeline?: string;
  /** Its metadata. @default { version: "1" } */
  metadata?: Record<string, unknown>;
  /** Its id. @default a new UUID */
  id?: string;
}

/** Options of {@link reconcileOnce}. */
export interface ReconcileOnceOptions {
  /** The event name. @default "create" */
  event?: string;
  /** The run id. @default a new UUID */
  runId?: string;
  /** The delivery attempt, 1 for the first. @default 1 */
  attempt?: number;
  /** Deliveries before a failure is final, as `serve`'s option. @default 5 */
  maxAttempts?: number;
  /** Aborts `ctx.signal`, as a shutdown would (reason: the signal's). */
  signal?: AbortSignal;
  /** Gives up on reconcile after this many ms, as `serve`'s option. @default no limit */
  reconcileTimeout?: number;
  /** What `ctx.client` is. */
  client?: Client;
}

/** A log line captured by {@link reconcileOnce}. */
export interface CapturedLog {
  /** Its level. */
  level: Level;
  /** Its text. */
  message: string;
  /** Its labels (those of `logger.with()` included). */
  labels: Labels;
}

/**
 * What the runtime would do after this reconcile:
 * - `ack`: report `result` and acknowledge the event;
 * - `terminate`: report `result` (a failure) and stop redelivering it;
 * - `retry`: report nothing yet and redeliver it after `delay` ms;
 * - `skip`: the driver does not handle this event: acknowledge it without a
 *   result, and reconcile was not called;
 * - `handBack`: the reconcile was stopped by `options.signal` (as by a
 *   shutdown): give the event back at once, unreported, for another attempt;
 *   `error` is what reconcile rejected with, if it did.
 */
export type ReconcileDecision =
  | { action: "ack" }
  | { action: "terminate"; error?: unknown }
  | { action: "retry"; delay: number; reason: string; error: unknown }
  | { action: "skip"; reason: string }
  | { action: "handBack"; reason: string; error?: unknown };

/** What {@link reconcileOnce} found. */
export interface ReconcileOnceResult {
  /**
   * The result the runtime would publish (after its checks: an invalid or
   * oversized result becomes a failure that says why); undefined when it
   * would publish none (retry, skip).
   */
  result: DriverResult | undefined;
  /** What reconcile logged, in order. */
  logs: CapturedLog[];
  /** What the runtime would do with the event. */
  decision: ReconcileDecision;
}

/**
 * Runs `driver.reconcile` once for `resource`, without NATS, under the
 * runtime's own rules: the `events` filter, the `spec` schema, the result's
 * checks and size limit, the retry policy and the reconcile timeout. The
 * logger captures lines instead of publishing them.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { defineDriver } from "@conveyor/driver";
 * import { reconcileOnce } from "@conveyor/driver/testing";
 *
 * const greeter = defineDriver({
 *   name: "greeter",
 *   resources: ["app"],
 *   reconcile({ resource, logger }) {
 *     logger.info(`hello ${resource.name}`);
 *     return { success: true, message: "greeted" };
 *   },
 * });
 * const { result, logs, decision } = await reconcileOnce(greeter, { name: "web" });
 * assert.deepEqual(result, { success: true, message: "greeted" });
 * assert.equal(logs[0].message, "hello web");
 * assert.equal(decision.action, "ack");
 * ```
 */
export async function reconcileOnce<Spec>(
  driver: Driver<Spec>,
  resource: TestResource<unknown>,
  options: ReconcileOnceOptions = {},
): Promise<ReconcileOnceResult> {
  const attempt = options.attempt ?? 1;
  const policy = {
    maxAttempts: options.maxAttempts ?? 5,
    retryDelay: 1_000,
    retryMaxDelay: 60_000,
  };
  const full: Resource = {
    id: resource.id ?? crypto.randomUUID(),
    name: resource.name,
    resource: resource.resource ?? driver.resources[0],
    ...(resource.pipeline ? { pipeline: resource.pipeline } : {}),
    metadata: resource.metadata ?? { version: "1" },
    spec: resource.spec ?? {},
  };
  const message: DriverMessage = {
    event: options.event ?? "create",
    id: crypto.randomUUID(),
    run_id: options.runId ?? crypto.randomUUID(),
    payload: full,
  };
  const logs: CapturedLog[] = [];
  const handles = !driver.events || driver.events.includes(message.event);
  const admission = admit(
    {
      attempt,
      type: full.resource,
      handlesType: driver.resources.includes(full.resource),
      event: message.event,
      eventHandler: handles ? "this" : "none",
      runningHere: false,
    },
    policy,
    () => 0.5,
  );
  if (admission.action === "skip") {
    return { result: undefined, logs, decision: { action: "skip", reason: admission.reason } };
  }
  if (admission.action === "fail") {
    return { result: admission.result, logs, decision: { action: "terminate" } };
  }
  if (admission.action === "handBack") {
    return {
      result: undefined,
      logs,
      decision: { action: "skip", reason: admission.reason },
    };
  }

  const ac = new AbortController();
  const stop = () => ac.abort(options.signal?.reason);
  if (options.signal?.aborted) stop();
  options.signal?.addEventListener("abort", stop, { once: true });
  const limit = options.reconcileTimeout;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const ctx: ReconcileContext = {
    resource: full,
    message,
    event: message.event,
    runId: message.run_id,
    logger: captureLogger(message.run_id, logs, {}),
    signal: ac.signal,
    attempt,
    ...(options.client ? { client: options.client } : {}),
    traceContext: otelContext.active(),
  };
  let outcome: Outcome;
  let thrown: { error: unknown } | undefined;
  try {
    const run = callReconcile(driver, ctx);
    const timedOut = limit !== undefined && limit > 0 && limit !== Infinity
      ? new Promise<never>((_, reject) => {
        timer = setTimeout(() => {
          const err = new ReconcileTimeoutError(limit);
          ac.abort(err);
          reject(err);
        }, limit);
      })
      : undefined;
    const value = await (timedOut ? Promise.race([run, timedOut]) : run);
    outcome = { kind: "returned", value };
  } catch (error) {
    thrown = { error };
    outcome = error instanceof ReconcileTimeoutError && ac.signal.reason === error
      ? { kind: "timedOut", error }
      : options.signal?.aborted
      ? { kind: "abandoned" } // as a shutdown that stopped waiting
      : { kind: "threw", error };
  } finally {
    clearTimeout(timer);
    options.signal?.removeEventListener("abort", stop);
  }
  const decision = decide(outcome, attempt, policy, () => 0.5);
  switch (decision.action) {
    case "retry":
      return {
        result: undefined,
        logs,
        decision: {
          action: "retry",
          delay: decision.delay,
          reason: decision.reason,
          error: decision.error,
        },
      };
    case "handBack":
      return {
        result: undefined,
        logs,
        decision: { action: "handBack", reason: decision.reason, ...thrown },
      };
    case "report": {
      const fitted = fitResult(decision.result, {
        driver: driver.name,
        runId: message.run_id,
        resourceJson: JSON.stringify(full),
        maxPayload: 1024 * 1024,
        attempt,
      });
      const result = fitted.ok ? fitted.result : decision.result;
      return {
        result,
        logs,
        decision: decision.then === "ack" && (!fitted.ok || !fitted.replaced)
          ? { action: "ack" }
          : { action: "terminate", ...(decision.error ? { error: decision.error } : {}) },
      };
    }
  }
}

function captureLogger(runId: string, into: CapturedLog[], base: Labels): DriverLogger {
  const write = (level: Level) => (message: string, labels?: Labels) => {
    into.push({ level, message: String(message), labels: { ...base, ...labels } });
  };
  return {
    runId,
    log: write("info"),
    debug: write("debug"),
    info: write("info"),
    warn: write("warning"),
    error: write("error"),
    with: (labels) => captureLogger(runId, into, { ...base, ...labels }),
  };
}

// ---------------------------------------------------------------------------
// startTestConveyor: a real NATS, set up as the Conveyor server sets it up.

/** Options of {@link startTestConveyor}. */
export interface TestConveyorOptions {
  /** Options of the `nats-server` it starts (its binary, extra arguments). */
  nats?: NatsServerOptions;
  /**
   * Speak WebSocket, for a driver that connects as an edge runtime does:
   * the server also listens for WebSocket clients, {@link TestConveyor.url}
   * is its `ws://` URL, and the kit connects through it too (nats.js keeps
   * one transport per process: see the README's WebSocket section).
   * @default false
   */
  websocket?: boolean;
}

/** What {@link TestConveyor.emit} sends besides the resource. */
export interface EmitOptions {
  /** The event name. @default "create" */
  event?: string;
  /**
   * Address it to one driver, as the pipeline engine does for a pipeline's
   * steps (`drivers.{driver}.resources.{type}`); without it, it goes where
   * `POST /resources` publishes (`resources.{type}`).
   */
  driver?: string;
  /** The run id. @default a new UUID */
  runId?: string;
  /** NATS headers, e.g. a W3C `traceparent`. */
  headers?: Record<string, string>;
}

/** A resource for {@link TestConveyor.emit}: `name` and `resource` (its type) at least. */
export interface EmitResource {
  /** The resource's name. */
  name: string;
  /** Its type, e.g. `"app"`. */
  resource: string;
  /** Its spec. @default {} */
  spec?: unknown;
  /** Its pipeline. */
  pipeline?: string;
  /** Its metadata (string values, as the server's type). @default { version: "1" } */
  metadata?: Record<string, string>;
}

/**
 * A throw-away NATS with the Conveyor streams, from {@link startTestConveyor}.
 * Stop it with `stop()` or `await using`.
 */
export interface TestConveyor extends AsyncDisposable {
  /**
   * The NATS URL to give the driver (`servers`) and the other helpers:
   * `nats://`, or `ws://` with the `websocket` option.
   */
  readonly url: string;
  /** The `nats-server` process. */
  readonly server: NatsServer;
  /** Publishes an event for `resource`, as the Conveyor server does. */
  emit(resource: EmitResource, options?: EmitOptions): Promise<PublishedEvent>;
  /**
   * Every driver result published from now on (and those already stored),
   * decoded and checked against the server's envelope, in order. Ends when
   * the iteration is left or the kit stops.
   */
  results(): AsyncIterable<ResultEnvelope>;
  /** The log lines of `runId`, stored and then live, in order; ends as `results()`. */
  logs(runId: string): AsyncIterable<LogEntry>;
  /**
   * Resolves with the first result of `runId` (the pipeline engine's view),
   * or rejects after `timeout` ms (default 10 s) with an error saying so.
   */
  waitForResult(runId: string, options?: { timeout?: number }): Promise<ResultEnvelope>;
  /** Closes the connection and stops the server, removing its store. */
  stop(): Promise<void>;
}

/**
 * Starts a `nats-server` (from `NATS_SERVER_BIN`, the project's set-up
 * cache, or PATH) on 127.0.0.1 with a temporary store, creates the three
 * streams as the Conveyor server does, and returns a {@link TestConveyor}
 * to emit events and read results and logs.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { defineDriver, startDriver } from "@conveyor/driver";
 * import { startTestConveyor } from "@conveyor/driver/testing";
 *
 * const greeter = defineDriver({
 *   name: "greeter",
 *   resources: ["app"],
 *   reconcile: ({ resource }) => ({ success: true, message: `hello ${resource.name}` }),
 * });
 * await using conveyor = await startTestConveyor();
 * await using _driver = await startDriver(greeter, { servers: conveyor.url, handleSignals: false });
 * const { message } = await conveyor.emit({ resource: "app", name: "web" });
 * const result = await conveyor.waitForResult(message.run_id);
 * assert.equal(result.driverresult.message, "hello web");
 * ```
 */
export async function startTestConveyor(
  options: TestConveyorOptions = {},
): Promise<TestConveyor> {
  const server = await startNatsServer({
    ...options.nats,
    ...(options.websocket ? { websocket: true } : {}),
  });
  let nc: NatsConnection;
  try {
    nc = await openNats({ servers: server.wsUrl ?? server.url });
    await createConveyorStreams(nc);
  } catch (err) {
    await server.stop();
    throw err;
  }
  const stopped = new AbortController();
  let stopping: Promise<void> | undefined;
  const stop = () =>
    stopping ??= (async () => {
      stopped.abort();
      await nc.close().catch(() => {});
      await server.stop();
    })();
  const conveyor: TestConveyor = {
    url: server.wsUrl ?? server.url,
    server,
    emit(resource, o = {}) {
      const init: EventInit = {
        resource: resource.resource,
        name: resource.name,
        ...(resource.spec !== undefined ? { spec: resource.spec } : {}),
        ...(resource.pipeline ? { pipeline: resource.pipeline } : {}),
        ...(resource.metadata ? { metadata: resource.metadata } : {}),
        ...(o.event ? { event: o.event } : {}),
        ...(o.driver ? { driver: o.driver } : {}),
        ...(o.runId ? { runId: o.runId } : {}),
        ...(o.headers ? { headers: o.headers } : {}),
      };
      return publishEvent(nc, init);
    },
    results() {
      return watch(nc, "pipeline-engine", RESULT_SUBJECT, stopped.signal, result);
    },
    logs(runId) {
      return watch(nc, "logs-engine", `logs.${runId}`, stopped.signal, logLine);
    },
    async waitForResult(runId, o = {}) {
      const timeout = o.timeout ?? 10_000;
      const ac = new AbortController();
      const timer = setTimeout(() => ac.abort(), timeout);
      try {
        const signal = anySignal(ac.signal, stopped.signal);
        for await (const r of watch(nc, "pipeline-engine", RESULT_SUBJECT, signal, result)) {
          if (r.run_id === runId) return r;
        }
      } finally {
        clearTimeout(timer);
      }
      throw new Error(
        stopped.signal.aborted
          ? `the test conveyor stopped before a result of run ${runId} arrived`
          : `no result of run ${runId} within ${timeout} ms`,
      );
    },
    stop,
    [Symbol.asyncDispose]: stop,
  };
  return conveyor;
}

const result = (json: unknown) => decodeOrThrow(ResultEnvelopeSchema, json, "result");
const logLine = (json: unknown) => decodeOrThrow(LogEntrySchema, json, "log line");

function anySignal(a: AbortSignal, b: AbortSignal): AbortSignal {
  const ac = new AbortController();
  const abort = () => ac.abort();
  if (a.aborted || b.aborted) abort();
  a.addEventListener("abort", abort, { once: true });
  b.addEventListener("abort", abort, { once: true });
  return ac.signal;
}

function decodeOrThrow<T>(schema: v.GenericSchema<unknown, T>, json: unknown, what: string): T {
  const parsed = v.safeParse(schema, json);
  if (parsed.success) return parsed.output;
  const issues = parsed.issues.map((i) => `${v.getDotPath(i) || what}: ${i.message}`);
  throw new TypeError(
    `the driver published a ${what} the server would not accept: ${issues.join("; ")}`,
  );
}

/**
 * Reads the messages of `stream` on `subject`, from its first message on,
 * then waits for more, without consuming anything: direct reads by sequence
 * (the WorkQueue streams take no second consumer), polled every 25 ms.
 */
async function* watch<T>(
  nc: NatsConnection,
  stream: string,
  subject: string,
  signal: AbortSignal,
  decode: (json: unknown) => T,
): AsyncGenerator<T, void, undefined> {
  const jsm = await jetstreamManager(nc);
  let seq = Math.max(1, (await jsm.streams.info(stream)).state.first_seq);
  while (!signal.aborted) {
    const m = await jsm.streams.getMessage(stream, { seq }).catch(() => null);
    if (m) {
      seq++;
      if (m.subject === subject) yield decode(m.json());
      continue;
    }
    const { last_seq } = (await jsm.streams.info(stream)).state;
    if (last_seq >= seq) {
      // Stored since the read above, or deleted: read it again to tell.
      const again = await jsm.streams.getMessage(stream, { seq }).catch(() => null);
      seq++;
      if (again?.subject === subject) yield decode(again.json());
      continue;
    }
    await pause(25, signal);
  }
}

function pause(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal.addEventListener("abort", done, { once: true });
  });
}
