/**
 * The driver manager: connects to NATS, binds the driver's durable consumer,
 * pulls events for as many reconciles as may run, hands each to the
 * per-event path (`run.ts`), keeps long jobs from being redelivered, follows
 * the consumer as other instances change it, and shuts down within a bound
 * without losing an event.
 *
 * @module
 */
import { setMaxListeners } from "node:events";
import process from "node:process";
import { getLogger, type Logger } from "@logtape/logtape";
import type { NatsConnection } from "@nats-io/transport-node";
import { openNats, transportOf } from "./_nats.ts";
import {
  type Consumer,
  type ConsumerMessages,
  jetstream,
  type JetStreamClient,
  type JetStreamManager,
  jetstreamManager,
  type JsMsg,
} from "@nats-io/jetstream";
import { errorText, pause, setLongTimeout } from "./_util.ts";
import { type AuthOptions, checkClientAuth, createIdentity, type Identity } from "./auth.ts";
import { Client } from "./client.ts";
import {
  checkStream,
  type ConsumerWants,
  consumerWants,
  ensureConsumer,
  type Fleet,
  fleetOf,
  MESSAGES_STREAM,
  planConsumer,
  readConsumer,
} from "./consumer.ts";
import { checkDriver, type Driver } from "./driver.ts";
import { ConfigError, ConnectError, ConsumerError, ShutdownError } from "./errors.ts";
import { Flow } from "./flow.ts";
import { type DriverHealth, healthHandler, type HealthServer, serveHealth } from "./health.ts";
import { ensureLogging } from "./logger.ts";
import { type ResolvedOptions, resolveOptions, type ServeOptions } from "./options.ts";
import { PubAcks } from "./pubacks.ts";
import { Telemetry } from "./telemetry.ts";
import {
  ABORT_GRACE_MS,
  type DriverStats,
  type EventDeps,
  handleDelivery,
  ResultMemory,
} from "./run.ts";

/**
 * A driver started by {@link startDriver}.
 *
 * @example
 * ```ts
 * import { type Driver, startDriver } from "@conveyor/driver";
 * const driver: Driver = { name: "echo", resources: ["pipeline"], reconcile() {} };
 * await using running = await startDriver(driver, { handleSignals: false });
 * console.log(running.stats().inFlight);
 * // leaving the scope stops it gracefully, or explicitly:
 * await running.stop();
 * ```
 */
