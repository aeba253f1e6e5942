/**
 * The drivers the benchmark runs through the runtime, in process and in
 * bench/driver_program.ts: what their `reconcile` does is the only thing
 * that differs between the figures.
 *
 * @module
 */
import type { Driver } from "../mod.ts";
import { RESOURCE } from "./harness.ts";

/** What a benchmark reconcile does for each event. */
export type Work =
  /** Logs one line and succeeds: the no-op of the overhead figure. */
  | { kind: "noop" }
  /** Logs one line, sleeps `ms`, succeeds: the slow-work figure. */
  | { kind: "sleep"; ms: number }
  /** Logs `lines` lines and succeeds: the logs figure. */
  | { kind: "logs"; lines: number };

/** The no-op work. */
export const NOOP: Work = { kind: "noop" };

/**
 * A driver named `name` for `resources.bench` doing `work`. Every variant
 * returns `{ success: true, message: "ok" }`.
 */
export function benchDriver(name: string, work: Work): Driver {
  const ok = { success: true, message: "ok" };
  if (work.kind === "noop") {
    return {
      name,
      resources: [RESOURCE],
      reconcile({ resource, logger }) {
        logger.info(`reconciled ${resource.name}`);
        return ok;
      },
    };
  }
  if (work.kind === "sleep") {
    const ms = work.ms;
    return {
      name,
      resources: [RESOURCE],
      async reconcile({ resource, logger }) {
        logger.info(`reconciled ${resource.name}`);
        await new Promise((r) => setTimeout(r, ms));
        return ok;
      },
    };
  }
  const lines = work.lines;
  return {
    name,
    resources: [RESOURCE],
    reconcile({ resource, logger }) {
      for (let i = 1; i <= lines; i++) logger.info(`line ${i} of ${resource.name}`);
      return ok;
    },
  };
}
