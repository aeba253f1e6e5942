/**
 * The per-run logger handed to `reconcile`, and the runtime's default log
 * output (stderr, when the application has not configured LogTape).
 *
 * Every line becomes an SDD Log Entry published to JetStream `logs.{runid}`
 * (persisted by the server) and core NATS `live.logs.{runid}.{driver}` (live
 * streaming), and is mirrored to LogTape under `["conveyor", "driver", <name>]`.
 *
 * @module
 */
import {
  configure,
  getConfig,
  getLogger,
  getTextFormatter,
  type Logger,
  type Sink,
} from "@logtape/logtape";
import process from "node:process";
import { headers as natsHeaders, type MsgHdrs, type NatsConnection } from "@nats-io/transport-node";
import { pause, setLongTimeout } from "./_util.ts";
import { PublishError } from "./errors.ts";
import type { LogEntry } from "./types.ts";

/** Extra labels of a log line: carried in NATS headers and LogTape properties. */
export type Labels = Record<string, string | number | boolean>;

/** Severity of a log line; sent in the `Conveyor-Log-Level` header. */
export type Level = "debug" | "info" | "warning" | "error";

/**
 * Logger bound to one run of one driver.
 *
 * Lines are published in order without blocking the reconcile; the runtime
 * waits until all are confirmed by JetStream before it publishes the result.
 * Labels never enter the Log Entry JSON (the SDD schema allows no extra
 * fields): they travel as `Conveyor-Label-<key>` NATS headers and as LogTape
 * properties. Lines logged after `reconcile` returned are not stored (the
 * result is already on its way); they still reach LogTape.
 *
 * @example
 * ```ts
 * import { serve } from "@conveyor/driver";
 * await serve({
 *   name: "build",
 *   resources: ["app"],
 *   reconcile({ logger }) {
 *     logger.info("cloning", { repo: "github.com/acme/web" });
 *     const step = logger.with({ step: "compile" });
 *     step.warn("cache miss");
 *   },
 * });
 * ```
 */
export interface DriverLogger {
  /** The run this logger writes to. */
  readonly runId: string;
  /** Logs at `info` level (the SDD's `log(message, labels)`). */
  log(message: string, labels?: Labels): void;
  /** Logs at `debug` level. */
  debug(message: string, labels?: Labels): void;
  /** Logs at `info` level. */
  info(message: string, labels?: Labels): void;
  /** Logs at `warning` level. */
  warn(message: string, labels?: Labels): void;
  /** Logs at `error` level. */
  error(message: string, labels?: Labels): void;
  /** A logger for the same run that adds `labels` to every line. */
  with(labels: Labels): DriverLogger;
}

/** Publishes to JetStream and resolves when the message is stored. */
export interface JsPublisher {
  /** Publishes `data` with a `Nats-Msg-Id`; rejects when it is not stored. */
  publish(
    subject: string,
    data: Uint8Array,
    opts: { msgID: string; headers: MsgHdrs },
  ): Promise<unknown>;
  /**
   * Publishes a core NATS message without waiting (the live copy), in order
   * with `publish`; `nc.publish` is used when absent.
   */
  send?(subject: string, data: Uint8Array, headers: MsgHdrs): void;
}

/** What the runtime needs to publish a run's logs. */
export interface RunLogOptions {
  /** Open NATS connection (for `live.logs.*`). */
  nc: NatsConnection;
  /**
   * What publishes to JetStream (`logs.*`) and waits for the acknowledgement:
   * a nats.js `JetStreamClient`, or the runtime's `PubAcks`.
   */
  js: JsPublisher;
  /** Driver name. */
  driver: string;
  /** Run identifier (UUID). */
  runId: string;
  /** Pipeline of the resource, if any. */
  pipeline?: string;
  /** Labels added to every line, e.g. the event and resource. */
  labels?: Labels;
  /** Headers added to every line: the trace context (`traceparent`, `tracestate`). */
  headers?: Record<string, string>;
  /**
   * Rounds of retries of failed lines when `flush` is called without a
   * signal. @default 5
   */
  attempts?: number;
  /**
   * How long `js.publish` itself waits for an acknowledgement, in ms: a
   * `flush` deadline further away than this needs no timer of its own.
   * @default 5_000
   */
  publishTimeout?: number;
  /** Largest message the server takes, in bytes. @default the server's `max_payload` */
  maxPayload?: number;
  /**
   * Bytes of lines waiting for JetStream's confirmation; lines beyond it are
   * dropped (and counted) rather than held in memory. @default 64 MiB
   */
  maxBuffered?: number;
  /** Called once, with the line, when the first line is logged after `seal()`. */
  onLate?: (message: string) => void;
}

