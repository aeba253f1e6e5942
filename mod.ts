/// <reference lib="esnext.disposable" preserve="true" />
// (The declarations use AsyncDisposable: consumers whose "lib" lacks it still type-check.)
/**
 * Driver runtime for [Conveyor CI](https://conveyor.open.ug): consume resource
 * events from NATS JetStream, run your `reconcile()` for each, ship its logs
 * and report its result, across as many instances as you run.
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
 * });
 * ```
 *
 * @module
 */

// manager.ts
export { type RunningDriver, serve, startDriver } from "./manager.ts";
// run.ts
export { type DriverStats } from "./run.ts";
// health.ts
export { type DriverHealth, healthHandler } from "./health.ts";
// telemetry.ts
export {
  type EventOutcome,
  INSTRUMENTATION_SCOPE,
  METRICS,
  type TelemetryOptions,
  type TraceContext,
} from "./telemetry.ts";
// driver.ts
export { drain, type DrainEnd, type DrainOptions, type DrainSummary } from "./drain.ts";
export {
  defineDriver,
  type Driver,
  type ReconcileContext,
  type SpecSchema,
  type SpecValidation,
} from "./driver.ts";
// consumer.ts
export { filterSubjects, MESSAGES_STREAM } from "./consumer.ts";
// decide.ts
export { RESULT_SUBJECT, resultMsgId } from "./decide.ts";
// options.ts
export { type ConsumerPolicy, ENV, parseDuration, type ServeOptions } from "./options.ts";
// logger.ts
export { type DriverLogger, type Labels, type Level } from "./logger.ts";
// types.ts
export {
  type BroadcastMessage,
  type BroadcastResponse,
  type CreateResourceResponse,
  type DriverMessage,
  type DriverResult,
  type DriverResultEvent,
  type HealthStatus,
  type JsonValue,
  type LogEntry,
  parseDriverMessage,
  type Pipeline,
  type Resource,
  type ResourceDefinition,
  type ResourceDefinitionInit,
  type ResourceInit,
  type ResultEnvelope,
  type Step,
} from "./types.ts";
// client.ts
export {
  Client,
  type ClientOptions,
  type ListLogsOptions,
  OPERATIONS,
  type RequestOptions,
  type RetryOptions,
  type StreamLogsOptions,
  type StreamPipelineLogsOptions,
  type TokenSource,
} from "./client.ts";
// sse.ts
export {
  readSse,
  type SseEvent,
  type SseKey,
  type SseOptions,
  type SseReconnectInfo,
} from "./sse.ts";
// auth.ts
export {
  authFromEnv,
  type AuthOptions,
  type CertificateInfo,
  createIdentity,
  type Identity,
  type JwtAlgorithm,
} from "./auth.ts";
// errors.ts
export {
  ApiNetworkError,
  ApiTimeoutError,
  AuthError,
  ConfigError,
  ConnectError,
  ConsumerError,
  ConveyorApiError,
  ConveyorError,
  InvalidMessageError,
  InvalidSpecError,
  type MessageIssue,
  PermanentError,
  PublishError,
  ReconcileTimeoutError,
  ShutdownError,
  type SpecIssue,
  StreamNotFoundError,
} from "./errors.ts";
