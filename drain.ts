/**
 * A serverless batch mode: for cron- or HTTP-triggered platforms whose
 * functions live seconds, not days. {@link drain} binds the driver's consumer,
 * takes up to a batch of events, reconciles them with the same guarantees as
 * `serve` (logs and result stored before the ack, retries, hand-backs), stops,
 * and returns a summary.
 *
 * @module
 */
import { ConfigError } from "./errors.ts";
import type { Driver } from "./driver.ts";
import { startDriver } from "./manager.ts";
import type { ServeOptions } from "./options.ts";

/** Options of {@link drain}: those of `serve`, and the batch's bounds. */
export interface DrainOptions extends ServeOptions {
  /** Most events to start in this invocation; pulled-ahead ones beyond it are handed back. @default 100 */
  maxMessages?: number;
  /**
   * Longest the invocation takes events, in ms. Then it stops pulling; events
   * still running get up to `shutdownTimeout` (default 5 s here) to finish,
   * and the rest is handed back for the next invocation.
   * @default 25_000
   */
  maxWait?: number;
  /** Ends early once no event has arrived for this long and nothing runs, in ms. @default 1_000 */
  idle?: number;
}

/** Why a {@link drain} ended. */
export type DrainEnd = "maxMessages" | "idle" | "maxWait" | "aborted";

/** What a {@link drain} did. */
export interface DrainSummary {
  /** Why it ended. */
  end: DrainEnd;
  /** Events received (started or handed back). */
  received: number;
  /** Reported successes. */
  succeeded: number;
  /** Reported failures. */
  failed: number;
  /** Events left for a retry (a failed attempt with attempts left). */
  retried: number;
  /** Events handed back unstarted or unsettled, for the next invocation. */
  requeued: number;
  /** Events skipped (not handled by any version) or terminated as malformed. */
  skipped: number;
  /** How long it ran, in ms. */
  durationMs: number;
}

/**
 * Takes up to `maxMessages` events for `driver` within `maxWait`, reconciles
 * them as `serve` would, then stops and resolves with a summary. Signals are
 * not handled (the platform ends the function); `options.signal` stops it.
 *
 * @example
 * ```ts
 * import { defineDriver, drain } from "@conveyor/driver";
 *
 * const builder = defineDriver({
 *   name: "builder",
 *   resources: ["app"],
 *   reconcile: ({ resource }) => ({ success: true, message: `built ${resource.name}` }),
 * });
 *
 * // A Web handler for an HTTP- or cron-triggered function:
 * export default {
 *   async fetch(_request: Request): Promise<Response> {
 *     const summary = await drain(builder, { maxMessages: 20, maxWait: 20_000 });
 *     return Response.json(summary);
 *   },
 * };
 * ```
 */
export async function drain<Spec>(
  driver: Driver<Spec>,
  options: DrainOptions = {},
): Promise<DrainSummary> {
  const started = Date.now();
  const maxMessages = bound("maxMessages", options.maxMessages, 100, 1, 100_000);
  const maxWait = bound("maxWait", options.maxWait, 25_000, 1, 2 ** 31 - 1);
  const idle = bound("idle", options.idle, 1_000, 1, 2 ** 31 - 1);
  const { maxMessages: _m, maxWait: _w, idle: _i, ...serve } = options;
  const running = await startDriver(driver, {
    shutdownTimeout: 5_000,
    ...serve,
    concurrency: Math.min(options.concurrency ?? 16, maxMessages),
    handleSignals: false,
    exitProcess: false,
  });
  let end: DrainEnd;
  try {
    let lastReceived = 0;
    let quietSince = Date.now();
    for (;;) {
      const s = running.stats();
      if (options.signal?.aborted) {
        end = "aborted";
        break;
      }
      if (s.received >= maxMessages) {
        end = "maxMessages";
        break;
      }
      if (Date.now() - started >= maxWait) {
        end = "maxWait";
        break;
      }
      if (s.received !== lastReceived || s.inFlight + s.queued + s.settling > 0) {
        lastReceived = s.received;
        quietSince = Date.now();
      } else if (Date.now() - quietSince >= idle) {
        end = "idle";
        break;
      }
      await new Promise((r) => setTimeout(r, 20));
    }
  } finally {
    await running.stop();
  }
  const s = running.stats();
  return {
    end,
    received: s.received,
    succeeded: s.succeeded,
    failed: s.failed,
    retried: s.retried,
    requeued: s.requeued,
    skipped: s.skipped + s.invalid,
    durationMs: Date.now() - started,
  };
}

function bound(
  field: string,
  value: number | undefined,
  fallback: number,
  min: number,
  max: number,
): number {
  if (value === undefined) return fallback;
  if (Number.isInteger(value) && value >= min && value <= max) return value;
  throw new ConfigError(field, `${field} must be an integer from ${min} to ${max}, got ${value}`);
}