/** Bounds of {@link RunLog.flush}. */
export interface FlushOptions {
  /** Stops retrying when aborted. */
  signal?: AbortSignal;
  /** Stops retrying at this time (ms since the epoch). */
  deadline?: number;
}

/** A run's logger and the means to wait for its lines. */
export interface RunLog {
  /** The logger handed to reconcile. */
  logger: DriverLogger;
  /**
   * Waits until every line so far is stored by JetStream, retrying failed
   * publishes together (same `Nats-Msg-Id`, so a retry is never stored
   * twice) until they are stored, `signal` aborts, `deadline` (a time in ms
   * since the epoch) passes, or `attempts` rounds failed. Rejects with
   * `PublishError` when a line cannot be stored.
   */
  flush(options?: FlushOptions): Promise<void>;
  /** Stops publishing: lines logged from now on only reach LogTape. */
  seal(): void;
  /** Lines logged so far. */
  readonly count: number;
  /** Lines JetStream confirmed stored so far. */
  readonly stored: number;
  /** Lines not published: logged after `seal()` or over `maxBuffered`. */
  readonly dropped: number;
}

/** The fallback when the connection has no server info yet (the NATS default). */
const DEFAULT_MAX_PAYLOAD = 1024 * 1024;
/** Room for the protocol line and the headers nats.js adds (Nats-Msg-Id). */
const PAYLOAD_SLACK = 512;
/** Longest label value sent in a header; longer ones are cut with a marker. */
const MAX_LABEL_BYTES = 1024;

interface Line {
  data: Uint8Array;
  msgID: string;
  headers: ReturnType<typeof natsHeaders>;
  done: Promise<void>;
  failed?: unknown;
}

const encoder = new TextEncoder();
/** Tells this process's log line ids from every other's. */
const PROCESS_NONCE = crypto.randomUUID();
/** Run logs created in this process: with {@link PROCESS_NONCE}, a unique id each. */
let runLogs = 0;

/** The LogTape logger a driver's lines are mirrored to. */
export function driverCategory(driver: string): Logger {
  return getLogger(["conveyor", "driver", driver]);
}

function headerKey(label: string): string {
  // Header names are tokens: keep them to safe characters.
  return `Conveyor-Label-${label.replace(/[^A-Za-z0-9_-]/g, "_")}`;
}

// deno-lint-ignore no-control-regex
const CONTROL = /[\x00-\x08\x0a-\x1f\x7f]/g;

/** A label value fit for a NATS header: control characters escaped, length bounded. */
export function headerValue(value: unknown): string {
  let text = String(value);
  if (text.length > MAX_LABEL_BYTES) text = `${text.slice(0, MAX_LABEL_BYTES)}…[truncated]`;
  // CR or LF would end the header (nats.js refuses them): escape them and
  // their kin the way JSON does.
  return text.replace(
    CONTROL,
    (c) =>
      c === "\n"
        ? "\\n"
        : c === "\r"
        ? "\\r"
        : `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`,
  );
}

/**
 * Cuts `text` so that its JSON encoding (with a marker saying so) takes at
 * most `maxBytes` bytes of UTF-8. Used for log lines larger than the
 * server's `max_payload`.
 */
