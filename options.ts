/**
 * Options of `serve` and `startDriver`, their defaults and the environment
 * variables a deployment sets them with.
 *
 * @module
 */
import type { NodeConnectionOptions } from "@nats-io/transport-node";
import { MAX_TIMER_MS, readEnv } from "./_util.ts";
import { ConfigError } from "./errors.ts";
import { authFromEnv, type AuthOptions, type Identity } from "./auth.ts";
import type { Client } from "./client.ts";
import type { TelemetryOptions } from "./telemetry.ts";

/**
 * How the runtime connects, consumes, retries and shuts down. Every field is
 * optional; an explicit option wins over its environment variable, which wins
 * over the default.
 *
 * @example
 * ```ts
 * import { type Driver, serve } from "@conveyor/driver";
 * const driver: Driver = { name: "builder", resources: ["app"], reconcile() {} };
 * await serve(driver, {
 *   servers: "nats://nats.ci.internal:4222",
 *   concurrency: 4,
 *   maxAttempts: 3,
 *   reconcileTimeout: 10 * 60_000,
 * });
 * ```
 */
export interface ServeOptions {
  /**
   * NATS server URL(s). Env `NATS_URL` (comma-separated).
   * @default "nats://127.0.0.1:4222"
   */
  servers?: string | string[];
  /**
   * Reconciles running at once in this instance. The runtime pulls as many
   * messages as it has free slots, and ahead of them only what the slots get
   * through in about 100 ms at the pace of recent reconciles; a slot is free
   * again when the reconcile returns, its logs and result stored meanwhile.
   * Env `CONVEYOR_CONCURRENCY`.
   * @default 16
   */
  concurrency?: number;
  /**
   * Aborting this signal starts a graceful shutdown. When absent, SIGINT and
   * SIGTERM do (see {@link ServeOptions.handleSignals}).
   */
  signal?: AbortSignal;
  /**
   * Whether SIGINT and SIGTERM start a graceful shutdown when no `signal` is
   * given. A second signal during shutdown stops at once.
   * @default true
   */
  handleSignals?: boolean;
  /**
   * After a shutdown started by SIGINT or SIGTERM, whether to end the
   * process (exit code 0) when a reconcile that ignores `ctx.signal` would
   * keep it alive. It happens only once every driver started in the process
   * has stopped; their events were handed back first.
   * @default true when the runtime handles signals
   */
  exitProcess?: boolean;
  /**
   * How long a graceful shutdown waits for in-flight reconciles, in ms; then
   * their `ctx.signal` is aborted and their events go back to the stream.
   * `stop()` returns within this plus about 3 s, whatever the state of NATS.
   * `Infinity` waits for ever. Env `CONVEYOR_SHUTDOWN_TIMEOUT` (ms, or with a
   * unit: `30s`, `2m`).
   * @default 30_000
   */
  shutdownTimeout?: number;
  /**
   * Limit for one reconcile, in ms; 0 or `Infinity` means none. When
   * exceeded, `ctx.signal` aborts with a `ReconcileTimeoutError` and the
   * attempt counts as failed. A reconcile that ignores the signal keeps its
   * concurrency slot until it really returns (`stats().hung`).
   * Env `CONVEYOR_RECONCILE_TIMEOUT`.
   * @default 0
   */
  reconcileTimeout?: number;
  /**
   * How long storing one event's logs and result is retried (NATS down, a
   * stream electing its leader) before the event is handed back with a delay,
   * in ms. The event is kept from redelivery meanwhile. `Infinity` retries
   * until stored or shut down. Env `CONVEYOR_SETTLE_TIMEOUT`.
   * @default 60_000
   */
  settleTimeout?: number;
  /**
   * Deliveries of one event before it is reported as failed and terminated.
   * Every delivery counts: failed attempts, hand-backs on shutdown, events
   * this instance does not handle, redeliveries after a crash. The
   * consumer's `max_deliver` is set a few above it as a server-side backstop.
   * Env `CONVEYOR_MAX_ATTEMPTS`.
   * @default 5
   */
  maxAttempts?: number;
  /**
   * Delay before the first retry of a failed reconcile, in ms; doubles with
   * each attempt up to `retryMaxDelay`, with ±20% jitter.
   * Env `CONVEYOR_RETRY_DELAY`.
   * @default 1_000
   */
  retryDelay?: number;
  /**
   * Upper bound of the retry delay, in ms. Env `CONVEYOR_RETRY_MAX_DELAY`.
   * @default 60_000
   */
  retryMaxDelay?: number;
  /**
   * The consumer's `ack_wait`, in ms: a delivery not acknowledged within it
   * goes to another instance. The runtime signals progress every third of
   * the consumer's current `ack_wait` while a reconcile runs, so long jobs
   * are not redelivered. A start never lowers it (see `consumerPolicy`).
   * Env `CONVEYOR_ACK_WAIT`.
   * @default 30_000
   */
  ackWait?: number;
  /**
   * The consumer's `max_ack_pending`: deliveries in flight across all
   * instances of the driver. A start never lowers it (see `consumerPolicy`).
   * Env `CONVEYOR_MAX_ACK_PENDING`.
   * @default 1_000
   */
  maxAckPending?: number;
  /**
   * How a start changes a consumer that exists with other settings, as
   * when instances of two versions of the driver share it during a rolling
   * deploy. `"widen"`: take the union of the resource types and events, the
   * larger `ack_wait`, `max_ack_pending` and `max_deliver`; never narrow
   * anything. `"replace"`: set exactly this instance's settings, once at
   * start (use it to remove a resource type after every instance runs the
   * new version). Env `CONVEYOR_CONSUMER_POLICY`.
   * @default "widen"
   */
  consumerPolicy?: ConsumerPolicy;
  /**
   * How long to keep trying to reach NATS at start-up, in ms, before `serve`
   * rejects with a `ConnectError`; `Infinity` tries for ever. Once
   * connected, the runtime reconnects for ever. Env `CONVEYOR_CONNECT_TIMEOUT`.
   * @default 10_000
   */
  connectTimeout?: number;
  /**
   * Whether the runtime sets up a console sink for its LogTape categories
   * (`["conveyor", ...]`) when the application has not configured LogTape.
   * Env `CONVEYOR_LOG_LEVEL` picks the level of that sink.
   * @default true
   */
  configureLogging?: boolean;
  /**
   * Extra options for nats.js `connect()` (its `NodeConnectionOptions`:
   * `user`, `pass`, `token`, `authenticator`, `tls`, `name`…). Env
   * `NATS_USER`/`NATS_PASSWORD` and `NATS_TOKEN` fill `user`/`pass` and
   * `token` when not set here.
   */
  nats?: Record<string, unknown>;
  /**
   * The driver's identity, issued by the Conveyor operator: certificate
   * chain, key and CA as files or PEM strings, or an `Identity` made with
   * `createIdentity`. It secures NATS with mutual TLS and signs the API
   * client's tokens. Env `CONVEYOR_CERT_FILE`, `CONVEYOR_KEY_FILE`,
   * `CONVEYOR_CA_FILE`.
   */
  auth?: AuthOptions | Identity;
  /**
   * Base URL of the Conveyor API. When set (or env `CONVEYOR_API_URL`),
   * reconciles get `ctx.client`, authenticated with `auth`.
   */
  apiUrl?: string;
  /** A ready API client for `ctx.client`; wins over `apiUrl`. */
  client?: Client;
  /**
   * Serves the health probes (`/healthz`, `/readyz`; see `healthHandler`) over
   * HTTP on this port (0: any free one; `RunningDriver.healthUrl` tells
   * which) and hostname (default `0.0.0.0`). Env `CONVEYOR_HEALTH_PORT`.
   * Off by default.
   */
  health?: { port: number; hostname?: string };
  /**
   * Where spans and metrics go (see the README's "Observability"): the
   * global OpenTelemetry providers and propagator unless given here. Without
   * an OpenTelemetry SDK set up, tracing and metrics cost next to nothing.
   */
  telemetry?: TelemetryOptions;
}

