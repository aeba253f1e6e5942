/**
 * The driver manager: connects to NATS, binds the driver's durable consumer,
 * runs `reconcile` for each event with bounded concurrency, ships logs and
 * results, and shuts down without losing an event.
 *
 * Delivery guarantee: at-least-once. An event is acknowledged only after its
 * logs and its result are stored by JetStream; results carry a `Nats-Msg-Id`
 * derived from driver, run and message, so a redelivered event does not
 * advance the pipeline twice (within the stream's duplicate window).
 *
 * @module
 */
import process from "node:process";
import { getLogger, type Logger } from "@logtape/logtape";
import { connect, nanos, type NatsConnection } from "@nats-io/transport-node";
import {
  AckPolicy,
  type Consumer,
  type ConsumerInfo,
  type ConsumerMessages,
  DeliverPolicy,
  jetstream,
  JetStreamApiCodes,
  JetStreamApiError,
  type JetStreamClient,
  type JetStreamManager,
  jetstreamManager,
  type JsMsg,
} from "@nats-io/jetstream";
import * as v from "valibot";
import {
  ConfigError,
  ConnectError,
  ConsumerError,
  ConveyorError,
  type InvalidMessageError,
  type MessageIssue,
  PermanentError,
  PublishError,
  ReconcileTimeoutError,
  ShutdownError,
  StreamNotFoundError,
} from "./errors.ts";
import { createRunLog } from "./logger.ts";
import { type AuthOptions, createIdentity, type Identity } from "./auth.ts";
import { Client } from "./client.ts";
import { ensureLogging } from "./logging.ts";
import {
  type ResolvedOptions,
  resolveOptions,
  retryDelayFor,
  type ServeOptions,
} from "./options.ts";
import {
  type Driver,
  type DriverMessage,
  type DriverResult,
  DriverResultSchema,
  nameProblem,
  parseDriverMessage,
  type Resource,
  ResourceSchema,
  type ResultEnvelope,
} from "./types.ts";

/** Stream the Conveyor server publishes resource and driver events to. */
export const MESSAGES_STREAM = "messages";
/** Subject driver results are published to (stream `pipeline-engine`). */
export const RESULT_SUBJECT = "pipelines.driver.result";

/** 100 years in nanoseconds: an inactive threshold that never passes. */
const KEEP_FOREVER = nanos(100 * 365 * 24 * 3_600_000);

/** How long a reconcile that was aborted gets to settle before the runtime moves on. */
const ABORT_GRACE_MS = 1_000;

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
  /** Events acknowledged without a reconcile (not in `driver.events`). */
  skipped: number;
  /** Events handed back because of a shutdown or a publish failure. */
  requeued: number;
  /** Reconciles running now. */
  inFlight: number;
}

/**
 * A driver started by {@link startDriver}.
 *
 * @example
 * ```ts
 * import { startDriver } from "@conveyor/driver";
 * await using running = await startDriver(driver, { handleSignals: false });
 * // ... later: graceful shutdown on scope exit, or explicitly:
 * await running.stop();
 * ```
 */
export interface RunningDriver extends AsyncDisposable {
  /** The driver's name (and its consumer's). */
  readonly name: string;
  /** Resolves when the driver has shut down and closed its connection. */
  readonly closed: Promise<void>;
  /** Starts a graceful shutdown; resolves when it is complete. */
  stop(): Promise<void>;
  /** A snapshot of the driver's counters. */
  stats(): DriverStats;
}

/**
 * Runs a driver until it is shut down: by `options.signal`, or by SIGINT or
 * SIGTERM when no signal is given. Resolves after a graceful shutdown in which
 * in-flight events are finished or handed back to the stream.
 *
 * Rejects when it cannot start: `ConfigError` (bad driver or option),
 * `ConnectError` (NATS unreachable within `connectTimeout`),
 * `StreamNotFoundError` (no `messages` stream: is the Conveyor server
 * running?), `ConsumerError` (an incompatible consumer of that name exists).
 *
 * @example
 * ```ts
 * import { serve } from "@conveyor/driver";
 *
 * await serve({
 *   name: "echo",
 *   resources: ["pipeline"],
 *   async reconcile({ resource, logger }) {
 *     logger.info(`hello ${resource.name}`);
 *     return { success: true, message: "ok", data: { name: resource.name } };
 *   },
 * }, { servers: "nats://127.0.0.1:4222", concurrency: 16 });
 * ```
 */
