/**
 * Wire types of Conveyor CI and their valibot schemas.
 *
 * The schemas mirror the SDD's JSON schemas (section 3.5) and accept what the
 * real Conveyor server sends: it encodes a DriverMessage's `payload` as a JSON
 * string holding the Resource, where the SDD says an object. Input schemas are
 * lenient where the server may add fields; what this package emits always
 * fits the SDD schemas (`additionalProperties: false`).
 *
 * @module
 */
import * as v from "valibot";
import { InvalidMessageError } from "./errors.ts";

/** Any JSON value, as carried in `spec` and in a result's `data`. */
export type JsonValue =
  | string
  | number
  | boolean
  | null
  | JsonValue[]
  | { [key: string]: JsonValue };

/**
 * A Conveyor CI Resource (SDD 3.5.1): the state a driver reconciles.
 *
 * @example
 * ```ts
 * import type { Resource } from "@conveyor/driver";
 * const r: Resource = {
 *   id: "0b7e…", name: "web", resource: "pipeline",
 *   metadata: { version: "1" }, spec: { image: "node:20" },
 * };
 * ```
 */
export interface Resource<Spec = unknown> {
  /** Server-assigned identifier. */
  id: string;
  /** The resource's name, unique within its type. */
  name: string;
  /** The resource type, e.g. `"pipeline"`; drivers subscribe by type. */
  resource: string;
  /** The pipeline this resource runs through, when it has one. */
  pipeline?: string;
  /** Arbitrary metadata; the server itself only writes string values. */
  metadata: Record<string, unknown>;
  /**
   * Resource-specific specification: any JSON, or, for a driver with a
   * `spec` schema, what that schema made of it.
   */
  spec: Spec;
}

/**
 * The event a driver receives (SDD 3.5.2), with `payload` already decoded.
 */
export interface DriverMessage {
  /** Event name, e.g. `create`, or the pipeline's event; an open set. */
  event: string;
  /** Message identifier assigned by the server. */
  id: string;
  /** Run identifier (a UUID) shared by every step of a pipeline run. */
  run_id: string;
  /** The resource the event is about. */
  payload: Resource;
}

/**
 * What `reconcile` returns (SDD 3.5.3). `data` may be omitted and is sent as
 * `null`.
 */
export interface DriverResult {
  /** Whether the work succeeded; `true` moves the pipeline on. */
  success: boolean;
  /** A human-readable summary. */
  message: string;
  /** Arbitrary JSON-serializable result data. */
  data?: unknown;
}

/** The result as published for the pipeline engine (SDD 3.5.4). */
export interface DriverResultEvent {
  /** Whether the work succeeded. */
  success: boolean;
  /** A human-readable summary. */
  message: string;
  /** Result data; `null` when the driver returned none. */
  data: unknown;
  /** The driver's name. */
  driver: string;
}

/**
 * The envelope the server's pipeline engine decodes from
 * `pipelines.driver.result` (Go `PipelineEvent`).
 */
export interface ResultEnvelope {
  /** Always `"driver.result"`. */
  event: "driver.result";
  /** The run the result belongs to. */
  run_id: string;
  /** The resource as received. */
  resource: Resource;
  /** The driver's result. */
  driverresult: DriverResultEvent;
}

/** One log line (SDD 3.5.5), as published on `logs.{runid}`. */
export interface LogEntry {
  /** Run identifier (note: `runid`, not `run_id`). */
  runid: string;
  /** The driver's name. */
  driver: string;
  /** The pipeline, when the resource has one. */
  pipeline?: string;
  /** RFC 3339 timestamp. */
  timestamp: string;
  /** The log message. */
  message: string;
}

const nonEmpty = v.pipe(v.string(), v.minLength(1, "must not be empty"));

/** Longest DriverMessage `id` accepted (the server's are UUIDs). */
export const MAX_ID_LENGTH = 256;

/**
 * Schema of an incoming Resource. Unknown top-level fields are kept rather
 * than rejected, so a newer server does not break older drivers.
 */