export interface RunningDriver extends AsyncDisposable {
  /** The driver's name (and its consumer's). */
  readonly name: string;
  /** Resolves when the driver has shut down and closed its connection. */
  readonly closed: Promise<void>;
  /**
   * Starts a graceful shutdown; resolves when it is complete, within
   * `shutdownTimeout` plus about 3 s.
   */
  stop(): Promise<void>;
  /** A snapshot of the driver's counters. */
  stats(): DriverStats;
  /** Whether it runs and whether it takes events (see `healthHandler`). */
  health(): DriverHealth;
  /** Base URL of the health server when option `health` (or `CONVEYOR_HEALTH_PORT`) is set. */
  readonly healthUrl: string | undefined;
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
export async function serve(driver: Driver, options?: ServeOptions): Promise<void> {
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
 * import { type Driver, startDriver } from "@conveyor/driver";
 * const driver: Driver = { name: "echo", resources: ["pipeline"], reconcile() {} };
 * const running = await startDriver(driver, { handleSignals: false });
 * console.log(running.stats());
 * await running.stop();
 * ```
 */
export async function startDriver(driver: Driver, options?: ServeOptions): Promise<RunningDriver> {
  checkDriver(driver);
  const o = resolveOptions(options);
  await ensureLogging(o);
  const log = getLogger(["conveyor", "driver", driver.name, "runtime"]);
  const identity = o.auth === undefined
    ? undefined
    : isIdentity(o.auth)
    ? o.auth
    : await createIdentity(o.auth);
  if (identity) checkClientAuth(identity);
  const client = o.client ??
    (o.apiUrl ? new Client({ baseUrl: o.apiUrl, auth: identity }) : undefined);
  const nc = await connectWithin(driver.name, o, identity, log);
  log.info("connected to NATS at {server}", { server: nc.getServer() });
  try {
    const jsm = await jetstreamManager(nc);
    await checkStream(jsm);
    const wants = consumerWants(driver, o);
    const info = await ensureConsumer(jsm, wants, o.consumerPolicy, log);
    const js = jetstream(nc);
    const consumer = await bindConsumer(js, driver.name);
    const runtime = new Runtime({ driver, o, nc, js, jsm, consumer, wants, log, client });
    let server: HealthServer | undefined;
    if (o.health) {
      try {
        server = await serveHealth(healthHandler(runtime), o.health.port, o.health.hostname);
      } catch (err) {
        throw new ConfigError(
          "health",
          `cannot serve health checks on ${o.health.hostname}:${o.health.port}: ${errorText(err)}`,
          { cause: err },
        );
      }
      log.info("health checks on {url}/healthz and {url}/readyz", { url: server.url });
    }
    runtime.start(fleetOf(info.config), countsOf(info), server);
    return runtime.handle();
  } catch (err) {
    await nc.close().catch(() => {});
    throw err;
  }
}

/** The consumer's pending counts, for the gauges. */
interface ConsumerCounts {
  pending: number;
  ackPending: number;
}

function countsOf(info: { num_pending: number; num_ack_pending: number }): ConsumerCounts {
  return { pending: info.num_pending, ackPending: info.num_ack_pending };
}

function bindConsumer(js: JetStreamClient, name: string): Promise<Consumer> {
  return js.consumers.get(MESSAGES_STREAM, name).catch((err) => {
    throw new ConsumerError(name, `cannot bind to consumer "${name}": ${errorText(err)}`, {
      cause: err,
    });
  });
}

function isIdentity(x: AuthOptions | Identity): x is Identity {
  return typeof (x as Identity).token === "function";
}

async function connectWithin(
  name: string,
  o: ResolvedOptions,
  identity: Identity | undefined,
  log: Logger,
): Promise<NatsConnection> {
  const deadline = Date.now() + o.connectTimeout;
  // ws:// and wss:// go through the WebSocket transport (edge runtimes, or a
  // NATS reachable through an HTTP proxy only); nats:// and tls:// through TCP.
  const ws = transportOf(o.servers) === "ws";
  let last: unknown;
  for (let i = 0;; i++) {
    o.signal?.throwIfAborted();
    try {
      return await openNats({
        servers: o.servers,
        name: `conveyor-driver:${name}`,
        maxReconnectAttempts: -1,
        reconnectTimeWait: 1_000,
        // Async stack traces cost an Error per request; a fifth of the
        // client's CPU per event in bench/throughput.ts.
        noAsyncTraces: true,
        // The operator's identity doubles as the NATS client certificate
        // (over TCP: a WebSocket client cannot present one).
        ...(identity && !ws ? { tls: identity.tls() } : {}),
        ...o.nats,
        timeout: Math.max(1_000, Math.min(5_000, deadline - Date.now())),
      });
    } catch (err) {
      last = err;
      // Wrong credentials, or a transport this process cannot mix, do not fix
      // themselves by waiting.
      if (err instanceof ConfigError) throw err;
      if (/authori[sz]ation|authentication/i.test(errorText(err))) break;
    }
    const wait = Math.min(2_000, 100 * 2 ** i);
    if (Date.now() + wait >= deadline) break;
    log.info("cannot connect to NATS at {servers} yet ({error}); retrying in {delay} ms", {
      servers: o.servers,
      error: errorText(last),
      delay: wait,
    });
    await pause(wait, o.signal);
  }
  // A server that requires client certificates drops a client without one
  // mid-handshake, which nats.js reports as a timeout or a TLS error.
  const maybeTls = /tls|certificate|handshake|ssl|timeout/i.test(errorText(last));
  throw new ConnectError(o.servers, {
    cause: last,
    hint: maybeTls && !identity
      ? "if the server requires client certificates, give the driver its identity: " +
        "option auth, or CONVEYOR_CERT_FILE, CONVEYOR_KEY_FILE and CONVEYOR_CA_FILE"
      : undefined,
  });
}

// ---------------------------------------------------------------------------
// The process: one exit for every runtime in it.

/** Runtimes started in this process and not yet stopped. */
const live = new Set<Runtime>();
/** Stopped runtimes whose reconciles ignored `ctx.signal` and still run. */
const stuck = new Set<Runtime>();
let exitRequested = false;

/**
 * After a signal-driven shutdown, a reconcile that ignores `ctx.signal` would
 * keep the process alive until it is killed. Exit, but only once every
 * runtime in the process has stopped (another driver may still be working).
 */
function exitWhenAllStopped(log: Logger): void {
  if (!exitRequested || live.size > 0 || stuck.size === 0) return;
  log.warn(
    "reconcile(s) ignoring ctx.signal still run after every driver stopped; their events " +
      "were handed back; exiting",
  );
  setTimeout(() => process.exit(0), 100);
}

// ---------------------------------------------------------------------------
// The runtime.

/** How often a running instance re-reads its consumer. */
const CONSUMER_CHECK_MS = 10_000;
/** How long the shutdown gives the last settles after the abort grace. */
const SETTLE_GRACE_MS = 500;
/** How long the shutdown waits for hand-backs once settling is cut short. */
const HAND_BACK_MS = 500;
/** How long draining the connection may take at the end of a shutdown. */
const DRAIN_MS = 1_000;

interface RuntimeInit {
  driver: Driver;
  o: ResolvedOptions;
  nc: NatsConnection;
  js: JetStreamClient;
  jsm: JetStreamManager;
  consumer: Consumer;
  wants: ConsumerWants;
  log: Logger;
  client: Client | undefined;
}

class Runtime {
  readonly #init: RuntimeInit;
  readonly #deps: EventDeps;
  readonly #flow: Flow;
  /** Pulled events waiting for a slot, oldest first. */
  #queue: JsMsg[] = [];
  #consumer: Consumer;
  #fleet!: Fleet;
  /** Deliveries not yet settled. */
  readonly #pending = new Set<Promise<unknown>>();
  /** Reconciles (user code) not yet returned, hung ones included. */
  readonly #userCode = new Set<Promise<void>>();
  readonly #shutdownAc = new AbortController();
  readonly #forceAc = new AbortController();
  readonly #settleAc = new AbortController();
  #heartbeat?: ReturnType<typeof setInterval>;
  #heartbeatMs = 0;
  #check?: ReturnType<typeof setInterval>;
  #checking = false;
  #refreshing?: Promise<Fleet>;
  #stopping = false;
  #stopPromise?: Promise<void>;
  #fetch?: ConsumerMessages;
  #loop: Promise<void> = Promise.resolve();
  readonly #closed: Promise<void>;
  #resolveClosed!: () => void;
  #cleanups: (() => void)[] = [];
  #signalled = false;
  /** The NATS connection is up (follows its status events). */
  #connected = true;
  /** The last pull from the consumer succeeded. */
  #consuming = false;
  #closedDone = false;
  #healthServer?: HealthServer;
  /** The consumer's pending counts, as last read. */
  #consumerCounts?: ConsumerCounts;
  readonly #telemetry: Telemetry;

  constructor(init: RuntimeInit) {
    this.#init = init;
    this.#consumer = init.consumer;
    const { driver, o } = init;
    this.#flow = new Flow(o.concurrency);
    this.#telemetry = new Telemetry(driver.name, o.telemetry, {
      active: () => this.#deps.stats.inFlight,
      hung: () => this.#deps.stats.hung,
      queued: () => this.#flow.queued,
      consumer: () => this.#consumerCounts,
    });
    this.#deps = {
      driver,
      policy: o,
      reconcileTimeout: o.reconcileTimeout,
      settleTimeout: o.settleTimeout,
      nc: init.nc,
      pubacks: new PubAcks(init.nc, { inboxPrefix: o.nats.inboxPrefix }),
      log: init.log,
      client: init.client,
      stats: {
        received: 0,
        succeeded: 0,
        failed: 0,
        retried: 0,
        invalid: 0,
        skipped: 0,
        requeued: 0,
        inFlight: 0,
        hung: 0,
        queued: 0,
        settling: 0,
        startedAt: Date.now(),
      },
      types: new Set(driver.resources),
      events: driver.events ? new Set(driver.events) : undefined,
      fleet: () => this.#fleet,
      refreshFleet: () => this.#refreshFleet(),
      running: new Map(),
      inProgress: new Set(),
      confirming: new Set(),
      working: new Set(),
      memory: new ResultMemory(10_000, 90_000),
      shutdown: this.#shutdownAc.signal,
      force: this.#forceAc.signal,
      interrupts: new Set(),
      settleDeadline: this.#settleAc.signal,
      telemetry: this.#telemetry,
    };
    this.#closed = new Promise((r) => (this.#resolveClosed = r));
    const interrupt = (force: boolean) => () => {
      for (const i of [...this.#deps.interrupts]) i(force);
    };
    this.#shutdownAc.signal.addEventListener("abort", interrupt(false), { once: true });
    this.#forceAc.signal.addEventListener("abort", interrupt(true), { once: true });
    // Every event's flush may wait on this one: no "possible leak" warning.
    setMaxListeners(0, this.#settleAc.signal);
  }

  get #log(): Logger {
    return this.#init.log;
  }

  start(fleet: Fleet, pending: ConsumerCounts, healthServer?: HealthServer): void {
    this.#consumerCounts = pending;
    const { signal, handleSignals } = this.#init.o;
    this.#healthServer = healthServer;
    live.add(this);
    void this.#watchConnection();
    if (signal) {
      const onAbort = () => void this.stop();
      if (signal.aborted) queueMicrotask(onAbort);
      else {
        signal.addEventListener("abort", onAbort, { once: true });
        this.#cleanups.push(() => signal.removeEventListener("abort", onAbort));
      }
    }
    if (handleSignals) this.#installSignalHandlers();
    this.#follow(fleet);
    this.#check = setInterval(() => void this.#checkConsumer(), CONSUMER_CHECK_MS);
    this.#log.info("driver {driver} consuming {subjects} with concurrency {concurrency}", {
      driver: this.#init.driver.name,
      subjects: this.#init.wants.subjects,
      concurrency: this.#init.o.concurrency,
    });
    this.#loop = this.#pullLoop();
  }

  handle(): RunningDriver {
    return {
      name: this.#init.driver.name,
      closed: this.#closed,
      stop: () => this.stop(),
      stats: () => ({
        ...this.#deps.stats,
        queued: this.#flow.queued,
        settling: this.#flow.settling,
      }),
      health: () => this.health(),
      healthUrl: this.#healthServer?.url,
      [Symbol.asyncDispose]: () => this.stop(),
    };
  }

  /** Whether the runtime runs and takes events. */
  health(): DriverHealth {
    const alive = !this.#closedDone;
    const connected = alive && this.#connected && !this.#init.nc.isClosed();
    const consuming = alive && this.#consuming;
    return {
      alive,
      ready: connected && consuming && !this.#stopping,
      connected,
      consuming,
      stopping: this.#stopping,
    };
  }

  /** Follows the connection's status: down on a disconnect, up on a reconnect. */
  async #watchConnection(): Promise<void> {
    try {
      for await (const s of this.#init.nc.status()) {
        switch (s.type) {
          case "disconnect":
            this.#connected = false;
            if (!this.#stopping) {
              this.#log.warn("disconnected from NATS at {server}; reconnecting", {
                server: s.server,
              });
            }
            break;
          case "reconnect":
            this.#connected = true;
            this.#log.info("reconnected to NATS at {server}", { server: s.server });
            break;
          case "ldm":
            this.#log.warn("NATS at {server} is entering lame duck mode (shutting down)", {
              server: s.server,
            });
            break;
          case "error":
            this.#log.warn("NATS reported an error: {error}", {
              error: errorText(s.error),
              cause: s.error,
            });
            break;
          case "slowConsumer":
            this.#log.warn("slow consumer on {subject}: {pending} messages pending", {
              subject: s.sub.getSubject(),
              pending: s.pending,
            });
            break;
        }
      }
    } catch { /* closed */ }
  }

  /** Applies the consumer's current settings: heartbeats every third of its ack_wait. */
  #follow(fleet: Fleet): void {
    this.#fleet = fleet;
    const ms = Math.max(100, Math.floor(fleet.ackWaitMs / 3));
    this.#deps.memory.ttl = Math.max(60_000, fleet.ackWaitMs * 3);
    if (ms === this.#heartbeatMs) return;
    this.#heartbeatMs = ms;
    clearInterval(this.#heartbeat);
    // One timer for all in-flight messages rather than one per message.
    this.#heartbeat = setInterval(() => {
      for (const m of this.#deps.working) {
        try {
          m.working();
        } catch { /* reconnecting: the next beat or the ack will do */ }
      }
    }, ms);
  }

  /** Reads the consumer now; concurrent callers share one read. Never rejects. */
  #refreshFleet(): Promise<Fleet> {
    this.#refreshing ??= readConsumer(this.#init.jsm, this.#init.driver.name)
      .then((info) => {
        if (info) this.#follow(fleetOf(info.config));
        return this.#fleet;
      }, () => this.#fleet)
      .finally(() => (this.#refreshing = undefined));
    return this.#refreshing;
  }

  /**
   * Re-reads the consumer: follows its ack_wait and events, recreates it when
   * deleted, and widens it again when another instance narrowed it.
   */
  async #checkConsumer(): Promise<void> {
    if (this.#checking || this.#stopping) return;
    this.#checking = true;
    const { jsm, js, wants, driver } = this.#init;
    try {
      this.#deps.memory.prune();
      const info = await readConsumer(jsm, driver.name);
      if (info) this.#consumerCounts = countsOf(info);
      if (info && planConsumer(info.config, wants, "widen").action === "keep") {
        this.#follow(fleetOf(info.config));
        return;
      }
      if (info) {
        this.#log.warn(
          "consumer {name} no longer covers this instance (changed by another one?): widening it",
          { name: driver.name },
        );
      }
      const fixed = await ensureConsumer(jsm, wants, "widen", this.#log);
      this.#follow(fleetOf(fixed.config));
      if (!info) {
        this.#consumer = await bindConsumer(js, driver.name);
        this.#log.info("consumer {name} recreated", { name: driver.name });
      }
    } catch (err) {
      // NATS down, say: the next round will do.
      this.#log.debug("checking consumer {name} failed: {error}", {
        name: driver.name,
        error: errorText(err),
      });
    } finally {
      this.#checking = false;
    }
  }

  #installSignalHandlers(): void {
    let count = 0;
    const onSignal = (sig: string) => {
      count++;
      this.#signalled = true;
      if (count === 1) {
        this.#log.info("{signal} received: shutting down gracefully", { signal: sig });
        void this.stop();
      } else {
        this.#log.warn("{signal} received again: stopping now", { signal: sig });
        this.#forceAc.abort();
      }
    };
    const onInt = () => onSignal("SIGINT");
    const onTerm = () => onSignal("SIGTERM");
    process.on("SIGINT", onInt);
    process.on("SIGTERM", onTerm);
    this.#cleanups.push(() => {
      process.off("SIGINT", onInt);
      process.off("SIGTERM", onTerm);
    });
  }

  async #pullLoop(): Promise<void> {
    let failures = 0;
    while (!this.#stopping) {
      const wanted = this.#flow.wanted();
      if (wanted === 0) {
        await this.#flow.changed();
        continue;
      }
      try {
        // As many as the free slots, plus a queue while reconciles are short
        // (flow.ts): a slow job holds back no other, none waits unseen.
        const iter = await this.#consumer.fetch({
          max_messages: wanted,
          // nats.js gives up on a pull the server lost (its node killed, the
          // consumer leader moved) after two idle heartbeats of expires/2,
          // and after a reconnect waits about `expires` before pulling again:
          // with 30 s a driver sat idle 15-45 s after each failover of a cluster.
          expires: 5_000,
        });
        this.#fetch = iter;
        this.#consuming = true;
        if (this.#stopping) iter.stop();
        for await (const m of iter) {
          failures = 0;
          if (this.#stopping) {
            // Arrived after the shutdown began: straight back to the stream.
            m.nak();
            continue;
          }
          this.#queue.push(m);
          // Kept alive from now on: a queued event may wait for a slot.
          this.#deps.working.add(m);
          this.#flow.pulled();
          this.#pump();
        }
      } catch (err) {
        if (this.#stopping) break;
        this.#consuming = false;
        failures++;
        this.#log.warn("pulling messages failed ({attempt}): {error}", {
          attempt: failures,
          error: errorText(err),
        });
        // A deleted consumer shows as "consumer deleted", "no responders"
        // or missed heartbeats, depending on when it went: ask the server.
        await this.#checkConsumer();
        await pause(Math.min(5_000, 250 * 2 ** Math.min(failures, 5)), this.#forceAc.signal);
      } finally {
        this.#fetch = undefined;
      }
    }
  }

  /** Starts queued events while slots are free and settling is below its bound. */
  #pump(): void {
    while (!this.#stopping && this.#flow.canStart()) {
      this.#flow.started();
      this.#start(this.#queue.shift()!);
    }
  }

  /**
   * Runs one event. Its slot is freed when its reconcile's code has really
   * returned (hung code keeps it), not when its logs and result are stored:
   * the next reconcile runs while this one settles.
   */
  #start(m: JsMsg): void {
    const began = performance.now();
    let reconciled = false;
    const settled = handleDelivery(m, this.#deps, (userDone) => {
      reconciled = true;
      this.#flow.reconciled(performance.now() - began);
      this.#userCode.add(userDone);
      void userDone.finally(() => {
        this.#userCode.delete(userDone);
        this.#flow.returned();
        this.#pump();
      });
    });
    this.#pending.add(settled);
    void settled.finally(() => {
      this.#pending.delete(settled);
      this.#deps.working.delete(m);
      this.#flow.settled(reconciled);
      this.#pump();
    });
  }

  /** Hands back the events still queued: a shutdown does not start them. */
  #dropQueue(): void {
    for (const m of this.#queue.splice(0)) {
      this.#deps.working.delete(m);
      this.#flow.dropped();
      try {
        m.nak();
      } catch { /* connection gone: ack_wait redelivers it */ }
    }
  }

  stop(): Promise<void> {
    this.#stopPromise ??= this.#shutdown();
    return this.#stopPromise;
  }

  /**
   * Stops pulling, waits up to `shutdownTimeout` for in-flight events, then
   * aborts their reconciles (a grace to return), then hands back what is not
   * settled, drains and closes: bounded by `shutdownTimeout` plus 3.1 s (abort
   * grace 1 s, settle grace 0.5 s, hand-backs 0.5 s, drain 1 s, loop 0.1 s).
   * A second signal (`force`) skips the waiting.
   */
  async #shutdown(): Promise<void> {
    const { o, driver, nc } = this.#init;
    const force = this.#forceAc.signal;
    this.#stopping = true;
    this.#flow.wake();
    this.#fetch?.stop();
    const queued = this.#queue.length;
    this.#dropQueue();
    this.#log.info("shutting down: stopped pulling, handed back {queued} queued event(s)", {
      queued,
    });
    if (this.#pending.size > 0) {
      this.#log.info("waiting up to {timeout} ms for {count} in-flight event(s)", {
        timeout: o.shutdownTimeout,
        count: this.#pending.size,
      });
    }
    await this.#settled(o.shutdownTimeout, force);
    if (this.#pending.size > 0) {
      // Stop waiting: reconciles get ShutdownError and a grace to return.
      this.#log.warn(
        "shutting down: aborting {count} reconcile(s) still running (ctx.signal, ShutdownError)",
        { count: this.#deps.stats.inFlight, forced: force.aborted },
      );
      this.#shutdownAc.abort(new ShutdownError());
      await this.#settled(ABORT_GRACE_MS + SETTLE_GRACE_MS, force);
    }
    // Whatever is still storing logs or results goes back to the stream.
    if (this.#pending.size > 0) {
      this.#log.warn("shutting down: handing back {count} event(s) not settled in time", {
        count: this.#pending.size,
      });
    }
    this.#settleAc.abort();
    await this.#settled(HAND_BACK_MS);
    // The pull loop ended with the fetch stopped; draining ends it in any case.
    await Promise.race([this.#loop.catch(() => {}), pause(100)]);
    clearInterval(this.#heartbeat);
    clearInterval(this.#check);
    this.#deps.pubacks.close();
    const drained = nc.drain().then(() => true, () => false);
    if (!await Promise.race([drained, pause(DRAIN_MS).then(() => false)])) {
      this.#log.debug("shutting down: draining the connection took over {ms} ms; closing it", {
        ms: DRAIN_MS,
      });
      await nc.close().catch(() => {});
    }
    // Signal handlers stay until here: a second signal means "stop now".
    for (const c of this.#cleanups.splice(0)) c();
    live.delete(this);
    this.#telemetry.close();
    await this.#healthServer?.close();
    this.#closedDone = true;
    this.#log.info("driver {driver} stopped", { driver: driver.name, ...this.#deps.stats });
    if (this.#userCode.size > 0) {
      stuck.add(this);
      void Promise.all(this.#userCode).then(() => stuck.delete(this));
    }
    if (this.#signalled && o.exitProcess) exitRequested = true;
    exitWhenAllStopped(this.#log);
    this.#resolveClosed();
  }

  /**
   * Waits until no delivery is unsettled and no ack awaits its confirmation,
   * `ms` passed, or `signal` aborted.
   */
  async #settled(ms: number, signal?: AbortSignal): Promise<void> {
    const busy = () => this.#pending.size > 0 || this.#deps.confirming.size > 0;
    if (!busy() || signal?.aborted) return;
    const ac = new AbortController();
    const onAbort = () => ac.abort();
    signal?.addEventListener("abort", onAbort, { once: true });
    const timer = setLongTimeout(() => ac.abort(), ms);
    try {
      while (busy() && !ac.signal.aborted) {
        await Promise.race([
          Promise.all([...this.#pending, ...this.#deps.confirming]),
          new Promise((r) => ac.signal.addEventListener("abort", r, { once: true })),
        ]);
      }
    } finally {
      timer.clear();
      signal?.removeEventListener("abort", onAbort);
    }
  }
}