export async function serve(
  driver: Driver,
  options?: ServeOptions,
): Promise<void> {
  const running = await startDriver(driver, options);
  await running.closed;
}

/**
 * Starts a driver and returns once it consumes events, with a handle to stop
 * it. `serve` is this plus waiting for `closed`. Rejects like `serve` when the
 * driver cannot start.
 *
 * @example
 * ```ts
 * import { startDriver } from "@conveyor/driver";
 * const running = await startDriver(driver, { handleSignals: false });
 * console.log(running.stats());
 * await running.stop();
 * ```
 */
export async function startDriver(
  driver: Driver,
  options?: ServeOptions,
): Promise<RunningDriver> {
  checkDriver(driver);
  const o = resolveOptions(options);
  await ensureLogging(o);
  const log = getLogger(["conveyor", "driver", driver.name, "runtime"]);
  const identity = o.auth === undefined
    ? undefined
    : isIdentity(o.auth)
    ? o.auth
    : await createIdentity(o.auth);
  const client = o.client ??
    (o.apiUrl ? new Client({ baseUrl: o.apiUrl, auth: identity }) : undefined);
  const nc = await connectWithin(driver.name, o, identity);
  try {
    const jsm = await jetstreamManager(nc);
    const info = await ensureConsumer(jsm, driver, o, log);
    const js = jetstream(nc);
    const consumer = await js.consumers.get(MESSAGES_STREAM, driver.name).catch((err) => {
      throw new ConsumerError(
        driver.name,
        `cannot bind to consumer "${driver.name}": ${(err as Error).message}`,
        { cause: err },
      );
    });
    const runtime = new Runtime(driver, o, nc, js, jsm, consumer, info, log, client);
    runtime.start();
    return runtime.handle();
  } catch (err) {
    await nc.close().catch(() => {});
    throw err;
  }
}

function checkDriver(driver: Driver): void {
  if (driver === null || typeof driver !== "object") {
    throw new ConfigError(
      "driver",
      "driver must be an object with name, resources and reconcile",
    );
  }
  const bad = nameProblem(driver.name, "driver name");
  if (bad) throw new ConfigError("name", bad);
  if (!Array.isArray(driver.resources) || driver.resources.length === 0) {
    throw new ConfigError(
      "resources",
      `driver "${driver.name}": resources must be a non-empty array of resource types`,
    );
  }
  for (const r of driver.resources) {
    const p = nameProblem(r, "resource type");
    if (p) throw new ConfigError("resources", `driver "${driver.name}": ${p}`);
  }
  if (typeof driver.reconcile !== "function") {
    throw new ConfigError(
      "reconcile",
      `driver "${driver.name}": reconcile must be a function`,
    );
  }
  if (
    driver.events !== undefined &&
    (!Array.isArray(driver.events) ||
      driver.events.some((e) => typeof e !== "string"))
  ) {
    throw new ConfigError(
      "events",
      `driver "${driver.name}": events must be an array of event names`,
    );
  }
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const t = setTimeout(done, ms);
    function done() {
      clearTimeout(t);
      signal?.removeEventListener("abort", done);
      resolve();
    }
    signal?.addEventListener("abort", done, { once: true });
  });
}

function isIdentity(x: AuthOptions | Identity): x is Identity {
  return typeof (x as Identity).token === "function";
}