export const ResourceSchema: v.GenericSchema<unknown, Resource> = v.looseObject(
  {
    id: nonEmpty,
    name: nonEmpty,
    resource: nonEmpty,
    pipeline: v.optional(v.string()),
    metadata: v.record(v.string(), v.unknown()),
    spec: v.unknown(),
  },
);

/**
 * The server sends `payload` as a JSON string; the SDD as an object. Both
 * decode to a Resource.
 */
const PayloadSchema = v.pipe(
  v.unknown(),
  v.rawTransform(({ dataset, addIssue, NEVER }) => {
    if (typeof dataset.value !== "string") return dataset.value;
    try {
      return JSON.parse(dataset.value) as unknown;
    } catch (err) {
      addIssue({ message: `payload is not valid JSON: ${(err as Error).message}` });
      return NEVER;
    }
  }),
  ResourceSchema,
);

/** Schema of an incoming DriverMessage; decodes a string `payload`. */
export const DriverMessageSchema: v.GenericSchema<unknown, DriverMessage> = v
  .looseObject({
    event: nonEmpty,
    id: v.pipe(
      nonEmpty,
      v.maxLength(MAX_ID_LENGTH, `must be at most ${MAX_ID_LENGTH} characters`),
      // The id goes into the result's Nats-Msg-Id header, where CR or LF is invalid.
      // deno-lint-ignore no-control-regex
      v.regex(/^[^\x00-\x1f\x7f]*$/, "must not contain control characters"),
    ),
    run_id: v.pipe(v.string(), v.uuid("run_id must be a UUID")),
    payload: PayloadSchema,
  });

/** Schema of what `reconcile` may return (when it returns an object). */
export const DriverResultSchema: v.GenericSchema<unknown, DriverResult> = v
  .object({
    success: v.boolean(),
    message: v.string(),
    data: v.optional(v.unknown()),
  });

/** Schema of a Log Entry exactly as the SDD defines it (no extra fields). */
export const LogEntrySchema: v.GenericSchema<unknown, LogEntry> = v
  .strictObject({
    runid: v.pipe(v.string(), v.uuid()),
    driver: nonEmpty,
    pipeline: v.optional(nonEmpty),
    timestamp: v.pipe(v.string(), v.isoTimestamp()),
    message: v.string(),
  });

/** Schema of the result envelope published on `pipelines.driver.result`. */
export const ResultEnvelopeSchema: v.GenericSchema<unknown, ResultEnvelope> = v
  .strictObject({
    event: v.literal("driver.result"),
    run_id: nonEmpty,
    resource: ResourceSchema,
    driverresult: v.strictObject({
      success: v.boolean(),
      message: v.string(),
      data: v.unknown(),
      driver: nonEmpty,
    }),
  });

/** What is wrong with a name that must fit into NATS subjects. */
export function nameProblem(name: unknown, what: string): string | undefined {
  if (typeof name !== "string" || name.length === 0) {
    return `${what} must be a non-empty string`;
  }
  const bad = /[\s.*>/\\]/.exec(name);
  if (bad) {
    return `${what} ${JSON.stringify(name)} contains ${JSON.stringify(bad[0])}; ` +
      "names go into NATS subjects and must not contain whitespace, '.', '*', '>', '/' or '\\'";
  }
  return undefined;
}

/**
 * Decodes and validates an incoming DriverMessage (a JSON string, bytes, or
 * an already parsed value), accepting `payload` as an object or as the JSON
 * string the Conveyor server sends.
 *
 * @throws {InvalidMessageError} listing every problem with its path.
 * @example
 * ```ts
 * import { parseDriverMessage } from "@conveyor/driver";
 * const msg = parseDriverMessage('{"event":"create","id":"1","run_id":"0b7e1c1e-8d4e-4f7a-9a52-4a3b2c1d0e9f","payload":"{\\"id\\":\\"r\\",\\"name\\":\\"web\\",\\"resource\\":\\"pipeline\\",\\"metadata\\":{},\\"spec\\":null}"}');
 * console.log(msg.payload.name); // "web"
 * ```
 */
