/// <reference lib="esnext.disposable" preserve="true" />
// (The declarations use AsyncDisposable: consumers whose "lib" lacks it still type-check.)
/**
 * The testing kit for driver authors:
 * - {@link reconcileOnce} runs a driver's `reconcile` without NATS, under
 *   the runtime's own rules, and says what would be reported and done;
 * - {@link startTestConveyor} starts a throw-away `nats-server` set up as
 *   the Conveyor server sets it up, emits events as the server does, and
 *   reads back typed results and log lines;
 * - the lower-level {@link startNatsServer}, {@link createConveyorStreams},
 *   {@link publishEvent} and {@link readStream}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import * as v from "valibot";
 * import { defineDriver, startDriver } from "@conveyor/driver";
 * import { reconcileOnce, startTestConveyor } from "@conveyor/driver/testing";
 *
 * const builder = defineDriver({
 *   name: "builder",
 *   resources: ["app"],
 *   spec: v.object({ image: v.string() }),
 *   reconcile: ({ resource }) => ({ success: true, message: `built ${resource.spec.image}` }),
 * });
 *
 * // Without NATS:
 * const { result } = await reconcileOnce(builder, { name: "web", spec: { image: "node:22" } });
 * assert.equal(result?.message, "built node:22");
 *
 * // With a real nats-server:
 * await using conveyor = await startTestConveyor();
 * await using _running = await startDriver(builder, { servers: conveyor.url, handleSignals: false });
 * const { message } = await conveyor.emit({ resource: "app", name: "web", spec: { image: "node:22" } });
 * const { driverresult } = await conveyor.waitForResult(message.run_id);
 * assert.equal(driverresult.message, "built node:22");
 * ```
 *
 * @module
 */
export type { DriverMessage, LogEntry, Resource, ResultEnvelope } from "./types.ts";
export {
  createConveyorStreams,
  type EventInit,
  fetchNatsServer,
  findNatsServer,
  type NatsServer,
  type NatsServerOptions,
  type OpenConnection,
  type PublishedEvent,
  publishEvent,
  readStream,
  startNatsServer,
  type StoredMessage,
  type Target,
} from "./local_nats.ts";
export {
  type CapturedLog,
  type EmitOptions,
  type EmitResource,
  type ReconcileDecision,
  reconcileOnce,
  type ReconcileOnceOptions,
  type ReconcileOnceResult,
  startTestConveyor,
  type TestConveyor,
  type TestConveyorOptions,
  type TestResource,
} from "./kit.ts";