async function connectWithin(
  name: string,
  o: ResolvedOptions,
  identity: Identity | undefined,
): Promise<NatsConnection> {
  const deadline = Date.now() + o.connectTimeout;
  let last: unknown;
  for (let i = 0;; i++) {
    o.signal?.throwIfAborted();
    try {
      return await connect({
        servers: o.servers,
        name: `conveyor-driver:${name}`,
        maxReconnectAttempts: -1,
        reconnectTimeWait: 1_000,
        // Async stack traces cost an Error per request; a fifth of the
        // client's CPU per event in bench/throughput.ts.
        noAsyncTraces: true,
        // The operator's identity doubles as the NATS client certificate.
        ...(identity ? { tls: identity.tls() } : {}),
        ...o.nats,
        timeout: Math.max(1_000, Math.min(5_000, deadline - Date.now())),
      });
    } catch (err) {
      last = err;
      // Wrong credentials do not fix themselves by waiting.
      if (
        /authori[sz]ation|authentication/i.test(String((err as Error)?.message))
      ) break;
    }
    const wait = Math.min(2_000, 100 * 2 ** i);
    if (Date.now() + wait >= deadline) break;
    await sleep(wait, o.signal);
  }
  // A server that requires client certificates drops a client without one
  // mid-handshake, which nats.js reports as a timeout or a TLS error.
  const maybeTls = /tls|certificate|handshake|ssl|timeout/i.test(
    String((last as Error)?.message ?? last),
  );
  throw new ConnectError(o.servers, {
    cause: last,
    hint: maybeTls && !identity
      ? "if the server requires client certificates, give the driver its identity: " +
        "option auth, or CONVEYOR_CERT_FILE, CONVEYOR_KEY_FILE and CONVEYOR_CA_FILE"
      : undefined,
  });
}

/** Listens for SIGINT and SIGTERM; returns a function that stops listening. */
function onSignals(onInt: () => void, onTerm: () => void): () => void {
  process.on("SIGINT", onInt);
  process.on("SIGTERM", onTerm);
  return () => {
    process.off("SIGINT", onInt);
    process.off("SIGTERM", onTerm);
  };
}

/** The consumer's filter: both subject forms for every resource type. */
export function filterSubjects(
  driver: Pick<Driver, "name" | "resources">,
): string[] {
  return [...new Set(driver.resources)].flatMap((r) => [
    `resources.${r}`,
    `drivers.${driver.name}.resources.${r}`,
  ]);
}

function sameSet(a: readonly string[], b: readonly string[]): boolean {
  const s = new Set(a);
  return s.size === new Set(b).size && b.every((x) => s.has(x));
}

async function ensureConsumer(
  jsm: JetStreamManager,
  driver: Driver,
  o: ResolvedOptions,
  log: Logger,
): Promise<ConsumerInfo> {
  try {
    await jsm.streams.info(MESSAGES_STREAM);
  } catch (err) {
    if (isApiError(err, JetStreamApiCodes.StreamNotFound)) {
      throw new StreamNotFoundError(MESSAGES_STREAM, { cause: err });
    }
    throw new ConveyorError(
      `cannot read stream "${MESSAGES_STREAM}": ${(err as Error).message}`,
      { cause: err },
    );
  }
  const filter_subjects = filterSubjects(driver);
  const wanted = {
    filter_subjects,
    ack_wait: nanos(o.ackWait),
    max_ack_pending: o.maxAckPending,
  };
  let info: ConsumerInfo | undefined;
  try {
    info = await jsm.consumers.info(MESSAGES_STREAM, driver.name);
  } catch (err) {
    if (!isApiError(err, JetStreamApiCodes.ConsumerNotFound)) {
      throw new ConsumerError(
        driver.name,
        `cannot read consumer "${driver.name}": ${(err as Error).message}`,
        { cause: err },
      );
    }
  }
  if (!info) {
    try {
      return await jsm.consumers.add(MESSAGES_STREAM, {
        ...wanted,
        name: driver.name,
        durable_name: driver.name,
        ack_policy: AckPolicy.Explicit,
        deliver_policy: DeliverPolicy.All,
      });
    } catch (err) {
      // Another instance may have created it in the meantime: fall through.
      info = await jsm.consumers.info(MESSAGES_STREAM, driver.name).catch(
        () => {
          throw new ConsumerError(
            driver.name,
            `cannot create consumer "${driver.name}": ${(err as Error).message}`,
            { cause: err },
          );
        },
      );
    }
  }
  const c = info.config;
  if (c.ack_policy !== AckPolicy.Explicit || c.deliver_subject) {
    throw new ConsumerError(
      driver.name,
      `consumer "${driver.name}" exists but is not an explicit-ack pull consumer ` +
        `(ack_policy ${c.ack_policy}${
          c.deliver_subject ? ", push" : ""
        }); delete it to let the driver recreate it`,
    );
  }
  const current = c.filter_subjects ??
    (c.filter_subject ? [c.filter_subject] : []);
  const expires = !c.durable_name && Number(c.inactive_threshold ?? 0) < KEEP_FOREVER;
  const stale = !sameSet(current, filter_subjects) ||
    c.ack_wait !== wanted.ack_wait ||
    c.max_ack_pending !== wanted.max_ack_pending || expires;
  if (!stale) return info;
  if (expires) {
    log.warn(
      "consumer {name} was created without a durable name (Go SDK) and would vanish 5 s after " +
        "its last client, dropping events; keeping it for good. Delete it once while no " +
        "events are pending to have it recreated as a durable consumer.",
      { name: driver.name },
    );
  }
  try {
    return await jsm.consumers.update(MESSAGES_STREAM, driver.name, {
      ...wanted,
      // A durable name cannot be added to an existing consumer; a threshold
      // this long keeps it (it survives server restarts too).
      ...(expires ? { inactive_threshold: KEEP_FOREVER } : {}),
      ...(c.filter_subject ? { filter_subject: "" } : {}),
    });
  } catch (err) {
    throw new ConsumerError(
      driver.name,
      `cannot update consumer "${driver.name}": ${(err as Error).message}`,
      { cause: err },
    );
  }
}