export function parseDriverMessage(
  input: string | Uint8Array | unknown,
  subject = "(unknown subject)",
): DriverMessage {
  let value = input;
  if (input instanceof Uint8Array) value = new TextDecoder().decode(input);
  if (typeof value === "string") {
    try {
      value = JSON.parse(value);
    } catch (err) {
      throw new InvalidMessageError(subject, [
        { path: "", message: `not JSON: ${(err as Error).message}` },
      ], { cause: err });
    }
  }
  const parsed = v.safeParse(DriverMessageSchema, value);
  if (parsed.success) return parsed.output;
  throw new InvalidMessageError(
    subject,
    parsed.issues.map((i) => ({ path: v.getDotPath(i) ?? "", message: i.message })),
    { cause: new v.ValiError(parsed.issues) },
  );
}

// ---------------------------------------------------------------------------
// HTTP API types (client.ts). The server is written in Go: every field of its
// structs is always present in what it sends (empty strings, `null` for a nil
// slice or map), so output schemas fill in defaults rather than reject.

/**
 * A Resource as sent to `POST /resources/` or `PUT /resources/{type}/{name}`:
 * the server assigns `id` and sets `metadata.version`.
 *
 * @example
 * ```ts
 * import type { ResourceInit } from "@conveyor/driver";
 * const web: ResourceInit = { name: "web", resource: "app", pipeline: "ci", spec: { image: "node:20" } };
 * ```
 */
export interface ResourceInit {
  /** Ignored on create: the server assigns one. */
  id?: string;
  /** The resource's name, unique within its type. */
  name: string;
  /** The resource type; a resource definition of that name must exist. */
  resource: string;
  /** The pipeline to run the resource through; its `resource` must match. */
  pipeline?: string;
  /**
   * String metadata: the server's decoder rejects values that are not
   * strings. On create the v0.6 server replaces it with `{ version: "1" }`.
   */
  metadata?: Record<string, string>;
  /** Resource-specific specification, validated by the server against the definition's schema. */
  spec?: unknown;
}

/** What `POST /resources/` answers (201). */
export interface CreateResourceResponse {
  /** The resource's name. */
  name: string;
  /** The run started for the resource's `create` event (a UUID). */
  runid: string;
  /** Human-readable confirmation. */
  message: string;
  /** The stored version, `"1"` for a new resource. */
  version: string;
}

/** A resource type and the JSON schema its resources' `spec` must satisfy. */
export interface ResourceDefinition {
  /** Server-assigned identifier; empty when `apply` updated an existing definition. */
  id: string;
  /** The resource type this defines, e.g. `"app"`. */
  name: string;
  /** Human-readable description. */
  description: string;
  /** Version label, free text. */
  version: string;
  /** JSON schema of a resource's `spec`. */
  schema: unknown;
}

/** A resource definition as sent to the server; `id` is assigned by it. */
export interface ResourceDefinitionInit {
  /** Ignored on create: the server assigns one. */
  id?: string;
  /** The resource type this defines. */
  name: string;
  /** Human-readable description. */
  description?: string;
  /** Version label, free text. */
  version?: string;
  /** JSON schema of a resource's `spec`; the server refuses resources of a type without one. */
  schema: unknown;
}

/** One step of a pipeline: the driver that handles it. */
export interface Step {
  /** Step identifier, unique within the pipeline. */
  id: string;
  /** Human-readable name. */
  name: string;
  /** The driver that runs the step. */
  driver: string;
}

/**
 * A pipeline: the steps, each a driver, a resource goes through.
 *
 * @example
 * ```ts
 * import type { Pipeline } from "@conveyor/driver";
 * const ci: Pipeline = {
 *   name: "ci", resource: "app",
 *   steps: [{ id: "1", name: "build", driver: "builder" }, { id: "2", name: "deploy", driver: "deployer" }],
 * };
 * ```
 */
export interface Pipeline {
  /** The pipeline's name. */
  name: string;
  /** Human-readable description. */
  description?: string;
  /** Version label, free text. */
  version?: string;
  /** The resource type the pipeline processes. */
  resource: string;
  /** The steps, in order. */
  steps: Step[];
  /** String metadata. */
  metadata?: Record<string, string>;
}

/** What `GET /health` answers. */
export interface HealthStatus {
  /** `"healthy"` when the server is up. */
  status: string;
  /** The server's clock, Unix seconds. */
  time: number;
}

