/**
 * A typed client for the Conveyor CI HTTP API, built on Web `fetch` alone, so
 * it runs on Deno, Bun, Node and edge runtimes alike.
 *
 * @example
 * ```ts
 * import { Client } from "@conveyor/driver";
 * const api = new Client({ baseUrl: "http://localhost:8080" });
 * const { runid } = await api.createResource({ name: "web", resource: "app", spec: { image: "node:20" } });
 * for await (const line of api.streamPipelineLogs({ runId: runid })) console.log(line.message);
 * ```
 *
 * @module
 */
import * as v from "valibot";
import { getLogger } from "@logtape/logtape";
import { context, propagation, type TextMapSetter } from "@opentelemetry/api";
import { ApiNetworkError, ApiTimeoutError, ConfigError, ConveyorApiError } from "./errors.ts";
import {
  backoff,
  httpErrorText,
  MAX_ERROR_BODY,
  MAX_TIMER_MS,
  parseRetryAfter,
  readEnv,
  readText,
  sleep,
} from "./_util.ts";
import { readSse, type SseKey } from "./sse.ts";
import { authFromEnv, createIdentity, type Identity } from "./auth.ts";
import {
  type BroadcastMessage,
  type BroadcastResponse,
  BroadcastResponseSchema,
  type CreateResourceResponse,
  CreateResourceResponseSchema,
  type HealthStatus,
  HealthStatusSchema,
  type LogEntry,
  type Pipeline,
  PipelineSchema,
  type Resource,
  type ResourceDefinition,
  type ResourceDefinitionInit,
  ResourceDefinitionSchema,
  type ResourceInit,
  ResourceSchema,
  ServerLogSchema,
} from "./types.ts";

/**
 * Where the client gets the bearer token it sends with every request but
 * `GET /health`. Asked once per attempt, so a short-lived token is renewed
 * in time; an `Identity` from `createIdentity` is one.
 */
export interface TokenSource {
  /** A valid token, e.g. a JWT signed with the operator-issued key. */
  token(): Promise<string>;
}

/**
 * Retries of a failed request. GET and HEAD are retried on timeouts, network
 * errors and 429, 502, 503, 504. Every other request (POST, PUT, DELETE:
 * each starts work on the server) is retried only when it provably never
 * reached the server (connection refused, name not resolved), unless the
 * call says it may repeat (`RequestOptions.idempotent`).
 */
export interface RetryOptions {
  /** Attempts in all, the first included; 1 turns retries off. @default 3 */
  attempts?: number;
  /** Delay before the first retry, in ms; doubles per retry, ±20% jitter. @default 250 */
  initialDelay?: number;
  /**
   * Upper bound of a retry delay, in ms. A `Retry-After` asking for longer
   * ends the retries: the error is thrown instead.
   * @default 5_000
   */
  maxDelay?: number;
}

/** Options of {@link Client}. Every field is optional. */
export interface ClientOptions {
  /**
   * The API's base URL; a path prefix is kept (`https://ci.example/api`).
   * Env `CONVEYOR_API_URL`.
   * @default "http://localhost:8080"
   */
  baseUrl?: string;
  /**
   * Token source for `Authorization: Bearer …`, needed when the server has
   * auth enabled: an `Identity` from `createIdentity`, or any `TokenSource`.
   * When absent, the identity named by `CONVEYOR_CERT_FILE`,
   * `CONVEYOR_KEY_FILE` and `CONVEYOR_CA_FILE` is used (as `serve()` does),
   * read on the first request; `false` sends no token whatever the
   * environment says.
   */
  auth?: TokenSource | false;
  /** The `fetch` to use, e.g. one with a custom TLS agent. @default globalThis.fetch */
  fetch?: typeof fetch;
  /**
   * Limit for one attempt of a request, response body included, in ms.
   * Log streams use {@link ClientOptions.streamConnectTimeout} instead.
   * @default 30_000
   */
  timeout?: number;
  /** How failed requests are retried (see `RetryOptions` for which ones). */
  retry?: RetryOptions;
  /** Extra headers for every request, e.g. `User-Agent`. */
  headers?: Record<string, string>;
  /**
   * How long a log stream waits for response headers, in ms. The server sends
   * them only with the first log line or heartbeat (every 15 s).
   * @default 30_000
   */
  streamConnectTimeout?: number;
  /**
   * Consecutive failed reconnects of a log stream before it gives up (see
   * `SseOptions.maxRetries`); `Infinity` to follow a run through any outage.
   * @default 10
   */
  streamMaxRetries?: number;
  /**
   * How long a connected log stream may stay silent before it is given up
   * and reconnected, in ms: about three of the server's 15 s heartbeats
   * (see `SseOptions.idleTimeout`). 0 or `Infinity`: wait for ever.
   * @default 45_000
   */
  streamIdleTimeout?: number;
  /**
   * How many streamed log lines each log stream remembers exactly to drop
   * the lines the server replays after a reconnect (about 100 bytes each;
   * see `SseOptions.dedupeWindow`). Older lines are recognised by their
   * driver and timestamp, as the server replays them in that order.
   * @default 10_000
   */
  streamDedupeWindow?: number;
}

