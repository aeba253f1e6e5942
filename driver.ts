/**
 * What a driver is: its name, the resource types and events it handles, and
 * the `reconcile` function the runtime calls for each event.
 *
 * @module
 */
import type { TraceContext } from "./telemetry.ts";
import type { Client } from "./client.ts";
import { ConfigError } from "./errors.ts";
import type { DriverLogger } from "./logger.ts";
import { type DriverMessage, type DriverResult, nameProblem, type Resource } from "./types.ts";

/**
 * Everything `reconcile` gets for one event.
 */
export interface ReconcileContext {
  /** The resource the event is about (the decoded `payload`). */
  resource: Resource;
  /** The whole DriverMessage, payload decoded. */
  message: DriverMessage;
  /** The event name, e.g. `create`. */
  event: string;
  /** The run identifier (a UUID). */
  runId: string;
  /** Logger bound to this run; lines reach Conveyor's log store. */
  logger: DriverLogger;
  /**
   * Aborted when the runtime gives up on this reconcile: `reconcileTimeout`
   * passed (reason `ReconcileTimeoutError`) or a shutdown stopped waiting
   * (reason `ShutdownError`). Pass it on to fetch, child processes, etc.
   */
  signal: AbortSignal;
  /** Delivery attempt of this event, 1 on first delivery. */
  attempt: number;
  /**
   * The Conveyor API client, signed with the driver's identity; present when
   * the runtime knows the API's URL (option `apiUrl`, env `CONVEYOR_API_URL`)
   * or was given a `client`.
   */
  client?: Client;
  /**
   * The OpenTelemetry context of this delivery: it holds the delivery's span
   * (kind consumer; `trace.getSpan(ctx.traceContext)`), continued from the
   * event's `traceparent`. Parent your own spans on it:
   * `tracer.startSpan("build", {}, ctx.traceContext)`. It is also the active
   * context while reconcile runs, when the application has registered a
   * context manager (an OpenTelemetry SDK set-up does). Holds a
   * non-recording span while tracing is off.
   */
  traceContext: TraceContext;
}

/**
 * A driver: which resource types it handles and what it does with them.
 *
 * @example
 * ```ts
 * import { serve, type Driver } from "@conveyor/driver";
 * const echo: Driver = {
 *   name: "echo",
 *   resources: ["pipeline"],
 *   reconcile({ resource, logger }) {
 *     logger.info(`hello ${resource.name}`);
 *     return { success: true, message: "ok" };
 *   },
 * };
 * await serve(echo);
 * ```
 */
export interface Driver {
  /**
   * The driver's name: its consumer's name and part of its subjects. No
   * whitespace, `.`, `*`, `>`, `/` or `\`.
   */
  name: string;
  /** Resource types to receive events for, e.g. `["pipeline"]`. */
  resources: readonly string[];
  /**
   * Event names to handle, e.g. `["create"]`; all events when absent. An
   * event that no version of the driver handles is acknowledged and skipped
   * without a result; one that another version running beside this one
   * handles is handed back for it (see the README's "Rolling deploys").
   */
  events?: readonly string[];
  /**
   * Does the work for one event. Return a `DriverResult` (or nothing, which
   * counts as success) to report it; throw to have the event retried, and
   * reported as failed after the last attempt. Throw `PermanentError` to fail
   * at once without retries.
   */
  reconcile(
    ctx: ReconcileContext,
  ): DriverResult | void | Promise<DriverResult | void>;
}

/** Throws a `ConfigError` naming the field when `driver` cannot be served. */
export function checkDriver(driver: Driver): void {
  if (driver === null || typeof driver !== "object") {
    throw new ConfigError("driver", "driver must be an object with name, resources and reconcile");
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
    throw new ConfigError("reconcile", `driver "${driver.name}": reconcile must be a function`);
  }
  if (
    driver.events !== undefined &&
    (!Array.isArray(driver.events) || driver.events.some((e) => typeof e !== "string" || !e))
  ) {
    throw new ConfigError(
      "events",
      `driver "${driver.name}": events must be an array of non-empty event names`,
    );
  }
}
