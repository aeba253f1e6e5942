/**
 * What a driver is: its name, the resource types and events it handles, and
 * the `reconcile` function the runtime calls for each event.
 *
 * @module
 */
import type { TraceContext } from "./telemetry.ts";
import type { Client } from "./client.ts";
import { ConfigError, InvalidSpecError, type SpecIssue } from "./errors.ts";
import type { DriverLogger } from "./logger.ts";
import { type DriverMessage, type DriverResult, nameProblem, type Resource } from "./types.ts";

/**
 * Everything `reconcile` gets for one event. `Spec` is the type of
 * `resource.spec`: what the driver's `spec` schema gives, else `unknown`.
 */
export interface ReconcileContext<Spec = unknown> {
  /**
   * The resource the event is about (the decoded `payload`); with a `spec`
   * schema, its `spec` is the schema's output.
   */
  resource: Resource<Spec>;
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
 * A schema for `resource.spec`: any [Standard Schema](https://standardschema.dev)
 * (valibot, zod, ArkType, …). Only the part the runtime uses is spelled out;
 * a valibot schema fits as it is.
 *
 * @example
 * ```ts
 * import * as v from "valibot";
 * import type { SpecSchema } from "@conveyor/driver";
 * const schema: SpecSchema<{ image: string }> = v.object({ image: v.string() });
 * ```
 */
export interface SpecSchema<Output = unknown> {
  /** The Standard Schema interface. */
  readonly "~standard": {
    /** Validates a value, giving the output or the issues. */
    readonly validate: (
      value: unknown,
    ) => SpecValidation<Output> | Promise<SpecValidation<Output>>;
    /** The output type, for inference only. */
    readonly types?: { readonly output: Output } | undefined;
  };
}

/** What a {@link SpecSchema} answers: the output, or the issues. */
export type SpecValidation<Output> =
  | { readonly value: Output; readonly issues?: undefined }
  | {
    readonly issues: ReadonlyArray<{
      readonly message: string;
      readonly path?: ReadonlyArray<PropertyKey | { readonly key: PropertyKey }> | undefined;
    }>;
  };

/**
 * A driver: which resource types it handles and what it does with them.
 * `Spec` is the type of `resource.spec`, given by the `spec` schema.
 *
 * @example
 * ```ts
 * import { type Driver, serve } from "@conveyor/driver";
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
export interface Driver<Spec = unknown> {
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
   * A schema for `resource.spec` (valibot or any Standard Schema). The spec
   * of each event is validated before `reconcile` runs, which then gets the
   * schema's output, typed. A spec that does not fit is a permanent failure:
   * an `InvalidSpecError` naming every problem is reported, without retries,
   * and `reconcile` is not called. Write the driver with
   * {@link defineDriver} for TypeScript to infer `Spec` from it.
   */
  spec?: SpecSchema<Spec>;
  /**
   * Does the work for one event. Return a `DriverResult` (or nothing, which
   * counts as success) to report it; throw to have the event retried, and
   * reported as failed after the last attempt. Throw `PermanentError` to fail
   * at once without retries.
   */
  reconcile(
    ctx: ReconcileContext<Spec>,
  ): DriverResult | void | Promise<DriverResult | void>;
}

/**
 * Returns `driver` as it is, typed: `Spec` is inferred from the `spec`
 * schema, so `resource.spec` in `reconcile` needs no type guard.
 *
 * @example
 * ```ts
 * import * as v from "valibot";
 * import { defineDriver, serve } from "@conveyor/driver";
 *
 * const builder = defineDriver({
 *   name: "builder",
 *   resources: ["app"],
 *   spec: v.object({ image: v.string(), replicas: v.optional(v.number(), 1) }),
 *   reconcile({ resource, logger }) {
 *     // resource.spec is { image: string; replicas: number }
 *     logger.info(`building ${resource.spec.image} x${resource.spec.replicas}`);
 *   },
 * });
 * await serve(builder);
 * ```
 */
export function defineDriver<Spec>(driver: Driver<Spec>): Driver<Spec> {
  return driver;
}

/**
 * Runs `driver.reconcile(ctx)`, validating the spec first when the driver
 * has a schema: the runtime's way of calling it (also used by the testing
 * kit). Rejects with an `InvalidSpecError` for a spec that does not fit.
 */
export async function callReconcile<Spec>(
  driver: Driver<Spec>,
  ctx: ReconcileContext<unknown>,
): Promise<DriverResult | void> {
  if (!driver.spec) return await driver.reconcile(ctx as ReconcileContext<Spec>);
  const checked = await driver.spec["~standard"].validate(ctx.resource.spec);
  if (checked.issues) throw new InvalidSpecError(checked.issues.map(specIssue));
  const typed = ctx as ReconcileContext<Spec>;
  typed.resource = { ...ctx.resource, spec: checked.value };
  return await driver.reconcile(typed);
}

function specIssue(issue: {
  readonly message: string;
  readonly path?: ReadonlyArray<PropertyKey | { readonly key: PropertyKey }> | undefined;
}): SpecIssue {
  const path = (issue.path ?? []).map((p) =>
    String(typeof p === "object" && p !== null ? p.key : p)
  ).join(".");
  return { message: String(issue.message), path };
}

/** Throws a `ConfigError` naming the field when `driver` cannot be served. */
export function checkDriver<Spec>(driver: Driver<Spec>): void {
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
  if (
    driver.spec !== undefined &&
    typeof (driver.spec as Partial<SpecSchema>)?.["~standard"]?.validate !== "function"
  ) {
    throw new ConfigError(
      "spec",
      `driver "${driver.name}": spec must be a valibot schema or another Standard Schema`,
    );
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
