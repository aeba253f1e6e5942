/**
 * The per-run logger handed to `reconcile`. Every line becomes an SDD Log
 * Entry published to JetStream `logs.{runid}` (persisted by the server) and
 * core NATS `live.logs.{runid}.{driver}` (live streaming), and is mirrored to
 * LogTape under `["conveyor", "driver", <name>]`.
 *
 * @module
 */
import { getLogger, type Logger } from "@logtape/logtape";
import { headers as natsHeaders, type NatsConnection } from "@nats-io/transport-node";
import type { JetStreamClient } from "@nats-io/jetstream";
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
 * properties.
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

/** What the runtime needs to publish a run's logs. */
export interface RunLogOptions {
  /** Open NATS connection (for `live.logs.*`). */
  nc: NatsConnection;
  /** JetStream client (for `logs.*`). */
  js: JetStreamClient;
  /** Driver name. */
  driver: string;
  /** Run identifier (UUID). */
  runId: string;
  /** Pipeline of the resource, if any. */
  pipeline?: string;
  /** Labels added to every line, e.g. the event and resource. */
  labels?: Labels;
  /** Publish attempts per line before giving up. @default 5 */
  attempts?: number;
}

/** A run's logger and the means to wait for its lines. */
export interface RunLog {
  /** The logger handed to reconcile. */
  logger: DriverLogger;
  /**
   * Waits until every line so far is stored by JetStream, retrying failed
   * publishes (same `Nats-Msg-Id`, so a retry is never stored twice).
   * Rejects with `PublishError` when a line cannot be stored.
   */
  flush(): Promise<void>;
  /** Lines logged so far. */
  readonly count: number;
}

interface Pending {
  subject: string;
  data: Uint8Array;
  msgID: string;
  headers: ReturnType<typeof natsHeaders>;
  done: Promise<unknown>;
  failed?: unknown;
}

const encoder = new TextEncoder();

/** The LogTape logger a driver's lines are mirrored to. */
export function driverCategory(driver: string): Logger {
  return getLogger(["conveyor", "driver", driver]);
}

function headerKey(label: string): string {
  // Header names are tokens: keep them to safe characters.
  return `Conveyor-Label-${label.replace(/[^A-Za-z0-9_-]/g, "_")}`;
}

/**
 * Creates the logger for one run. Used by the runtime; exported for tests and
 * for tools that publish logs on behalf of a driver.
 */
export function createRunLog(opts: RunLogOptions): RunLog {
  const { nc, js, driver, runId, pipeline } = opts;
  const attempts = opts.attempts ?? 5;
  const mirror = driverCategory(driver);
  const jsSubject = `logs.${runId}`;
  const liveSubject = `live.logs.${runId}.${driver}`;
  // Unique per run log, so retries of a line dedupe and lines of
  // different attempts of the same run do not.
  const nonce = crypto.randomUUID();
  const pending: Pending[] = [];
  let seq = 0;

  function emit(level: Level, message: string, labels: Labels): void {
    const text = String(message);
    const entry: LogEntry = {
      runid: runId,
      driver,
      ...(pipeline ? { pipeline } : {}),
      timestamp: new Date().toISOString(),
      message: text,
    };
    const h = natsHeaders();
    h.set("Conveyor-Log-Level", level);
    for (const [k, v] of Object.entries(labels)) h.set(headerKey(k), String(v));
    const data = encoder.encode(JSON.stringify(entry));
    const msgID = `${nonce}.${++seq}`;

    const props = { runId, ...labels };
    if (level === "warning") mirror.warn(text, props);
    else mirror[level](text, props);

    try {
      nc.publish(liveSubject, data, { headers: h });
    } catch {
      // Live streaming is best effort; the JetStream copy below is the record.
    }
    const p: Pending = {
      subject: jsSubject,
      data,
      msgID,
      headers: h,
      done: Promise.resolve(),
    };
    p.done = js.publish(jsSubject, data, { msgID, headers: h }).catch((err) => {
      p.failed = err;
    });
    pending.push(p);
  }

  function make(bound: Labels): DriverLogger {
    return {
      runId,
      log: (m, l) => emit("info", m, { ...bound, ...l }),
      debug: (m, l) => emit("debug", m, { ...bound, ...l }),
      info: (m, l) => emit("info", m, { ...bound, ...l }),
      warn: (m, l) => emit("warning", m, { ...bound, ...l }),
      error: (m, l) => emit("error", m, { ...bound, ...l }),
      with: (l) => make({ ...bound, ...l }),
    };
  }

  async function flush(): Promise<void> {
    while (pending.length > 0) {
      const batch = pending.splice(0, pending.length);
      await Promise.all(batch.map((p) => p.done));
      for (const p of batch) {
        let err = p.failed;
        for (let i = 1; err !== undefined && i < attempts; i++) {
          await new Promise((r) => setTimeout(r, 100 * 2 ** i));
          try {
            await js.publish(p.subject, p.data, {
              msgID: p.msgID,
              headers: p.headers,
            });
            err = undefined;
          } catch (e) {
            err = e;
          }
        }
        if (err !== undefined) {
          throw new PublishError(p.subject, { cause: err });
        }
      }
    }
  }

  return {
    logger: make(opts.labels ?? {}),
    flush,
    get count() {
      return seq;
    },
  };
}