/** How a start changes an existing consumer: see {@link ServeOptions.consumerPolicy}. */
export type ConsumerPolicy = "widen" | "replace";

/** Options with every default applied. */
export interface ResolvedOptions {
  servers: string[];
  concurrency: number;
  signal?: AbortSignal;
  handleSignals: boolean;
  exitProcess: boolean;
  consumerPolicy: ConsumerPolicy;
  shutdownTimeout: number;
  reconcileTimeout: number;
  settleTimeout: number;
  maxAttempts: number;
  retryDelay: number;
  retryMaxDelay: number;
  ackWait: number;
  maxAckPending: number;
  connectTimeout: number;
  configureLogging: boolean;
  logLevel: LogLevel;
  nats: Partial<NodeConnectionOptions>;
  auth?: AuthOptions | Identity;
  apiUrl?: string;
  client?: Client;
  health?: { port: number; hostname: string };
  telemetry: TelemetryOptions;
}

/** Log levels understood by `CONVEYOR_LOG_LEVEL`. */
export type LogLevel =
  | "trace"
  | "debug"
  | "info"
  | "warning"
  | "error"
  | "fatal";

/** Environment variable names, by option. */
export const ENV = {
  servers: "NATS_URL",
  concurrency: "CONVEYOR_CONCURRENCY",
  shutdownTimeout: "CONVEYOR_SHUTDOWN_TIMEOUT",
  reconcileTimeout: "CONVEYOR_RECONCILE_TIMEOUT",
  settleTimeout: "CONVEYOR_SETTLE_TIMEOUT",
  maxAttempts: "CONVEYOR_MAX_ATTEMPTS",
  retryDelay: "CONVEYOR_RETRY_DELAY",
  retryMaxDelay: "CONVEYOR_RETRY_MAX_DELAY",
  ackWait: "CONVEYOR_ACK_WAIT",
  maxAckPending: "CONVEYOR_MAX_ACK_PENDING",
  consumerPolicy: "CONVEYOR_CONSUMER_POLICY",
  connectTimeout: "CONVEYOR_CONNECT_TIMEOUT",
  logLevel: "CONVEYOR_LOG_LEVEL",
  apiUrl: "CONVEYOR_API_URL",
  healthPort: "CONVEYOR_HEALTH_PORT",
} as const;