/** The last parameter of every request method. */
export interface RequestOptions {
  /** Aborts the request (and its retries); the call rejects with the signal's reason. */
  signal?: AbortSignal;
  /**
   * Retry this call like a GET (timeouts, network errors, 429, 502-504) even
   * though its method is not safe to repeat. On the Conveyor server a PUT
   * publishes an `update` event and a DELETE a `delete` event: a retry of
   * one that did reach the server starts that work twice. Set it only where
   * that is acceptable. @default false
   */
  idempotent?: boolean;
}

/** What a request method passes on from its options. */
function callOptions(o: RequestOptions): { signal?: AbortSignal; idempotent?: boolean } {
  return { signal: o.signal, idempotent: o.idempotent };
}

/** Filters of {@link Client.listLogs}; all optional, combined with AND. */
export interface ListLogsOptions extends RequestOptions {
  /** Only lines of this run (query `runid`). */
  runId?: string;
  /** Only lines of this driver. */
  driver?: string;
  /** Only lines of this pipeline. */
  pipeline?: string;
}

/** Options of {@link Client.streamLogs}. */
export interface StreamLogsOptions extends RequestOptions {
  /** The run to follow. */
  runId: string;
  /** The driver whose lines to follow. */
  driver: string;
}

/** Options of {@link Client.streamPipelineLogs}. */
export interface StreamPipelineLogsOptions extends RequestOptions {
  /** The run to follow, every driver's lines. */
  runId: string;
}

/**
 * Each operation of the server's swagger.json (`"METHOD /path"`, paths as
 * written there) and the {@link Client} method that performs it.
 */
export const OPERATIONS: Readonly<Record<string, keyof Client>> = Object.freeze({
  "GET /health": "health",
  "POST /resources": "createResource",
  "GET /resources/{type}": "listResources",
  "GET /resources/{type}/{name}": "getResource",
  "PUT /resources/{type}/{name}": "updateResource",
  "DELETE /resources/{type}/{name}": "deleteResource",
  "GET /resources/{type}/{name}/{version}": "getResourceVersion",
  "POST /resource-definitions": "createResourceDefinition",
  "POST /resource-definitions/apply": "applyResourceDefinition",
  "GET /resource-definitions/{name}": "getResourceDefinition",
  "PUT /resource-definitions/{name}": "updateResourceDefinition",
  "DELETE /resource-definitions/{name}": "deleteResourceDefinition",
  "POST /pipelines": "createPipeline",
  "GET /pipelines/{name}": "getPipeline",
  "PUT /pipelines/{name}": "updatePipeline",
  "DELETE /pipelines/{name}": "deletePipeline",
  "GET /logs": "listLogs",
  "POST /logs": "createLog",
  "GET /logs/streams/{drivername}/{runid}": "streamLogs",
  "GET /logs/pipeline/{runid}": "streamPipelineLogs",
  "POST /drivers/broadcast-message": "broadcastMessage",
});

/** Methods that start no work on the server: a repeat is harmless. */
const SAFE = new Set(["GET", "HEAD", "OPTIONS"]);
const RETRY_STATUS = new Set([429, 502, 503, 504]);
/** Largest `streamDedupeWindow`: about 100 MB of memory per stream. */
const MAX_DEDUPE_WINDOW = 1_000_000;
/** Largest response body the client reads, in bytes. */
const MAX_RESPONSE_BYTES = 64 * 1024 * 1024;
/** `Retry-After` of a failed attempt, by its error. */
const retryAfterOf = new WeakMap<Error, number>();

/**
 * Refuses a name the server could store but never serve back: it does not
 * decode path parameters, so only names that need no percent-encoding can
 * be addressed in a URL.
 */
function addressable(what: string, name: unknown): void {
  if (typeof name === "string" && encodeURIComponent(name) !== name) {
    throw new TypeError(
      `${what} ${JSON.stringify(name)} needs percent-encoding in URLs, which the Conveyor ` +
        "server does not decode: it could be created but never read back by name",
    );
  }
}

/** Encodes a path parameter. */
function seg(value: string | number): string {
  const s = String(value);
  // URLs resolve `.` and `..` segments, encoded or not: they cannot be sent.
  if (s === "" || s === "." || s === "..") {
    throw new TypeError(`path parameter ${JSON.stringify(s)} cannot be sent`);
  }
  return encodeURIComponent(s);
}

/**
 * Identity of a log line, the same in the server's replay and live JSON, and
 * its place in the replay: the server replays the lines of each pipeline and
 * driver by timestamp.
 */