/** Counting semaphore: how many reconciles may start. */
class Slots {
  #free: number;
  #waiters: (() => void)[] = [];
  constructor(n: number) {
    this.#free = n;
  }
  get free(): number {
    return this.#free;
  }
  take(): void {
    this.#free--;
  }
  release(): void {
    this.#free++;
    this.#waiters.splice(0).forEach((w) => w());
  }
  /** Resolves when at least one slot is free (or at once when one is). */
  available(): Promise<void> {
    return this.#free > 0 ? Promise.resolve() : new Promise((r) => this.#waiters.push(r));
  }
  /** Wakes every waiter, e.g. to notice a shutdown. */
  wake(): void {
    this.#waiters.splice(0).forEach((w) => w());
  }
}

type Outcome =
  | { kind: "result"; result: DriverResult }
  | { kind: "error"; error: unknown }
  | { kind: "abandoned"; error: unknown };

interface InFlight {
  abort(reason: unknown): void;
  done: Promise<void>;
}

const decoder = new TextDecoder();

class Runtime {
  readonly #stats: DriverStats = {
    received: 0,
    succeeded: 0,
    failed: 0,
    retried: 0,
    invalid: 0,
    skipped: 0,
    requeued: 0,
    inFlight: 0,
  };
  readonly #inFlight = new Set<InFlight>();
  /** Calls of driver.reconcile not yet settled, abandoned ones included. */
  #running = 0;
  readonly #slots: Slots;
  readonly #heartbeatMs: number;
  /** Messages being reconciled: told "still working" on each heartbeat. */
  readonly #working = new Set<JsMsg>();
  #heartbeat?: ReturnType<typeof setInterval>;
  readonly #events?: Set<string>;
  #stopping = false;
  #stopPromise?: Promise<void>;
  #fetch?: ConsumerMessages;
  #loop: Promise<void> = Promise.resolve();
  #closed!: Promise<void>;
  #resolveClosed!: () => void;
  #forceAbort = new AbortController();
  #removeSignalHandlers: () => void = () => {};

  constructor(
    readonly driver: Driver,
    readonly o: ResolvedOptions,
    readonly nc: NatsConnection,
    readonly js: JetStreamClient,
    readonly jsm: JetStreamManager,
    public consumer: Consumer,
    info: ConsumerInfo,
    readonly log: Logger,
    readonly client: Client | undefined,
  ) {
    this.#slots = new Slots(o.concurrency);
    // Progress well inside ack_wait, as the consumer really has it.
    this.#heartbeatMs = Math.max(
      100,
      Math.floor(Number(info.config.ack_wait ?? nanos(o.ackWait)) / 1e6 / 3),
    );
    this.#events = driver.events ? new Set(driver.events) : undefined;
    this.#closed = new Promise((r) => (this.#resolveClosed = r));
  }

  start(): void {
    const { signal, handleSignals } = this.o;
    if (signal) {
      if (signal.aborted) queueMicrotask(() => this.stop());
      else signal.addEventListener("abort", () => this.stop(), { once: true });
    }
    if (handleSignals) this.#installSignalHandlers();
    // One timer for all in-flight messages rather than one per message.
    this.#heartbeat = setInterval(() => {
      for (const m of this.#working) {
        try {
          m.working();
        } catch { /* reconnecting: the next beat or the ack will do */ }
      }
    }, this.#heartbeatMs);
    this.log.info(
      "driver {driver} consuming {subjects} with concurrency {concurrency}",
      {
        driver: this.driver.name,
        subjects: filterSubjects(this.driver),
        concurrency: this.o.concurrency,
      },
    );
    this.#loop = this.#pullLoop();
  }

  handle(): RunningDriver {
    return {
      name: this.driver.name,
      closed: this.#closed,
      stop: () => this.stop(),
      stats: () => ({ ...this.#stats, inFlight: this.#inFlight.size }),
      [Symbol.asyncDispose]: () => this.stop(),
    };
  }

  /**
   * After a signal-driven shutdown: a reconcile that ignored `ctx.signal`
   * would keep the process alive until it is killed. Its event is already
   * handed back, so exit as a signalled driver process should.
   */
  #exitIfStuck(): void {
    if (this.#running === 0) return;
    this.log.warn(
      "{count} reconcile(s) ignored ctx.signal and still run; their events were handed back; exiting",
      { count: this.#running },
    );
    setTimeout(() => process.exit(0), 100);
  }

  #installSignalHandlers(): void {
    let count = 0;
    const onSignal = (sig: string) => {
      count++;
      if (count === 1) {
        this.log.info("{signal} received: shutting down gracefully", {
          signal: sig,
        });
        this.stop().then(() => this.#exitIfStuck());
      } else {
        this.log.warn(
          "{signal} received again: no longer waiting for in-flight reconciles",
          { signal: sig },
        );
        this.#forceAbort.abort();
      }
    };
    const onInt = () => onSignal("SIGINT");
    const onTerm = () => onSignal("SIGTERM");
    this.#removeSignalHandlers = onSignals(onInt, onTerm);
  }

  async #pullLoop(): Promise<void> {
    let failures = 0;
    while (!this.#stopping) {
      await this.#slots.available();
      if (this.#stopping) break;
      try {
        // Ask for no more than the free slots: nothing waits in a buffer
        // while its ack_wait runs out, and one slow job blocks no other.
        const iter = await this.consumer.fetch({
          max_messages: this.#slots.free,
          expires: 30_000,
        });
        this.#fetch = iter;
        if (this.#stopping) iter.stop();
        for await (const m of iter) {
          failures = 0;
          if (this.#stopping) {
            // Arrived after the shutdown began: straight back to the stream.
            m.nak();
            continue;
          }
          this.#dispatch(m);
        }
      } catch (err) {
        if (this.#stopping) break;
        failures++;
        this.log.warn("pulling messages failed ({attempt}): {error}", {
          attempt: failures,
          error: String(err),
        });
        // A deleted consumer shows as "consumer deleted", "no responders"
        // or missed heartbeats, depending on when it went: ask the server.
        await this.#recreateConsumerIfMissing();
        await sleep(
          Math.min(5_000, 250 * 2 ** Math.min(failures, 5)),
          this.#forceAbort.signal,
        );
      } finally {
        this.#fetch = undefined;
      }
    }
  }

  async #recreateConsumerIfMissing(): Promise<void> {
    try {
      await this.jsm.consumers.info(MESSAGES_STREAM, this.driver.name);
      return;
    } catch (err) {
      // Anything but "not found" (NATS down, say) is for the next round.
      if (!isApiError(err, JetStreamApiCodes.ConsumerNotFound)) return;
    }
    try {
      await ensureConsumer(this.jsm, this.driver, this.o, this.log);
      this.consumer = await this.js.consumers.get(
        MESSAGES_STREAM,
        this.driver.name,
      );
      this.log.info("consumer {name} recreated", { name: this.driver.name });
    } catch (err) {
      this.log.error("cannot recreate consumer {name}: {error}", {
        name: this.driver.name,
        error: String(err),
      });
    }
  }

  #dispatch(m: JsMsg): void {
    this.#stats.received++;
    this.#slots.take();
    const ac = new AbortController();
    const entry: InFlight = {
      abort: (reason) => ac.abort(reason),
      done: Promise.resolve(),
    };
    this.#inFlight.add(entry);
    entry.done = this.#handle(m, ac)
      .catch((err) => {
        // #handle catches everything it expects; this is a runtime bug or a
        // lost connection. Hand the event back rather than drop it.
        this.log.error("handling message {seq} failed: {error}", {
          seq: m.seq,
          error: String(err),
        });
        try {
          m.nak(this.o.retryDelay);
        } catch { /* connection gone: ack_wait redelivers it */ }
      })
      .finally(() => {
        this.#inFlight.delete(entry);
        this.#slots.release();
      });
  }

  async #handle(m: JsMsg, ac: AbortController): Promise<void> {
    const attempt = m.info.deliveryCount;
    const decoded = this.#decode(m);
    if (!decoded.ok) return this.#reject(m, decoded.error, decoded.raw);
    const msg = decoded.message;
    if (this.#events && !this.#events.has(msg.event)) {
      this.#stats.skipped++;
      this.log.debug(
        "skipping event {event} of {resource} (not in driver.events)",
        {
          event: msg.event,
          resource: msg.payload.name,
        },
      );
      m.ack();
      return;
    }

    this.#working.add(m);
    const timeout = this.o.reconcileTimeout > 0
      ? setTimeout(
        () => ac.abort(new ReconcileTimeoutError(this.o.reconcileTimeout)),
        this.o.reconcileTimeout,
      )
      : undefined;
    const run = createRunLog({
      nc: this.nc,
      js: this.js,
      driver: this.driver.name,
      runId: msg.run_id,
      pipeline: msg.payload.pipeline || undefined,
    });
    try {
      const outcome = await this.#reconcile(
        msg,
        run.logger,
        ac.signal,
        attempt,
      );
      await this.#settle(m, msg, outcome, attempt, run.flush);
    } finally {
      this.#working.delete(m);
      clearTimeout(timeout);
    }
  }

  async #reconcile(
    msg: DriverMessage,
    logger: ReturnType<typeof createRunLog>["logger"],
    signal: AbortSignal,
    attempt: number,
  ): Promise<Outcome> {
    let settle!: (o: Outcome) => void;
    const outcome = new Promise<Outcome>((r) => (settle = r));
    let graceTimer: ReturnType<typeof setTimeout> | undefined;
    const onAbort = () => {
      // Give a cooperative reconcile a moment to wind down; then move on.
      graceTimer = setTimeout(
        () => settle({ kind: "abandoned", error: signal.reason }),
        ABORT_GRACE_MS,
      );
    };
    signal.addEventListener("abort", onAbort, { once: true });
    this.#running++;
    (async () => {
      try {
        const ret = await this.driver.reconcile({
          resource: msg.payload,
          message: msg,
          event: msg.event,
          runId: msg.run_id,
          logger,
          signal,
          attempt,
          client: this.client,
        });
        if (ret === undefined || ret === null) {
          settle({ kind: "result", result: { success: true, message: "" } });
          return;
        }
        const parsed = v.safeParse(DriverResultSchema, ret);
        if (!parsed.success) {
          settle({
            kind: "error",
            error: new PermanentError(
              `reconcile returned an invalid DriverResult: ${
                issuesOf(parsed.issues).map((i) => `${i.path || "result"}: ${i.message}`).join("; ")
              }`,
            ),
          });
        } else {
          settle({ kind: "result", result: parsed.output });
        }
      } catch (err) {
        settle({
          kind: signal.aborted && !(signal.reason instanceof ReconcileTimeoutError)
            ? "abandoned"
            : "error",
          error: err,
        });
      } finally {
        this.#running--;
      }
    })();
    const result = await outcome;
    clearTimeout(graceTimer);
    signal.removeEventListener("abort", onAbort);
    // A reconcile that ran out of time failed, however it ended.
    if (
      signal.aborted && signal.reason instanceof ReconcileTimeoutError &&
      result.kind !== "result"
    ) {
      return { kind: "error", error: signal.reason };
    }
    if (
      result.kind === "abandoned" &&
      signal.reason instanceof ReconcileTimeoutError
    ) {
      return { kind: "error", error: signal.reason };
    }
    return result;
  }

  async #settle(
    m: JsMsg,
    msg: DriverMessage,
    outcome: Outcome,
    attempt: number,
    flushLogs: () => Promise<void>,
  ): Promise<void> {
    if (outcome.kind === "abandoned") {
      // Shutdown: the event goes back for another instance; its logs so far
      // are kept, no result is reported.
      await flushLogs().catch(() => {});
      this.#stats.requeued++;
      m.nak();
      this.log.info("run {runId}: handed back to the stream on shutdown", {
        runId: msg.run_id,
      });
      return;
    }
    let result: DriverResult;
    let final = true;
    if (outcome.kind === "error") {
      const err = outcome.error;
      const permanent = err instanceof PermanentError;
      const text = errorMessage(err);
      if (!permanent && attempt < this.o.maxAttempts) {
        const delay = retryDelayFor(attempt, this.o);
        this.log.warn(
          "run {runId}: attempt {attempt}/{max} failed, retrying in {delay} ms: {error}",
          {
            runId: msg.run_id,
            attempt,
            max: this.o.maxAttempts,
            delay,
            error: text,
            cause: err,
          },
        );
        await flushLogs().catch(() => {});
        this.#stats.retried++;
        m.nak(delay);
        return;
      }
      this.log.error("run {runId}: failed{after}: {error}", {
        runId: msg.run_id,
        after: permanent ? "" : ` after ${attempt} attempts`,
        error: text,
        cause: err,
      });
      result = {
        success: false,
        message: text,
        data: { error: errorName(err), attempts: attempt },
      };
      final = false;
    } else {
      result = outcome.result;
    }
    let body: string;
    try {
      body = this.#encodeResult(msg.payload, msg.run_id, result);
    } catch (err) {
      // A BigInt or a cycle in `data`: no retry can fix that.
      const text = `reconcile returned data that cannot be encoded as JSON: ${errorMessage(err)}`;
      this.log.error("run {runId}: {error}", { runId: msg.run_id, error: text });
      result = {
        success: false,
        message: text,
        data: { error: "PermanentError", attempts: attempt },
      };
      final = false;
      body = this.#encodeResult(msg.payload, msg.run_id, result);
    }
    try {
      await flushLogs();
      await this.#publishResult(body, resultMsgId(this.driver.name, msg.run_id, msg.id));
    } catch (err) {
      // Nothing was reported: let the event come back and try again.
      this.#stats.requeued++;
      this.log.error(
        "run {runId}: cannot report the result, the event will be redelivered: {error}",
        {
          runId: msg.run_id,
          error: String(err),
        },
      );
      m.nak(retryDelayFor(attempt, this.o));
      return;
    }
    if (result.success) this.#stats.succeeded++;
    else this.#stats.failed++;
    if (final) {
      // Unconfirmed: a lost ack means a redelivery, whose result the
      // Nats-Msg-Id deduplicates; drain() flushes acks on shutdown.
      m.ack();
    } else {
      m.term(`failed: ${result.message}`.slice(0, 1_000));
      await this.nc.flush().catch(() => {});
    }
  }

  #encodeResult(resource: Resource, runId: string, result: DriverResult): string {
    const envelope: ResultEnvelope = {
      event: "driver.result",
      run_id: runId,
      resource,
      driverresult: {
        success: result.success,
        message: result.message,
        data: result.data ?? null,
        driver: this.driver.name,
      },
    };
    return JSON.stringify(envelope);
  }

  /** Publishes an encoded result, retrying with the same Nats-Msg-Id. */
  async #publishResult(data: string, msgID: string): Promise<void> {
    let last: unknown;
    for (let i = 0; i < 5; i++) {
      if (i > 0) await sleep(200 * 2 ** i);
      try {
        await this.js.publish(RESULT_SUBJECT, data, { msgID, timeout: 5_000 });
        return;
      } catch (err) {
        last = err;
      }
    }
    throw new PublishError(RESULT_SUBJECT, { cause: last });
  }

  #decode(m: JsMsg):
    | { ok: true; message: DriverMessage }
    | { ok: false; error: InvalidMessageError; raw: unknown } {
    let raw: unknown;
    try {
      raw = JSON.parse(decoder.decode(m.data));
    } catch {
      // parseDriverMessage below reports it with the parser's words.
    }
    try {
      return { ok: true, message: parseDriverMessage(raw ?? m.data, m.subject) };
    } catch (err) {
      return { ok: false, error: err as InvalidMessageError, raw };
    }
  }

  /** Terminates a message that can never be processed, reporting it where possible. */
  async #reject(
    m: JsMsg,
    error: InvalidMessageError,
    raw: unknown,
  ): Promise<void> {
    this.#stats.invalid++;
    this.log.error("terminating message {seq} on {subject}: {error}", {
      seq: m.seq,
      subject: m.subject,
      error: error.message,
      issues: error.issues,
    });
    const runId = isRecord(raw) && typeof raw.run_id === "string" && raw.run_id !== ""
      ? raw.run_id
      : undefined;
    const resource = isRecord(raw) ? readResource(raw.payload) : undefined;
    if (runId && resource) {
      const id = isRecord(raw) && typeof raw.id === "string" && raw.id
        ? raw.id
        : `seq-${m.info.streamSequence}`;
      try {
        await this.#publishResult(
          this.#encodeResult(resource, runId, {
            success: false,
            message: error.message,
            data: { error: error.name, issues: error.issues },
          }),
          resultMsgId(this.driver.name, runId, id),
        );
        this.#stats.failed++;
      } catch (err) {
        this.log.error(
          "cannot report the invalid message of run {runId}: {error}",
          { runId, error: String(err) },
        );
      }
    }
    m.term(error.message.slice(0, 1_000));
    await this.nc.flush().catch(() => {});
  }

  stop(): Promise<void> {
    this.#stopPromise ??= this.#shutdown();
    return this.#stopPromise;
  }

  async #shutdown(): Promise<void> {
    this.#stopping = true;
    this.#slots.wake();
    this.#fetch?.stop();
    await this.#loop.catch(() => {});
    const inFlight = [...this.#inFlight];
    if (inFlight.length > 0) {
      this.log.info(
        "waiting up to {timeout} ms for {count} in-flight reconcile(s)",
        {
          timeout: this.o.shutdownTimeout,
          count: inFlight.length,
        },
      );
      const all = Promise.all(inFlight.map((f) => f.done));
      // The timer must not outlive the wait: it would keep the process up.
      const waited = new AbortController();
      const onForce = () => waited.abort();
      this.#forceAbort.signal.addEventListener("abort", onForce, { once: true });
      await Promise.race([all, sleep(this.o.shutdownTimeout, waited.signal)]);
      waited.abort();
      this.#forceAbort.signal.removeEventListener("abort", onForce);
      if (this.#inFlight.size > 0) {
        const reason = new ShutdownError();
        for (const f of this.#inFlight) f.abort(reason);
        await all;
      }
    }
    clearInterval(this.#heartbeat);
    try {
      await this.nc.drain();
    } catch {
      await this.nc.close().catch(() => {});
    }
    this.#removeSignalHandlers();
    this.log.info("driver {driver} stopped", {
      driver: this.driver.name,
      ...this.#stats,
    });
    this.#resolveClosed();
  }
}

/** The `Nats-Msg-Id` of a result: equal for every delivery of the same event. */
export function resultMsgId(
  driver: string,
  runId: string,
  messageId: string,
): string {
  return `driver.result.${driver}.${runId}.${messageId}`;
}

function isApiError(err: unknown, code: number): boolean {
  return err instanceof JetStreamApiError && err.code === code;
}

function isRecord(x: unknown): x is Record<string, unknown> {
  return typeof x === "object" && x !== null && !Array.isArray(x);
}

function readResource(payload: unknown): Resource | undefined {
  let value = payload;
  if (typeof value === "string") {
    try {
      value = JSON.parse(value);
    } catch {
      return undefined;
    }
  }
  const r = v.safeParse(ResourceSchema, value);
  return r.success ? r.output : undefined;
}

function issuesOf(issues: readonly v.BaseIssue<unknown>[]): MessageIssue[] {
  return issues.map((i) => ({
    path: v.getDotPath(i) ?? "",
    message: i.message,
  }));
}

function errorMessage(err: unknown): string {
  if (err instanceof Error) return err.message || err.name;
  return typeof err === "string" ? err : `non-Error thrown: ${String(err)}`;
}

function errorName(err: unknown): string {
  return err instanceof Error ? err.name : typeof err;
}