const UNITS: Record<string, number> = {
  ms: 1,
  s: 1_000,
  m: 60_000,
  h: 3_600_000,
};

/**
 * Parses a duration: a number of milliseconds, or a number with a unit
 * (`ms`, `s`, `m`, `h`), e.g. `"1500"`, `"30s"`, `"2.5m"`; `"Infinity"` is
 * `Infinity` (no limit, where an option allows it).
 *
 * @example
 * ```ts
 * import { parseDuration } from "@conveyor/driver";
 * parseDuration("2m"); // 120000
 * parseDuration("soon"); // undefined
 * ```
 */
export function parseDuration(text: string): number | undefined {
  if (/^\s*infinity\s*$/i.test(text)) return Infinity;
  const m = /^(\d+(?:\.\d+)?)\s*(ms|s|m|h)?$/.exec(text.trim());
  if (!m) return undefined;
  return Math.round(Number(m[1]) * UNITS[m[2] ?? "ms"]);
}

interface Bounds {
  /** A duration in ms (else an integer). */
  duration?: boolean;
  min: number;
  /** Whether `Infinity` means "no limit" for this option. */
  unbounded?: boolean;
}

function pick(
  field: Exclude<keyof typeof ENV, "consumerPolicy">,
  given: number | undefined,
  fallback: number,
  opts: Bounds,
): number {
  let value = given;
  let source = `option ${field}`;
  if (value === undefined) {
    const raw = readEnv(ENV[field]);
    if (raw !== undefined) {
      source = `${ENV[field]}=${raw}`;
      value = opts.duration ? parseDuration(raw) : Number(raw);
      if (value === undefined || Number.isNaN(value)) {
        throw new ConfigError(
          field,
          `${source} is not a ${opts.duration ? "duration (e.g. 1500, 30s, 2m)" : "number"}`,
        );
      }
    }
  }
  if (value === undefined) return fallback;
  if (typeof value !== "number" || Number.isNaN(value)) {
    throw new ConfigError(field, `${source} must be a number`);
  }
  if (value === Infinity && opts.unbounded) return value;
  // Timers of 2^31 ms or more fire at once on every runtime: refuse them
  // rather than let "720h" mean "now".
  const max = opts.duration ? MAX_TIMER_MS : Number.MAX_SAFE_INTEGER;
  if (
    !Number.isFinite(value) || value < opts.min || value > max ||
    (!opts.duration && !Number.isInteger(value))
  ) {
    const range = opts.duration
      ? `a duration between ${opts.min} ms and ${max} ms (24.8 days)${
        opts.unbounded ? ", or Infinity for no limit" : ""
      }`
      : `an integer >= ${opts.min}`;
    throw new ConfigError(field, `${source} must be ${range}`);
  }
  return value;
}