function logKey(data: string): string | SseKey {
  try {
    const l = JSON.parse(data) as Record<string, unknown>;
    const key = JSON.stringify([l.runid, l.driver, l.timestamp, l.message]);
    if (typeof l.driver !== "string" || typeof l.timestamp !== "string") return key;
    // The server's store orders lines by pipeline, driver, then timestamp.
    const group = `${typeof l.pipeline === "string" ? l.pipeline : ""}|${l.driver}`;
    return { key, group, time: Date.parse(l.timestamp) };
  } catch {
    return data;
  }
}

const ResourceListSchema = v.pipe(
  v.nullable(v.array(ResourceSchema)),
  v.transform((x) => x ?? []),
);
const LogListSchema = v.pipe(
  v.nullable(v.array(ServerLogSchema)),
  v.transform((x) => x ?? []),
);

type Fetch = (input: URL, init: RequestInit) => Promise<Response>;

/** A 2xx answer: JSON parsed, other text as a string, nothing as undefined. */
interface Reply {
  status: number;
  body: unknown;
}

interface Call {
  method: string;
  path: string;
  query?: Record<string, string | undefined>;
  body?: unknown;
  signal?: AbortSignal;
  /** The caller allows repeating it: retried like a GET. */
  idempotent?: boolean;
  /** Send `Authorization` (all but /health). */
  auth?: boolean;
}

/**
 * Client of the Conveyor CI HTTP API: a typed method for every operation of
 * the server's swagger.json (see {@link OPERATIONS}).
 *
 * - Non-2xx answers reject with `ConveyorApiError` (`status`, the server's
 *   `error` text, `method`, `path`); a 2xx answer whose body does not have the
 *   documented shape rejects with a `ConveyorApiError` of that 2xx status
 *   naming what is wrong.
 * - `fetch` failing rejects with `ApiNetworkError`, an attempt exceeding
 *   `timeout` with `ApiTimeoutError`; aborting `signal` with its reason.
 * - GET and HEAD are retried on network errors, timeouts, 429, 502, 503 and
 *   504, honouring `Retry-After`. POST, PUT and DELETE start work on the
 *   server (a PUT publishes an `update` event, a DELETE a `delete` event):
 *   they are retried only when they provably never reached it (connection
 *   refused, name not resolved), or like a GET when the call passes
 *   `idempotent: true`.
 *
 * @example
 * ```ts
 * import { Client, ConveyorApiError, createIdentity } from "@conveyor/driver";
 * const identity = await createIdentity({ certFile: "client.crt", keyFile: "client.key" });
 * const api = new Client({ baseUrl: "http://localhost:8080", auth: identity });
 * try {
 *   const app = await api.getResource("app", "web");
 *   console.log(app.metadata.version);
 * } catch (err) {
 *   if (err instanceof ConveyorApiError) console.error(err.status, err.error);
 *   else throw err;
 * }
 * ```
 */
export class Client {
  /** The base URL requests go to, without a trailing slash. */
  readonly baseUrl: string;
  #auth?: TokenSource;
  #fetch: Fetch;
  #timeout: number;
  #attempts: number;
  #initialDelay: number;
  #maxDelay: number;
  #headers: Record<string, string>;
  #streamConnectTimeout: number;
  #streamMaxRetries: number;
  #streamDedupeWindow: number;
  #streamIdleTimeout: number;
  #warnedPlain = false;