/**
 * A message for `POST /drivers/broadcast-message`. `payload` may be a
 * Resource (or any JSON object), sent as the JSON string the server expects,
 * or that string already encoded. The server assigns `id`.
 *
 * The client's parameters spell the run id `runId` everywhere (as `listLogs`
 * and `ctx.runId` do); it goes on the wire as the server's `run_id`. What the
 * server sends back keeps its own names (`runid` in `createResource`'s answer
 * and in log lines).
 *
 * @example
 * ```ts
 * import { type BroadcastMessage, Client } from "@conveyor/driver";
 * const api = new Client({ baseUrl: "http://localhost:8080" });
 * const web = await api.getResource("app", "web");
 * const runId = "0b7e1c1e-8d4e-4f7a-9a52-4a3b2c1d0e9f";
 * const message: BroadcastMessage = { event: "sync", runId, payload: web };
 * await api.broadcastMessage(message);
 * ```
 */
export interface BroadcastMessage {
  /** Event name, e.g. `"create"`. */
  event: string;
  /** Run identifier to carry, if any; sent as `run_id`. */
  runId?: string;
  /** Ignored: the server assigns one. */
  id?: string;
  /** The resource (or other JSON object) the message is about, or its JSON text. */
  payload: Resource | ResourceInit | Record<string, unknown> | string;
}

/** What `POST /drivers/broadcast-message` answers. */
export interface BroadcastResponse {
  /** `"message published"`. */
  message: string;
}

const str = v.optional(v.string(), "");

/** Schema of a Pipeline as the server sends it; `null` steps become `[]`. */
export const PipelineSchema: v.GenericSchema<unknown, Pipeline> = v.pipe(
  v.looseObject({
    name: v.string(),
    description: v.optional(v.string()),
    version: v.optional(v.string()),
    resource: v.string(),
    steps: v.nullish(
      v.array(v.looseObject({ id: str, name: str, driver: v.string() })),
    ),
    metadata: v.nullish(v.record(v.string(), v.string())),
  }),
  v.transform((p) => {
    const { steps, metadata, ...rest } = p;
    return { ...rest, steps: steps ?? [], ...(metadata ? { metadata } : {}) } as Pipeline;
  }),
);

/** Schema of a ResourceDefinition as the server sends it. */
export const ResourceDefinitionSchema: v.GenericSchema<unknown, ResourceDefinition> = v
  .looseObject({
    id: str,
    name: v.string(),
    description: str,
    version: str,
    schema: v.unknown(),
  });

/** Schema of the answer to `POST /resources/`. */
export const CreateResourceResponseSchema: v.GenericSchema<unknown, CreateResourceResponse> = v
  .looseObject({
    name: v.string(),
    runid: v.string(),
    message: str,
    version: v.pipe(v.union([v.string(), v.number()]), v.transform(String)),
  });

/** Schema of the answer to `GET /health`. */
export const HealthStatusSchema: v.GenericSchema<unknown, HealthStatus> = v.looseObject({
  status: v.string(),
  time: v.number(),
});

/** Schema of the answer to `POST /drivers/broadcast-message`. */
export const BroadcastResponseSchema: v.GenericSchema<unknown, BroadcastResponse> = v
  .looseObject({ message: v.string() });

/**
 * Schema of a log line as the server sends it (`GET /logs`, SSE streams):
 * lenient where {@link LogEntrySchema} is strict. The server writes
 * `"pipeline": ""` for lines without one (dropped here, so stored and live
 * lines look alike), and older drivers wrote Unix-seconds timestamps.
 */
export const ServerLogSchema: v.GenericSchema<unknown, LogEntry> = v.pipe(
  v.looseObject({
    runid: v.string(),
    driver: v.string(),
    pipeline: v.nullish(v.string()),
    timestamp: v.string(),
    message: v.string(),
  }),
  v.transform(({ runid, driver, pipeline, timestamp, message }) => {
    const entry: LogEntry = { runid, driver, timestamp, message };
    if (pipeline) entry.pipeline = pipeline;
    return entry;
  }),
);