const LEVELS: readonly LogLevel[] = [
  "trace",
  "debug",
  "info",
  "warning",
  "error",
  "fatal",
];

/** Applies environment variables and defaults; throws `ConfigError` on bad values. */
export function resolveOptions(options: ServeOptions = {}): ResolvedOptions {
  const serversGiven = options.servers ?? readEnv(ENV.servers)?.split(",") ??
    "nats://127.0.0.1:4222";
  const servers = (Array.isArray(serversGiven) ? serversGiven : [serversGiven])
    .map((s) => s.trim()).filter((s) => s !== "");
  if (servers.length === 0) {
    throw new ConfigError("servers", "no NATS server URL given");
  }

  const rawLevel = (readEnv(ENV.logLevel) ?? "info").toLowerCase();
  const logLevel = (rawLevel === "warn" ? "warning" : rawLevel) as LogLevel;
  if (!LEVELS.includes(logLevel)) {
    throw new ConfigError(
      "logLevel",
      `${ENV.logLevel}=${rawLevel} is not one of ${LEVELS.join(", ")}`,
    );
  }

  const nats = { ...options.nats } as Partial<NodeConnectionOptions>;
  if (nats.user === undefined && readEnv("NATS_USER")) {
    nats.user = readEnv("NATS_USER");
    nats.pass = readEnv("NATS_PASSWORD");
  }
  if (nats.token === undefined && readEnv("NATS_TOKEN")) {
    nats.token = readEnv("NATS_TOKEN");
  }

  const consumerPolicy = options.consumerPolicy ?? readEnv(ENV.consumerPolicy) ?? "widen";
  if (consumerPolicy !== "widen" && consumerPolicy !== "replace") {
    throw new ConfigError(
      "consumerPolicy",
      `${
        options.consumerPolicy === undefined
          ? `${ENV.consumerPolicy}=${consumerPolicy}`
          : "option consumerPolicy"
      } must be "widen" or "replace"`,
    );
  }
  const handleSignals = options.handleSignals ?? options.signal === undefined;

  const resolved: ResolvedOptions = {
    servers,
    concurrency: pick("concurrency", options.concurrency, 16, { min: 1 }),
    signal: options.signal,
    handleSignals,
    exitProcess: options.exitProcess ?? handleSignals,
    consumerPolicy,
    shutdownTimeout: pick("shutdownTimeout", options.shutdownTimeout, 30_000, {
      duration: true,
      min: 0,
      unbounded: true,
    }),
    reconcileTimeout: pick("reconcileTimeout", options.reconcileTimeout, 0, {
      duration: true,
      min: 0,
      unbounded: true,
    }),
    settleTimeout: pick("settleTimeout", options.settleTimeout, 60_000, {
      duration: true,
      min: 0,
      unbounded: true,
    }),
    maxAttempts: pick("maxAttempts", options.maxAttempts, 5, { min: 1 }),
    retryDelay: pick("retryDelay", options.retryDelay, 1_000, {
      duration: true,
      min: 0,
    }),
    retryMaxDelay: pick("retryMaxDelay", options.retryMaxDelay, 60_000, {
      duration: true,
      min: 0,
    }),
    ackWait: pick("ackWait", options.ackWait, 30_000, {
      duration: true,
      min: 1_000,
    }),
    maxAckPending: pick("maxAckPending", options.maxAckPending, 1_000, {
      min: 1,
    }),
    connectTimeout: pick("connectTimeout", options.connectTimeout, 10_000, {
      duration: true,
      min: 0,
      unbounded: true,
    }),
    configureLogging: options.configureLogging ?? true,
    logLevel,
    nats,
    auth: options.auth ?? authFromEnv(),
    apiUrl: options.apiUrl ?? readEnv(ENV.apiUrl),
    client: options.client,
    health: resolveHealth(options.health),
    telemetry: options.telemetry ?? {},
  };
  return resolved;
}

function resolveHealth(given: ServeOptions["health"]): ResolvedOptions["health"] {
  const port = pick("healthPort", given?.port, -1, { min: 0 });
  if (port === -1) return undefined;
  if (port > 65_535) {
    throw new ConfigError("healthPort", `the health port must be between 0 and 65535, not ${port}`);
  }
  return { port, hostname: given?.hostname ?? "0.0.0.0" };
}