  /** Creates a client; nothing is sent until a method is called. */
  constructor(options: ClientOptions = {}) {
    const base = options.baseUrl ?? readEnv("CONVEYOR_API_URL") ?? "http://localhost:8080";
    // Checked now rather than on the first request.
    this.baseUrl = checkBaseUrl(base);
    this.#auth = options.auth === false ? undefined : options.auth ?? identityFromEnv();
    // Never called as a method: some runtimes' fetch throws when `this` is
    // not the global object.
    const custom = options.fetch;
    this.#fetch = custom
      ? (input, init) => custom(input, init)
      : (input, init) => fetch(input, init);
    this.#timeout = duration("timeout", options.timeout, 30_000, { infinite: true });
    this.#attempts = count("retry.attempts", options.retry?.attempts, 3, 1);
    this.#initialDelay = duration("retry.initialDelay", options.retry?.initialDelay, 250, {
      zero: true,
    });
    this.#maxDelay = duration("retry.maxDelay", options.retry?.maxDelay, 5_000, {});
    this.#headers = { ...options.headers };
    this.#streamConnectTimeout = duration(
      "streamConnectTimeout",
      options.streamConnectTimeout,
      30_000,
      { infinite: true },
    );
    this.#streamMaxRetries = count("streamMaxRetries", options.streamMaxRetries, 10, 0, true);
    this.#streamDedupeWindow = count(
      "streamDedupeWindow",
      options.streamDedupeWindow,
      10_000,
      1,
      false,
      MAX_DEDUPE_WINDOW,
    );
    this.#streamIdleTimeout = duration("streamIdleTimeout", options.streamIdleTimeout, 45_000, {
      zero: true,
      infinite: true,
    });
  }

  // --- health -------------------------------------------------------------

  /**
   * `GET /health`: whether the server is up. Sent without a token.
   *
   * @example
   * ```ts
   * import { Client } from "@conveyor/driver";
   * const { status } = await new Client().health(); // "healthy"
   * ```
   */
  async health(options: RequestOptions = {}): Promise<HealthStatus> {
    const reply = await this.#request({
      method: "GET",
      path: "/health",
      auth: false,
      ...callOptions(options),
    });
    return this.#decode(HealthStatusSchema, reply, "GET", "/health");
  }

  // --- resources ----------------------------------------------------------

  /**
   * `POST /resources/`: creates a resource and starts a run for its
   * `create` event. The server assigns `id` and sets `metadata` to
   * `{ version: "1" }` (the v0.6 server drops other metadata here),
   * validates `spec` against the resource definition's schema (400 when it
   * does not fit; 500 when there is no definition, which `notFound` tells)
   * and checks that the pipeline, when given, exists for this resource type
   * (400).
   *
   * A name or type that would need percent-encoding in a URL (a space, `/`,
   * `%`, non-ASCII…) is refused with a `TypeError` before anything is sent:
   * the server does not decode path parameters, so such a resource could be
   * created but never read, updated or deleted by name.
   *
   * @example
   * ```ts
   * import { Client } from "@conveyor/driver";
   * const api = new Client({ baseUrl: "http://localhost:8080" });
   * const { runid } = await api.createResource({ name: "web", resource: "app", pipeline: "ci", spec: {} });
   * ```
   */
  async createResource(
    resource: ResourceInit,
    options: RequestOptions = {},
  ): Promise<CreateResourceResponse> {
    addressable("resource name", resource.name);
    addressable("resource type", resource.resource);
    const reply = await this.#request({
      method: "POST",
      path: "/resources/", // with the slash, as the Go client posts
      body: resource,
      ...callOptions(options),
    });
    return this.#decode(CreateResourceResponseSchema, reply, "POST", "/resources/");
  }

  /**
   * `GET /resources/{type}`: the resources of a type.
   *
   * Not routed by the v0.6 server: it answers 404 (plain text `Cannot GET …`)
   * and `GET /resources` answers 400; this method works against servers that
   * implement the operation as swagger.json documents it.
   */
  async listResources(type: string, options: RequestOptions = {}): Promise<Resource[]> {
    const path = `/resources/${seg(type)}`;
    const reply = await this.#request({ method: "GET", path, ...callOptions(options) });
    return this.#decode(ResourceListSchema, reply, "GET", path);
  }

  /**
   * `GET /resources/{type}/{name}`: one resource, latest version.
   *
   * A missing resource answers **500** (`Failed to find resource: …`), not
   * 404, on the v0.6 server: test `err.notFound` rather than the status.
   */
  async getResource(type: string, name: string, options: RequestOptions = {}): Promise<Resource> {
    const path = `/resources/${seg(type)}/${seg(name)}`;
    const reply = await this.#request({ method: "GET", path, ...callOptions(options) });
    return this.#decode(ResourceSchema, reply, "GET", path);
  }

  /**
   * `PUT /resources/{type}/{name}`: replaces a resource, stores a new version
   * and publishes an `update` event. The body is validated like on create; a
   * resource type without definition, or a missing resource, answers 500
   * (`notFound`).
   */
  async updateResource(
    type: string,
    name: string,
    resource: ResourceInit | Resource,
    options: RequestOptions = {},
  ): Promise<Resource> {
    const path = `/resources/${seg(type)}/${seg(name)}`;
    const reply = await this.#request({
      method: "PUT",
      path,
      body: resource,
      ...callOptions(options),
    });
    return this.#decode(ResourceSchema, reply, "PUT", path);
  }

  /**
   * `DELETE /resources/{type}/{name}`: deletes a resource and publishes a
   * `delete` event. The v0.6 server answers 204 for a missing resource too.
   */
  async deleteResource(type: string, name: string, options: RequestOptions = {}): Promise<void> {
    await this.#request({
      method: "DELETE",
      path: `/resources/${seg(type)}/${seg(name)}`,
      ...callOptions(options),
    });
  }

  /**
   * `GET /resources/{type}/{name}/{version}`: a resource as it was at a
   * version (`metadata.version`). A missing version answers **500** on the
   * v0.6 server (`Failed to find resource: … not found`; `notFound` is true).
   */
  async getResourceVersion(
    type: string,
    name: string,
    version: string | number,
    options: RequestOptions = {},
  ): Promise<Resource> {
    const path = `/resources/${seg(type)}/${seg(name)}/${seg(version)}`;
    const reply = await this.#request({ method: "GET", path, ...callOptions(options) });
    return this.#decode(ResourceSchema, reply, "GET", path);
  }

  // --- resource definitions ----------------------------------------------

  /**
   * `POST /resource-definitions/`: creates a resource type with the JSON
   * schema its resources' `spec` must satisfy. Use
   * {@link Client.applyResourceDefinition} to create or update.
   */
  async createResourceDefinition(
    definition: ResourceDefinitionInit,
    options: RequestOptions = {},
  ): Promise<ResourceDefinition> {
    return await this.#sendDefinition("POST", "/resource-definitions/", definition, options);
  }

  /**
   * `POST /resource-definitions/apply`: creates the definition, or updates
   * the one of the same name (then the answer's `id` is empty on the v0.6
   * server). 400 without a `name`.
   *
   * @example
   * ```ts
   * import { Client } from "@conveyor/driver";
   * const api = new Client({ baseUrl: "http://localhost:8080" });
   * await api.applyResourceDefinition({ name: "app", schema: { type: "object" } });
   * ```
   */
  async applyResourceDefinition(
    definition: ResourceDefinitionInit,
    options: RequestOptions = {},
  ): Promise<ResourceDefinition> {
    return await this.#sendDefinition("POST", "/resource-definitions/apply", definition, options);
  }

  /**
   * `GET /resource-definitions/{name}`. A missing definition answers
   * **500**, not 404, on the v0.6 server (`notFound` is true).
   */
  async getResourceDefinition(
    name: string,
    options: RequestOptions = {},
  ): Promise<ResourceDefinition> {
    const path = `/resource-definitions/${seg(name)}`;
    const reply = await this.#request({ method: "GET", path, ...callOptions(options) });
    return this.#decode(ResourceDefinitionSchema, reply, "GET", path);
  }

  /**
   * `PUT /resource-definitions/{name}`: replaces a definition. A missing
   * definition answers 500 on the v0.6 server.
   */
  async updateResourceDefinition(
    name: string,
    definition: ResourceDefinitionInit,
    options: RequestOptions = {},
  ): Promise<ResourceDefinition> {
    return await this.#sendDefinition(
      "PUT",
      `/resource-definitions/${seg(name)}`,
      definition,
      options,
    );
  }

  async #sendDefinition(
    method: "POST" | "PUT",
    path: string,
    definition: ResourceDefinitionInit,
    options: RequestOptions,
  ): Promise<ResourceDefinition> {
    if (method === "POST") addressable("resource definition name", definition.name);
    const reply = await this.#request({ method, path, body: definition, ...callOptions(options) });
    return this.#decode(ResourceDefinitionSchema, reply, method, path);
  }

  /** `DELETE /resource-definitions/{name}`. */
  async deleteResourceDefinition(name: string, options: RequestOptions = {}): Promise<void> {
    await this.#request({
      method: "DELETE",
      path: `/resource-definitions/${seg(name)}`,
      ...callOptions(options),
    });
  }

  // --- pipelines ----------------------------------------------------------

  /**
   * `POST /pipelines`: creates (or overwrites) a pipeline. 500 on the v0.6
   * server (`notFound`) when no resource definition exists for its
   * `resource` type.
   *
   * @example
   * ```ts
   * import { Client } from "@conveyor/driver";
   * const api = new Client({ baseUrl: "http://localhost:8080" });
   * await api.createPipeline({
   *   name: "ci", resource: "app",
   *   steps: [{ id: "1", name: "build", driver: "builder" }],
   * });
   * ```
   */
  async createPipeline(pipeline: Pipeline, options: RequestOptions = {}): Promise<Pipeline> {
    addressable("pipeline name", pipeline.name);
    const reply = await this.#request({
      method: "POST",
      path: "/pipelines",
      body: pipeline,
      ...callOptions(options),
    });
    return this.#decode(PipelineSchema, reply, "POST", "/pipelines");
  }

  /**
   * `GET /pipelines/{name}`. Not routed by the v0.6 server (404, plain text
   * `Cannot GET …`); works against servers that implement swagger.json.
   */
  async getPipeline(name: string, options: RequestOptions = {}): Promise<Pipeline> {
    const path = `/pipelines/${seg(name)}`;
    const reply = await this.#request({ method: "GET", path, ...callOptions(options) });
    return this.#decode(PipelineSchema, reply, "GET", path);
  }

  /**
   * `PUT /pipelines/{name}`: replaces a pipeline; its `name` must equal
   * `name` (400 otherwise). Not routed by the v0.6 server (404): there,
   * {@link Client.createPipeline} overwrites a pipeline of the same name.
   */
  async updatePipeline(
    name: string,
    pipeline: Pipeline,
    options: RequestOptions = {},
  ): Promise<Pipeline> {
    const path = `/pipelines/${seg(name)}`;
    const reply = await this.#request({
      method: "PUT",
      path,
      body: pipeline,
      ...callOptions(options),
    });
    return this.#decode(PipelineSchema, reply, "PUT", path);
  }

  /** `DELETE /pipelines/{name}`. Not routed by the v0.6 server (404). */
  async deletePipeline(name: string, options: RequestOptions = {}): Promise<void> {
    await this.#request({
      method: "DELETE",
      path: `/pipelines/${seg(name)}`,
      ...callOptions(options),
    });
  }

  // --- logs ---------------------------------------------------------------

  /**
   * `GET /logs?runid=&driver=&pipeline=`: stored log lines, filtered. Lines
   * without a pipeline come without `pipeline` (the server sends `""`).
   *
   * @example
   * ```ts
   * import { Client } from "@conveyor/driver";
   * const api = new Client({ baseUrl: "http://localhost:8080" });
   * const runId = "0b7e1c1e-8d4e-4f7a-9a52-4a3b2c1d0e9f";
   * const lines = await api.listLogs({ runId, driver: "builder" });
   * ```
   */
  async listLogs(options: ListLogsOptions = {}): Promise<LogEntry[]> {
    const { runId, driver, pipeline, signal } = options;
    const reply = await this.#request({
      method: "GET",
      path: "/logs",
      query: { runid: runId, driver, pipeline },
      signal,
    });
    return this.#decode(LogListSchema, reply, "GET", "/logs");
  }

  /**
   * `POST /logs`: stores a log line. Lines stored this way are not pushed to
   * open log streams (those carry what drivers publish to NATS); drivers log
   * with `ctx.logger` instead.
   */
  async createLog(entry: LogEntry, options: RequestOptions = {}): Promise<void> {
    await this.#request({ method: "POST", path: "/logs", body: entry, ...callOptions(options) });
  }

  /**
   * `GET /logs/streams/{driver}/{runid}`: a driver's log lines of a run as
   * they come, after the stored ones, until `signal` aborts or the loop is
   * left. A dropped connection is resumed; the lines the server replays then
   * are not yielded again (identical lines sent again on purpose are).
   *
   * @throws {ConveyorApiError} on a 4xx, or when the stream sends a line that
   * is not a log entry (`status` 200).
   * @example
   * ```ts
   * import { Client } from "@conveyor/driver";
   * const api = new Client({ baseUrl: "http://localhost:8080" });
   * const runId = "0b7e1c1e-8d4e-4f7a-9a52-4a3b2c1d0e9f";
   * const ac = new AbortController();
   * for await (const line of api.streamLogs({ runId, driver: "builder", signal: ac.signal })) {
   *   console.log(line.timestamp, line.message);
   *   if (line.message === "done") break;
   * }
   * ```
   */
  streamLogs(options: StreamLogsOptions): AsyncIterable<LogEntry> {
    return this.#streamLogs(
      `/logs/streams/${seg(options.driver)}/${seg(options.runId)}`,
      options.signal,
    );
  }

  /**
   * `GET /logs/pipeline/{runid}`: every driver's log lines of a run, as
   * {@link Client.streamLogs} does for one driver.
   */
  streamPipelineLogs(options: StreamPipelineLogsOptions): AsyncIterable<LogEntry> {
    return this.#streamLogs(`/logs/pipeline/${seg(options.runId)}`, options.signal);
  }

  // --- drivers ------------------------------------------------------------

  /**
   * `POST /drivers/broadcast-message`: publishes a message to drivers. A
   * non-string `payload` is sent as its JSON text, the form the server wants.
   */
  async broadcastMessage(
    message: BroadcastMessage,
    options: RequestOptions = {},
  ): Promise<BroadcastResponse> {
    const path = "/drivers/broadcast-message";
    const { payload, runId, ...rest } = message;
    const wire = {
      ...rest,
      ...(runId === undefined ? {} : { run_id: runId }),
      payload: typeof payload === "string" ? payload : JSON.stringify(payload),
    };
    const reply = await this.#request({
      method: "POST",
      path,
      body: wire,
      ...callOptions(options),
    });
    return this.#decode(BroadcastResponseSchema, reply, "POST", path);
  }

  // --- machinery ----------------------------------------------------------

  #streamLogs(path: string, signal: AbortSignal | undefined): AsyncIterable<LogEntry> {
    const events = readSse(this.baseUrl + path, {
      fetch: this.#fetch,
      headers: () => this.#headersFor(true),
      signal,
      connectTimeout: this.#streamConnectTimeout,
      maxRetries: this.#streamMaxRetries,
      dedupeWindow: this.#streamDedupeWindow,
      idleTimeout: this.#streamIdleTimeout,
      initialDelay: this.#initialDelay,
      maxDelay: this.#maxDelay,
      key: logKey,
    });
    const decode = (data: string): LogEntry => {
      let json: unknown;
      try {
        json = JSON.parse(data);
      } catch (err) {
        throw new ConveyorApiError({
          status: 200,
          error: `stream sent an event that is not JSON: ${data.slice(0, 200)}`,
          method: "GET",
          path,
        }, { cause: err });
      }
      return this.#decode(ServerLogSchema, { status: 200, body: json }, "GET", path);
    };
    return {
      async *[Symbol.asyncIterator]() {
        for await (const ev of events) yield decode(ev.data);
      },
    };
  }

  async #headersFor(auth: boolean): Promise<Headers> {
    const headers = new Headers(this.#headers);
    if (!headers.has("Accept")) headers.set("Accept", "application/json");
    // The caller's trace (e.g. the reconcile's span) continues at the server.
    propagation.inject(context.active(), headers, headerSetter);
    if (auth && this.#auth) {
      if (!this.#warnedPlain && plainRemote(this.baseUrl)) {
        this.#warnedPlain = true;
        getLogger(["conveyor", "client"]).warn(
          "sending bearer tokens to {url} over plain http: anyone on the path can read and " +
            "replay them for their lifetime; use https",
          { url: this.baseUrl },
        );
      }
      headers.set("Authorization", `Bearer ${await this.#auth.token()}`);
    }
    return headers;
  }

  /** Validates a 2xx body; a mismatch is the server's fault, reported as such. */
  #decode<T>(schema: v.GenericSchema<unknown, T>, reply: Reply, method: string, path: string): T {
    const parsed = v.safeParse(schema, reply.body);
    if (parsed.success) return parsed.output;
    const issues = parsed.issues.map((i) => {
      const at = v.getDotPath(i);
      return at ? `${at}: ${i.message}` : i.message;
    });
    throw new ConveyorApiError({
      status: reply.status,
      error: `unexpected response body: ${issues.join("; ")}`,
      method,
      path,
    }, { cause: new v.ValiError(parsed.issues) });
  }

  /**
   * Sends a request, retrying what cannot repeat work (see `RetryOptions`);
   * resolves to the 2xx answer.
   */
  async #request(call: Call): Promise<Reply> {
    const safe = SAFE.has(call.method) || call.idempotent === true;
    for (let attempt = 1;; attempt++) {
      try {
        return await this.#attempt(call);
      } catch (err) {
        if (call.signal?.aborted) throw call.signal.reason;
        if (attempt >= this.#attempts) throw err;
        if (!(safe ? retryable(err) : neverSent(err))) throw err;
        const asked = retryAfterOf.get(err as Error);
        // The server wants more time than we are willing to wait: give up.
        if (asked !== undefined && asked > this.#maxDelay) throw err;
        const delay = Math.max(
          asked ?? 0,
          backoff(attempt, { retryDelay: this.#initialDelay, retryMaxDelay: this.#maxDelay }),
        );
        await sleep(delay, call.signal);
      }
    }
  }

  async #attempt(call: Call): Promise<Reply> {
    const { method, signal } = call;
    const url = new URL(this.baseUrl + call.path);
    for (const [k, val] of Object.entries(call.query ?? {})) {
      if (val !== undefined && val !== "") url.searchParams.set(k, val);
    }
    const path = call.path + url.search;
    const headers = await this.#headersFor(call.auth ?? true);
    let body: string | undefined;
    if (call.body !== undefined) {
      body = JSON.stringify(call.body);
      // The server reads a body only when Content-Type ends in "json".
      headers.set("Content-Type", "application/json");
    }

    signal?.throwIfAborted();
    const ctl = new AbortController();
    let timedOut = false;
    const timer = this.#timeout === Infinity ? undefined : setTimeout(() => {
      timedOut = true;
      ctl.abort(new ApiTimeoutError({ method, path, timeout: this.#timeout }));
    }, this.#timeout);
    const onAbort = () => ctl.abort(signal?.reason);
    signal?.addEventListener("abort", onAbort, { once: true });
    let res: Response;
    let text: string;
    let truncated: boolean;
    try {
      res = await this.#fetch(url, { method, headers, body, signal: ctl.signal });
      // An error's body is read only as far as its message needs; an answer, up to a bound.
      ({ text, truncated } = await readText(res, res.ok ? MAX_RESPONSE_BYTES : MAX_ERROR_BODY));
    } catch (err) {
      if (signal?.aborted) throw signal.reason;
      if (timedOut) {
        throw new ApiTimeoutError({ method, path, timeout: this.#timeout }, { cause: err });
      }
      throw new ApiNetworkError({ method, path, notSent: connectFailed(err) }, { cause: err });
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
    }

    if (res.ok && truncated) {
      throw new ConveyorApiError({
        status: res.status,
        error: `response body over ${MAX_RESPONSE_BYTES} bytes`,
        method,
        path,
      });
    }
    if (!res.ok) {
      const err = new ConveyorApiError({
        status: res.status,
        error: httpErrorText(res, text),
        method,
        path,
      });
      const after = parseRetryAfter(res.headers.get("retry-after"));
      if (after !== undefined) retryAfterOf.set(err, after);
      throw err;
    }
    if (text.trim() === "") return { status: res.status, body: undefined };
    try {
      return { status: res.status, body: JSON.parse(text) };
    } catch (err) {
      // Text is fine where no body is expected (POST /logs answers "Created");
      // elsewhere validation reports it.
      if (!/json/i.test(res.headers.get("content-type") ?? "")) {
        return { status: res.status, body: text };
      }
      throw new ConveyorApiError({
        status: res.status,
        error: `response is not valid JSON: ${text.slice(0, 200)}`,
        method,
        path,
      }, { cause: err });
    }
  }
}

/**
 * The base URL without trailing slashes; a `ConfigError` for one that is not
 * http(s), or has a query or fragment (paths are appended to it).
 */
function checkBaseUrl(base: string): string {
  let url: URL;
  try {
    url = new URL(base);
  } catch (err) {
    throw new ConfigError("baseUrl", `baseUrl "${base}" is not a URL`, { cause: err });
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    throw new ConfigError("baseUrl", `baseUrl "${base}" is not http or https`);
  }
  if (url.search || url.hash || /[?#]/.test(base)) {
    throw new ConfigError(
      "baseUrl",
      `baseUrl "${base}" has a query or fragment: request paths are appended to it`,
    );
  }
  return base.replace(/\/+$/, "");
}

/**
 * A duration option in ms, checked: a `ConfigError` for a negative or NaN
 * one, or one of 2^31 ms or more (timers fire at once beyond it); `Infinity`
 * and 0 only where allowed.
 */
function duration(
  field: string,
  value: number | undefined,
  fallback: number,
  allow: { zero?: boolean; infinite?: boolean },
): number {
  if (value === undefined) return fallback;
  if (
    typeof value !== "number" || Number.isNaN(value) || value < 0 || (value === 0 && !allow.zero)
  ) {
    throw new ConfigError(field, `${field} must be a positive number of ms, got ${value}`);
  }
  if (value === Infinity) {
    if (allow.infinite) return Infinity;
    throw new ConfigError(field, `${field} cannot be Infinity`);
  }
  if (value >= MAX_TIMER_MS) {
    throw new ConfigError(
      field,
      `${field} of ${value} ms is 2^31 ms or more, which timers cannot wait` +
        (allow.infinite ? "; use Infinity for no limit" : ""),
    );
  }
  return value;
}

/**
 * A count option, checked: an integer from `min` to `max` (or `Infinity`
 * where allowed).
 */
function count(
  field: string,
  value: number | undefined,
  fallback: number,
  min: number,
  infinite = false,
  max = Number.MAX_SAFE_INTEGER,
): number {
  if (value === undefined) return fallback;
  if (value === Infinity && infinite) return value;
  if (Number.isInteger(value) && value >= min && value <= max) return value;
  const range = max === Number.MAX_SAFE_INTEGER ? `of at least ${min}` : `from ${min} to ${max}`;
  throw new ConfigError(field, `${field} must be an integer ${range}, got ${value}`);
}

/**
 * The identity the environment names (`CONVEYOR_CERT_FILE`, …) as a token
 * source, created on the first request (the constructor cannot wait for
 * files); undefined when none is named. A failed creation is tried again
 * on the next request.
 */
function identityFromEnv(): TokenSource | undefined {
  const options = authFromEnv();
  if (!options) return undefined;
  let identity: Promise<Identity> | undefined;
  return {
    async token() {
      identity ??= createIdentity(options).catch((err) => {
        identity = undefined;
        throw err;
      });
      return await (await identity).token();
    },
  };
}

/** Whether `url` is plain http to a host other than this machine. */
function plainRemote(url: string): boolean {
  const { protocol, hostname } = new URL(url);
  if (protocol !== "http:") return false;
  const host = hostname.replace(/^\[|\]$/g, "");
  return !(host === "localhost" || host.endsWith(".localhost") || /^127\./.test(host) ||
    host === "::1");
}

/** Whether a failed request provably never reached the server. */
function neverSent(err: unknown): boolean {
  return err instanceof ApiNetworkError && err.notSent;
}

/**
 * Whether `fetch` failed while connecting (refused, name not resolved), so
 * no byte of the request was sent. Each runtime says it its own way: Node
 * (undici) and Bun with `code`, Deno in the message ("client error
 * (Connect)"), somewhere along the cause chain.
 */
function connectFailed(err: unknown): boolean {
  let e: unknown = err;
  for (let i = 0; i < 5 && e instanceof Error; i++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === "string" && CONNECT_CODES.has(code)) return true;
    if (/client error \(Connect\)|ECONNREFUSED|ENOTFOUND|EAI_AGAIN/.test(e.message)) return true;
    e = e.cause;
  }
  return false;
}

const CONNECT_CODES = new Set(["ECONNREFUSED", "ENOTFOUND", "EAI_AGAIN", "EAI_NONAME"]);

function retryable(err: unknown): boolean {
  if (err instanceof ConveyorApiError) return RETRY_STATUS.has(err.status);
  return err instanceof ApiNetworkError || err instanceof ApiTimeoutError;
}

const headerSetter: TextMapSetter<Headers> = {
  set: (headers, key, value) => headers.set(key, value),
};
