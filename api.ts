/**
 * The client-only entry point, `@conveyor/driver/client`: the Conveyor HTTP
 * API client with its identity, log streaming, types and errors, and nothing
 * of NATS. It imports no `node:` module and no TCP transport, so it loads,
 * and bundles, in Web-only runtimes (edge functions, workers, browsers):
 * all it needs is `fetch`, Web Crypto and the other Web globals.
 *
 * Certificate files (`certFile`, `CONVEYOR_CERT_FILE`...) need a runtime with
 * a file system; elsewhere pass the PEM text (`cert`, `key`, `ca`).
 *
 * @example
 * ```ts
 * import { Client, ConveyorApiError } from "@conveyor/driver/client";
 *
 * export default {
 *   async fetch(request: Request): Promise<Response> {
 *     const api = new Client({ baseUrl: "https://conveyor.example", auth: false });
 *     const name = new URL(request.url).searchParams.get("app") ?? "web";
 *     try {
 *       const { runid } = await api.createResource({ name, resource: "app", spec: {} });
 *       return Response.json({ runid });
 *     } catch (err) {
 *       if (err instanceof ConveyorApiError) return new Response(err.message, { status: 502 });
 *       throw err;
 *     }
 *   },
 * };
 * ```
 *
 * @module
 */

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
// types.ts
export {
  type BroadcastMessage,
  type BroadcastResponse,
  type CreateResourceResponse,
  type HealthStatus,
  type JsonValue,
  type LogEntry,
  type Pipeline,
  type Resource,
  type ResourceDefinition,
  type ResourceDefinitionInit,
  type ResourceInit,
  type Step,
} from "./types.ts";
// errors.ts
export {
  ApiNetworkError,
  ApiTimeoutError,
  AuthError,
  ConfigError,
  ConveyorApiError,
  ConveyorError,
} from "./errors.ts";
