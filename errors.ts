/**
 * Typed errors of the driver runtime. Each has a stable `name` so callers can
 * tell them apart across realms and bundles, and keeps the underlying error as
 * `cause`.
 *
 * @module
 */
import { redactUrl } from "./_util.ts";

/**
 * Base class of every error this package throws.
 *
 * @example
 * ```ts
 * import { ConveyorError, serve } from "@conveyor/driver";
 * try {
 *   await serve({ name: "echo", resources: ["pipeline"], reconcile() {} });
 * } catch (err) {
 *   if (err instanceof ConveyorError) console.error(err.name, err.message);
 * }
 * ```
 */
export class ConveyorError extends Error {
  /** Creates the error; `options.cause` keeps what led to it. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "ConveyorError";
  }
}

/** The driver definition or the options given to `serve` are not usable. */
export class ConfigError extends ConveyorError {
  /** The driver field or option at fault, e.g. `"name"` or `"concurrency"`. */
  readonly field: string;
  /** Creates the error for `field`. */
  constructor(field: string, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "ConfigError";
    this.field = field;
  }
}

/**
 * The NATS server could not be reached (after the connect policy ran out).
 * Credentials in the server URLs never appear in it: `servers` and the
 * message name the servers without their user info.
 */
export class ConnectError extends ConveyorError {
  /** The servers that were tried, without user info. */
  readonly servers: string[];
  /** Creates the error for the given servers; `hint` says what may fix it. */
  constructor(servers: string[], options?: ErrorOptions & { hint?: string }) {
    const shown = servers.map(redactUrl);
    const why = options?.cause instanceof Error ? `: ${redactText(options.cause.message)}` : "";
    const hint = options?.hint ? ` (${options.hint})` : "";
    super(`cannot connect to NATS at ${shown.join(", ")}${why}${hint}`, options);
    this.name = "ConnectError";
    this.servers = shown;
  }
}

/** Removes user info from any URL inside a text. */
function redactText(text: string): string {
  return text.replace(/[a-z][a-z0-9+.-]*:\/\/[^/@\s]*@/gi, (m) => redactUrl(m));
}

/**
 * A JetStream stream the runtime needs does not exist. The Conveyor server
 * creates the streams at start-up, so this usually means it is not running
 * against this NATS server.
 */
export class StreamNotFoundError extends ConveyorError {
  /** The missing stream. */
  readonly stream: string;
  /** Creates the error for `stream`. */
  constructor(stream: string, options?: ErrorOptions) {
    super(
      `JetStream stream "${stream}" not found: is the Conveyor server running ` +
        "against this NATS server?",
      options,
    );
    this.name = "StreamNotFoundError";
    this.stream = stream;
  }
}

/** The driver's consumer exists with settings that cannot be updated in place. */
export class ConsumerError extends ConveyorError {
  /** The consumer (the driver's name). */
  readonly consumer: string;
  /** Creates the error for `consumer`. */
  constructor(consumer: string, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "ConsumerError";
    this.consumer = consumer;
  }
}

/** One problem found while decoding a message. */
export interface MessageIssue {
  /** Dotted path to the offending field, e.g. `"payload.name"`; empty for the root. */
  path: string;
  /** What is wrong. */
  message: string;
}

/**
 * An incoming message is not a valid DriverMessage. The runtime terminates
 * such a message (it would fail the same way on every redelivery).
 */
export class InvalidMessageError extends ConveyorError {
  /** The NATS subject the message arrived on. */
  readonly subject: string;
  /** Each problem found, with its path. */
  readonly issues: MessageIssue[];
  /** Creates the error from the problems found. */
  constructor(subject: string, issues: MessageIssue[], options?: ErrorOptions) {
    const list = issues.map((
      i,
    ) => (i.path ? `${i.path}: ${i.message}` : i.message));
    super(`invalid DriverMessage on ${subject}: ${list.join("; ")}`, options);
    this.name = "InvalidMessageError";
    this.subject = subject;
    this.issues = issues;
  }
}

/**
 * Thrown by a reconcile to fail the event at once, without retries: for
 * failures that another attempt cannot fix (a bad spec, a missing secret).
 *
 * @example
 * ```ts
 * import { PermanentError, serve } from "@conveyor/driver";
 * await serve({
 *   name: "deployer",
 *   resources: ["app"],
 *   reconcile({ resource }) {
 *     if (!resource.spec) throw new PermanentError("spec is required");
 *   },
 * });
 * ```
 */
export class PermanentError extends ConveyorError {
  /** Creates the error. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "PermanentError";
  }
}

/** One problem a spec schema found: what and where (`"steps.0.image"`, empty at the top). */
export interface SpecIssue {
  /** The schema's message. */
  readonly message: string;
  /** Dotted path of the value at fault; empty for the spec itself. */
  readonly path: string;
}

/**
 * A resource's `spec` does not fit the driver's `spec` schema: a permanent
 * failure (no retry; the event is reported failed and terminated), naming
 * every problem.
 *
 * @example
 * ```ts
 * import { InvalidSpecError } from "@conveyor/driver";
 * const err = new InvalidSpecError([{ path: "image", message: "expected a string" }]);
 * console.log(err.message); // resource spec does not fit the driver's schema: image: expected a string
 * ```
 */
export class InvalidSpecError extends PermanentError {
  /** Every problem found, at most 20. */
  readonly issues: readonly SpecIssue[];
  /** Creates the error for `issues`. */
  constructor(issues: readonly SpecIssue[], options?: ErrorOptions) {
    const kept = issues.slice(0, 20);
    const text = kept.map((i) => (i.path ? `${i.path}: ${i.message}` : i.message).slice(0, 300));
    const more = issues.length > kept.length ? ` (and ${issues.length - kept.length} more)` : "";
    super(`resource spec does not fit the driver's schema: ${text.join("; ")}${more}`, options);
    this.name = "InvalidSpecError";
    this.issues = kept;
  }
}

/** A reconcile ran longer than `reconcileTimeout`; the `ctx.signal` reason. */
export class ReconcileTimeoutError extends ConveyorError {
  /** The limit that was exceeded, in milliseconds. */
  readonly timeout: number;
  /** Creates the error for a limit of `timeout` ms. */
  constructor(timeout: number) {
    super(`reconcile did not finish within ${timeout} ms`);
    this.name = "ReconcileTimeoutError";
    this.timeout = timeout;
  }
}

/**
 * The runtime is shutting down and stopped waiting for a reconcile; the
 * `ctx.signal` reason. The event goes back to the stream for another instance.
 */
export class ShutdownError extends ConveyorError {
  /** Creates the error. */
  constructor(
    message = "driver is shutting down; the event will be redelivered",
  ) {
    super(message);
    this.name = "ShutdownError";
  }
}

/** Publishing a log line or a result to NATS failed after retries. */
export class PublishError extends ConveyorError {
  /** The subject that could not be published to. */
  readonly subject: string;
  /** Creates the error for `subject`. */
  constructor(subject: string, options?: ErrorOptions) {
    const why = options?.cause instanceof Error ? `: ${options.cause.message}` : "";
    super(`cannot publish to ${subject}${why}`, options);
    this.name = "PublishError";
    this.subject = subject;
  }
}

/**
 * The Conveyor API answered with an error status. `error` holds the server's
 * message: the `error` field of a JSON body, or the plain-text body.
 *
 * @example
 * ```ts
 * import { Client, ConveyorApiError } from "@conveyor/driver";
 * try {
 *   await new Client().getResource("pipeline", "web");
 * } catch (err) {
 *   if (err instanceof ConveyorApiError && err.status === 401) console.error("check the client certificate");
 * }
 * ```
 */
export class ConveyorApiError extends ConveyorError {
  /** HTTP status code. */
  readonly status: number;
  /** The server's error text. */
  readonly error: string;
  /** HTTP method of the request. */
  readonly method: string;
  /** Path of the request, e.g. `/resources/pipeline/web`. */
  readonly path: string;
  /**
   * The server says what was asked for does not exist: a handler's 404, or
   * the v0.6 server's 500 for a missing resource, resource definition or
   * version (its lookup error, "… not found"). False for a path the server
   * does not route (404 `Cannot GET …`).
   *
   * @example
   * ```ts
   * import { Client, ConveyorApiError } from "@conveyor/driver";
   * const api = new Client({ baseUrl: "http://localhost:8080" });
   * try {
   *   await api.getResource("app", "web");
   * } catch (err) {
   *   if (err instanceof ConveyorApiError && err.notFound) console.log("no such resource");
   *   else throw err;
   * }
   * ```
   */
  readonly notFound: boolean;
  /** Creates the error for a response. */
  constructor(
    init: { status: number; error: string; method: string; path: string },
    options?: ErrorOptions,
  ) {
    super(`${init.method} ${init.path} failed with ${init.status}: ${init.error}`, options);
    this.name = "ConveyorApiError";
    this.status = init.status;
    this.error = init.error;
    this.method = init.method;
    this.path = init.path;
    this.notFound = init.status === 404
      ? !/^Cannot [A-Z]+ \//.test(init.error)
      : init.status === 500 && /\bnot found\b/i.test(init.error);
  }
}

/** A request to the Conveyor API failed before a response arrived. */
export class ApiNetworkError extends ConveyorError {
  /** HTTP method of the request. */
  readonly method: string;
  /** Path of the request. */
  readonly path: string;
  /**
   * True when the request provably never reached the server (connection
   * refused, name not resolved): sending it again cannot repeat its work.
   */
  readonly notSent: boolean;
  /** Creates the error; `cause` is the error `fetch` threw. */
  constructor(
    init: { method: string; path: string; notSent?: boolean },
    options?: ErrorOptions,
  ) {
    const why = options?.cause instanceof Error ? `: ${options.cause.message}` : "";
    super(`${init.method} ${init.path}: network error${why}`, options);
    this.name = "ApiNetworkError";
    this.method = init.method;
    this.path = init.path;
    this.notSent = init.notSent ?? false;
  }
}

/** A request to the Conveyor API took longer than the client's `timeout`. */
export class ApiTimeoutError extends ConveyorError {
  /** HTTP method of the request. */
  readonly method: string;
  /** Path of the request. */
  readonly path: string;
  /** The limit, in milliseconds. */
  readonly timeout: number;
  /** Creates the error. */
  constructor(init: { method: string; path: string; timeout: number }, options?: ErrorOptions) {
    super(`${init.method} ${init.path}: no response within ${init.timeout} ms`, options);
    this.name = "ApiTimeoutError";
    this.method = init.method;
    this.path = init.path;
    this.timeout = init.timeout;
  }
}

/** A certificate, key or CA could not be read or used for authentication. */
export class AuthError extends ConveyorError {
  /** Creates the error. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "AuthError";
  }
}