export function truncateForJson(text: string, maxBytes: number): string {
  const size = (s: string) => encoder.encode(JSON.stringify(s)).length;
  const original = encoder.encode(text).length;
  const marker = `… [truncated: ${original} bytes do not fit the server's max_payload]`;
  const budget = maxBytes - size(marker) + 2; // the quotes are counted once
  if (budget <= 2) return marker.slice(2);
  let lo = 0;
  let hi = Math.min(text.length, budget);
  while (lo < hi) {
    const mid = Math.ceil((lo + hi) / 2);
    if (size(text.slice(0, mid)) <= budget) lo = mid;
    else hi = mid - 1;
  }
  let cut = lo;
  // Do not split a surrogate pair.
  const last = text.charCodeAt(cut - 1);
  if (last >= 0xd800 && last <= 0xdbff) cut--;
  return text.slice(0, cut) + marker;
}

/**
 * Creates the logger for one run. Used by the runtime; exported for tests and
 * for tools that publish logs on behalf of a driver.
 */
export function createRunLog(opts: RunLogOptions): RunLog {
  const { nc, js, driver, runId, pipeline } = opts;
  const attempts = opts.attempts ?? 5;
  const publishTimeout = opts.publishTimeout ?? 5_000;
  const maxPayload = opts.maxPayload ?? nc.info?.max_payload ?? DEFAULT_MAX_PAYLOAD;
  const maxBuffered = opts.maxBuffered ?? 64 * 1024 * 1024;
  const mirror = driverCategory(driver);
  const jsSubject = `logs.${runId}`;
  const liveSubject = `live.logs.${runId}.${driver}`;
  // Unique per run log, so retries of a line dedupe and lines of
  // different attempts of the same run do not: a random id per process and
  // a count (one UUID per run cost more than the rest of createRunLog).
  const nonce = `${PROCESS_NONCE}.${++runLogs}`;
  const inflight = new Set<Line>();
  const failed: Line[] = [];
  let buffered = 0;
  let seq = 0;
  let dropped = 0;
  let stored = 0;
  let sealed = false;
  const extra = opts.headers;
  let extraBytes = 0;
  for (const k in extra) extraBytes += k.length + extra[k].length + 4;

  function emit(level: Level, message: string, labels: Labels): void {
    const text = String(message);
    // Mirror first: the text is a property, never a template (a `{` in it
    // would pull in a label).
    const props = { runId, ...labels, message: text };
    if (level === "warning") mirror.warn("{message}", props);
    else mirror[level]("{message}", props);
    if (sealed) {
      if (dropped++ === 0) opts.onLate?.(text);
      return;
    }

    const h = natsHeaders();
    h.set("Conveyor-Log-Level", level);
    if (extra) { for (const k in extra) h.set(k, extra[k]); }
    let headerBytes = 40 + extraBytes;
    for (const k in labels) {
      const value = headerValue(labels[k]);
      const key = headerKey(k);
      h.set(key, value);
      headerBytes += key.length + value.length * 3 + 4;
    }
    const entry: LogEntry = {
      runid: runId,
      driver,
      ...(pipeline ? { pipeline } : {}),
      timestamp: new Date().toISOString(),
      message: text,
    };
    let data = encoder.encode(JSON.stringify(entry));
    const room = maxPayload - PAYLOAD_SLACK - headerBytes;
    if (data.length > room) {
      const overhead = data.length - encoder.encode(JSON.stringify(text)).length;
      entry.message = truncateForJson(text, Math.max(0, room - overhead));
      data = encoder.encode(JSON.stringify(entry));
    }
    if (buffered + data.length > maxBuffered) {
      dropped++;
      return;
    }
    if (js.send) js.send(liveSubject, data, h);
    else {
      try {
        nc.publish(liveSubject, data, { headers: h });
      } catch {
        // Live streaming is best effort; the JetStream copy below is the record.
      }
    }
    buffered += data.length;
    send({ data, msgID: `${nonce}.${++seq}`, headers: h, done: Promise.resolve() });
  }

  /** Publishes a line to JetStream; a failed one waits in `failed` for `flush`. */
  function send(line: Line): void {
    inflight.add(line);
    line.done = js.publish(jsSubject, line.data, { msgID: line.msgID, headers: line.headers })
      .then(
        () => {
          inflight.delete(line);
          buffered -= line.data.length;
          stored++;
        },
        (err) => {
          inflight.delete(line);
          line.failed = err;
          failed.push(line);
        },
      );
  }

  function make(bound: Labels): DriverLogger {
    return {
      runId,
      log: (m, l) => emit("info", m, l ? { ...bound, ...l } : bound),
      debug: (m, l) => emit("debug", m, l ? { ...bound, ...l } : bound),
      info: (m, l) => emit("info", m, l ? { ...bound, ...l } : bound),
      warn: (m, l) => emit("warning", m, l ? { ...bound, ...l } : bound),
      error: (m, l) => emit("error", m, l ? { ...bound, ...l } : bound),
      with: (l) => make({ ...bound, ...l }),
    };
  }

  async function flush(options: FlushOptions = {}): Promise<void> {
    const { signal, deadline = Infinity } = options;
    for (let round = 0;; round++) {
      if (inflight.size > 0) {
        // The publishes end by themselves within publishTimeout: a deadline
        // beyond that needs no timer (one per event otherwise).
        const near = deadline < Date.now() + publishTimeout ? deadline : Infinity;
        await untilAborted(Promise.all([...inflight].map((l) => l.done)), signal, near);
      }
      if (failed.length === 0 && inflight.size === 0) return;
      const last = failed[failed.length - 1]?.failed;
      if (signal?.aborted || round + 1 >= attempts || Date.now() >= deadline) {
        throw new PublishError(jsSubject, { cause: last ?? signal?.reason });
      }
      // Every failed line again, together, after a pause that grows.
      await pause(Math.min(2_000, 100 * 2 ** round), signal);
      if (signal?.aborted) continue;
      for (const line of failed.splice(0)) send(line);
    }
  }

  return {
    logger: make(opts.labels ?? {}),
    flush,
    seal() {
      sealed = true;
    },
    get count() {
      return seq;
    },
    get stored() {
      return stored;
    },
    get dropped() {
      return dropped;
    },
  };
}

/** Waits for `p`, or until `signal` aborts or `deadline` passes (then resolves without it). */
function untilAborted(
  p: Promise<unknown>,
  signal: AbortSignal | undefined,
  deadline: number,
): Promise<unknown> {
  if (!signal && deadline === Infinity) return p;
  if (signal?.aborted || Date.now() >= deadline) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = deadline === Infinity ? undefined : setLongTimeout(done, deadline - Date.now());
    function done() {
      timer?.clear();
      signal?.removeEventListener("abort", done);
      resolve(undefined);
    }
    signal?.addEventListener("abort", done, { once: true });
    p.then(done, done);
  });
}

/**
 * Writes records as text lines to stderr (stdout stays the application's):
 * a line is one `write`, so lines of concurrent runs do not interleave.
 */
function stderrSink(): Sink {
  // "bare": a driver's line (the `message` property) prints as written, not
  // as a quoted string.
  const format = getTextFormatter({ value: "bare" });
  return (record) => {
    process.stderr.write(format(record));
  };
}

/**
 * Configures a stderr sink for `["conveyor"]` at `logLevel` unless LogTape
 * is configured already or `configureLogging` is false. A library must not
 * take over logging, so this only acts when the application has not set
 * LogTape up.
 */
export async function ensureLogging(
  o: { configureLogging: boolean; logLevel: Level | "trace" | "fatal" },
): Promise<void> {
  if (!o.configureLogging) return;
  // Drivers started together (`Promise.all([serve(a), serve(b)])`) share the
  // first one's configure(): LogTape refuses a second while one is under way.
  if (configuring) return await configuring;
  if (getConfig() !== null) return;
  configuring = (async () => {
    try {
      await configure({
        sinks: { stderr: stderrSink() },
        loggers: [
          { category: ["conveyor"], lowestLevel: o.logLevel, sinks: ["stderr"] },
          { category: ["logtape", "meta"], lowestLevel: "warning", sinks: ["stderr"] },
        ],
      });
    } catch (err) {
      // Configured concurrently by someone else: theirs wins. Anything else is a bug.
      if (getConfig() === null) throw err;
    }
  })().finally(() => (configuring = undefined));
  await configuring;
}

/** The default sink's configure() while it is under way. */
let configuring: Promise<void> | undefined;
