/**
 * A local stand-in for the Conveyor API server, for tests: it follows the
 * server's swagger.json (paths, methods, status codes, JSON bodies) and the
 * v0.6 server's habits (a JSON `Content-Type` or 400, 500 with its texts for
 * a missing resource, definition or version, path parameters taken as sent,
 * without percent-decoding, plain-text errors in places, log streams that replay stored lines
 * first), keeps everything in memory, records every request, and can be told
 * to fail: statuses with JSON or text bodies, delays, `Retry-After`, dropped
 * connections, and log streams with heartbeats, split chunks, CRLF line ends
 * or a connection dropped after some events.
 *
 * Built on `node:http`, so it runs on Deno, Bun and Node.
 *
 * @example
 * ```ts
 * import { startTestApiServer } from "./test_api_server.ts";
 * import { Client } from "./client.ts";
 * await using api = await startTestApiServer();
 * api.fail({ match: "GET /health", status: 503, headers: { "Retry-After": "0" } });
 * const client = new Client({ baseUrl: api.url });
 * await client.health(); // retried once, then { status: "healthy", ... }
 * ```
 *
 * @module
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { Socket } from "node:net";
import type { LogEntry, Pipeline, Resource, ResourceDefinition } from "./types.ts";

/** One request the server received. */
export interface RecordedRequest {
  /** HTTP method. */
  method: string;
  /** Path as sent, without the query. */
  path: string;
  /** Query parameters. */
  query: Record<string, string>;
  /** Headers, names in lower case. */
  headers: Record<string, string>;
  /** The body as text ("" when none). */
  body: string;
  /** The swagger operation it matched, e.g. `"GET /resources/{type}/{name}"`. */
  operation?: string;
}

/** A failure to inject, for the next matching request(s). */
export interface Fault {
  /**
   * Which requests: a swagger operation (`"GET /resources/{type}/{name}"`),
   * `"METHOD /literal/path"`, or a predicate. All requests when absent.
   */
  match?: string | ((req: RecordedRequest) => boolean);
  /** How many matching requests it applies to. @default 1 */
  times?: number;
  /** Milliseconds to wait before answering (or dropping). */
  delay?: number;
  /** Close the connection without an answer (after `delay`). */
  drop?: boolean;
  /** Status to answer with; without it the request is served normally after `delay`. */
  status?: number;
  /** Body: a string is sent as `text/plain`, anything else as JSON. */
  body?: unknown;
  /** Extra response headers, e.g. `{ "Retry-After": "1" }`. */
  headers?: Record<string, string>;
}

/** How log streams write; change it between connections. */
export interface SseBehaviour {
  /** Line terminator of the stream. @default "\n" */
  lineEnding: "\n" | "\r\n" | "\r";
  /** When set, every write is cut into pieces of this many bytes, written apart. */
  chunkSize?: number;
  /** A `: heartbeat` comment every this many ms; 0 for none. @default 0 */
  heartbeat: number;
  /** Send a `: heartbeat` comment first thing (the headers go with it). */
  heartbeatFirst: boolean;
  /** A `retry:` field (ms) sent at the start of every stream. */
  retry?: number;
  /** Number each event with an `id:` field. */
  ids: boolean;
  /**
   * One entry per future connection, in order: that connection is dropped
   * after writing this many events (replayed ones included); 0 drops it
   * right after the heartbeat and `retry:` it starts with.
   */
  dropAfter: number[];
}

/** Options of {@link startTestApiServer}. */
export interface TestApiServerOptions {
  /**
   * `"swagger"` serves every operation of swagger.json; `"v0.6"` leaves out
   * what the v0.6 server does not route: `GET /resources/{type}` and
   * `GET`/`PUT`/`DELETE /pipelines/{name}` answer 404 `Cannot GET …`.
   * @default "swagger"
   */
  routing?: "swagger" | "v0.6";
  /**
   * When set, requests other than `/health`, `/swagger*` and `/metrics` need
   * `Authorization: Bearer <token>` with a token this accepts; else 401.
   */
  auth?: (token: string) => boolean;
}

/** A running test server. */
export interface TestApiServer extends AsyncDisposable {
  /** Base URL, e.g. `http://127.0.0.1:41234`. */
  readonly url: string;
  /** Every request received, in order. */
  readonly requests: RecordedRequest[];
  /** Stored resources: every version, by `type/name`. */
  readonly resources: Map<string, Resource[]>;
  /** Stored resource definitions, by name. */
  readonly definitions: Map<string, ResourceDefinition>;
  /** Stored pipelines, by name. */
  readonly pipelines: Map<string, Pipeline>;
  /** Stored log lines. */
  readonly logs: LogEntry[];
  /** Messages received by `POST /drivers/broadcast-message`. */
  readonly messages: Record<string, unknown>[];
  /** How log streams write; mutable. */
  readonly sse: SseBehaviour;
  /** Log streams open right now. */
  readonly openStreams: number;
  /** Queues a failure for the next matching request(s). */
  fail(fault: Fault): void;
  /**
   * What a driver's log line does: stored, and written to the open streams
   * of its run (as sent, field order kept).
   */
  pushLog(entry: LogEntry): void;
  /** Writes raw text to every open log stream (honouring `chunkSize`). */
  sseWrite(raw: string): void;
  /** Closes every open log stream's connection abruptly. */
  dropStreams(): void;
  /** Resolves once `n` log streams are open. */
  waitForStreams(n: number, timeout?: number): Promise<void>;
  /** Stops the server, closing every connection. */
  close(): Promise<void>;
}

interface Route {
  method: string;
  /** Swagger path template. */
  template: string;
  /** Not routed by the v0.6 server. */
  notInV06?: boolean;
  handler: (ctx: Ctx) => Promise<void> | void;
}

interface Ctx {
  req: IncomingMessage;
  res: ServerResponse;
  rec: RecordedRequest;
  params: Record<string, string>;
}

interface Stream {
  res: ServerResponse;
  runId: string;
  driver?: string;
  events: number;
  dropAfter?: number;
  /** Serialises writes, so split chunks keep their order. */
  chain: Promise<void>;
  timer?: ReturnType<typeof setInterval>;
  closed: boolean;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/**
 * Starts a test server on 127.0.0.1 with a free port.
 *
 * @example
 * ```ts
 * await using api = await startTestApiServer({ routing: "v0.6" });
 * ```
 */
export async function startTestApiServer(
  options: TestApiServerOptions = {},
): Promise<TestApiServer> {
  const routing = options.routing ?? "swagger";
  const requests: RecordedRequest[] = [];
  const resources = new Map<string, Resource[]>();
  const definitions = new Map<string, ResourceDefinition>();
  const pipelines = new Map<string, Pipeline>();
  const logs: LogEntry[] = [];
  const messages: Record<string, unknown>[] = [];
  const faults: (Fault & { left: number })[] = [];
  const streams = new Set<Stream>();
  const sockets = new Set<Socket>();
  const sse: SseBehaviour = {
    lineEnding: "\n",
    heartbeat: 0,
    heartbeatFirst: false,
    ids: false,
    dropAfter: [],
  };
  let eventId = 0;

  // --- helpers ------------------------------------------------------------

  function send(
    res: ServerResponse,
    status: number,
    body?: unknown,
    extra?: Record<string, string>,
  ) {
    // No keep-alive: a later drop then always hits a fresh connection, which
    // Deno's fetch does not retry behind the caller's back (it does on a
    // reused one).
    const headers: Record<string, string> = { connection: "close", ...extra };
    let text = "";
    if (typeof body === "string") {
      headers["content-type"] ??= "text/plain; charset=utf-8";
      text = body;
    } else if (body !== undefined) {
      headers["content-type"] ??= "application/json";
      text = JSON.stringify(body);
    }
    res.writeHead(status, headers);
    res.end(text);
  }
  const error = (res: ServerResponse, status: number, message: string) =>
    send(res, status, { error: message });

  /** Parses a JSON body as the server does: only with a JSON Content-Type. */
  function json(ctx: Ctx, plainErrors = false): Record<string, unknown> | undefined {
    const type = (ctx.rec.headers["content-type"] ?? "").split(";")[0].trim().toLowerCase();
    let value: unknown;
    let ok = type.endsWith("json");
    if (ok) {
      try {
        value = JSON.parse(ctx.rec.body);
      } catch {
        ok = false;
      }
    }
    if (!ok || value === null || typeof value !== "object" || Array.isArray(value)) {
      if (plainErrors) send(ctx.res, 400, "Unprocessable Entity");
      else error(ctx.res, 400, "Invalid request payload");
      return undefined;
    }
    return value as Record<string, unknown>;
  }

  const latest = (type: string, name: string) => resources.get(`${type}/${name}`)?.at(-1);
  const uuid = () => crypto.randomUUID();

  /** A stored log line as the Go server marshals it: every field, in struct order. */
  const goLog = (l: LogEntry) => ({
    runid: l.runid,
    driver: l.driver,
    pipeline: l.pipeline ?? "",
    timestamp: l.timestamp,
    message: l.message,
  });

  /** The v0.6 server's text for a missing definition: its model's error, wrapped. */
  const missingDefinition = (name: string) =>
    `Failed to find resource definition: resource definition with name ${name} not found`;

  function checkResource(ctx: Ctx, r: Record<string, unknown>, type: string): boolean {
    const def = definitions.get(type);
    if (!def) {
      // The handler's 404 branch never runs: the model's lookup error answers 500.
      error(ctx.res, 500, missingDefinition(type));
      return false;
    }
    if (def.schema === null || def.schema === undefined) {
      error(ctx.res, 400, "Resource definition schema is required");
      return false;
    }
    if (typeof r.pipeline === "string" && r.pipeline !== "") {
      const p = pipelines.get(r.pipeline);
      if (!p) {
        error(ctx.res, 400, `Pipeline ${r.pipeline} not found`);
        return false;
      }
      if (p.resource !== r.resource) {
        error(
          ctx.res,
          400,
          `Resource type ${r.resource} does not match pipeline resource type ${p.resource}`,
        );
        return false;
      }
    }
    return true;
  }

  // --- log streams --------------------------------------------------------

  function write(s: Stream, text: string) {
    s.chain = s.chain.then(async () => {
      if (s.closed) return;
      const bytes = new TextEncoder().encode(text);
      const size = sse.chunkSize ?? bytes.length;
      for (let i = 0; i < bytes.length && !s.closed; i += size) {
        // Wait until each piece is handed to the socket: pieces arrive in
        // separate reads, and a drop that follows does not swallow them.
        await new Promise<void>((resolve) => {
          s.res.write(bytes.subarray(i, i + size), () => resolve());
        });
        if (sse.chunkSize) await sleep(2);
      }
    });
  }

  function writeEvent(s: Stream, data: string) {
    const nl = sse.lineEnding;
    const id = sse.ids ? `id: ${++eventId}${nl}` : "";
    write(s, `${id}data: ${data}${nl}${nl}`);
    s.events++;
    if (s.dropAfter !== undefined && s.events >= s.dropAfter) {
      // Give the client time to read what was written before the drop.
      s.chain = s.chain.then(() => sleep(20)).then(() => kill(s));
    }
  }

  function kill(s: Stream) {
    if (s.closed) return;
    close(s);
    s.res.socket?.destroy();
    s.res.destroy();
  }

  function close(s: Stream) {
    s.closed = true;
    clearInterval(s.timer);
    streams.delete(s);
  }

  /**
   * The stored lines in the v0.6 server's order: its store's keys are
   * `pipeline|driver|runid|timestamp|uuid`, so lines come by pipeline, driver,
   * run, then timestamp as text (ties, random there, keep their order here).
   */
  function stored(): LogEntry[] {
    const key = (l: LogEntry) => [l.pipeline ?? "", l.driver, l.runid, l.timestamp];
    return logs.map((l, i) => ({ l, k: key(l), i })).sort((a, b) => {
      for (let j = 0; j < a.k.length; j++) {
        if (a.k[j] !== b.k[j]) return a.k[j] < b.k[j] ? -1 : 1;
      }
      return a.i - b.i;
    }).map((x) => x.l);
  }

  function openStream(ctx: Ctx, runId: string, driver?: string) {
    const { res } = ctx;
    // Like the real server, headers go out with the first bytes (an event or
    // a heartbeat), not before.
    res.statusCode = 200;
    res.setHeader("Content-Type", "text/event-stream");
    res.setHeader("Cache-Control", "no-cache");
    res.setHeader("Connection", "close");
    const s: Stream = {
      res,
      runId,
      driver,
      events: 0,
      dropAfter: sse.dropAfter.shift(),
      chain: Promise.resolve(),
      closed: false,
    };
    streams.add(s);
    res.on("close", () => close(s));
    const nl = sse.lineEnding;
    if (sse.heartbeatFirst) write(s, `: heartbeat${nl}${nl}`);
    if (sse.retry !== undefined) write(s, `retry: ${sse.retry}${nl}${nl}`);
    if (s.dropAfter === 0) {
      // A flapping proxy: the preamble (a heartbeat, `retry:`), then gone.
      s.chain = s.chain.then(() => sleep(5)).then(() => kill(s));
      return;
    }
    for (const l of stored()) {
      if (s.closed) break;
      if (l.runid === runId && (driver === undefined || l.driver === driver)) {
        writeEvent(s, JSON.stringify(goLog(l)));
      }
    }
    if (sse.heartbeat > 0) {
      s.timer = setInterval(() => write(s, `: heartbeat${nl}${nl}`), sse.heartbeat);
    }
  }

  // --- routes (swagger.json) ----------------------------------------------

  const routes: Route[] = [
    {
      method: "GET",
      template: "/health",
      handler: ({ res }) =>
        send(res, 200, { status: "healthy", time: Math.floor(Date.now() / 1000) }),
    },
    {
      method: "POST",
      template: "/resources",
      handler: (ctx) => {
        const r = json(ctx);
        if (!r) return;
        const type = typeof r.resource === "string" ? r.resource : "";
        if (type === "") return error(ctx.res, 400, "Resource type is required");
        if (!checkResource(ctx, r, type)) return;
        const stored = {
          ...r,
          id: uuid(),
          metadata: { version: "1" },
        } as unknown as Resource;
        resources.set(`${type}/${stored.name}`, [stored]);
        send(ctx.res, 201, {
          name: stored.name,
          runid: uuid(),
          message: "Resource created successfully",
          version: "1",
        });
      },
    },
    {
      method: "GET",
      template: "/resources/{type}",
      notInV06: true,
      handler: ({ res, params }) => {
        const list = [...resources.values()].map((v) => v.at(-1)!).filter((r) =>
          r.resource === params.type
        );
        send(res, 200, list);
      },
    },
    {
      method: "GET",
      template: "/resources/{type}/{name}",
      handler: ({ res, params }) => {
        const r = latest(params.type, params.name);
        if (!r) {
          return error(
            res,
            500,
            `Failed to find resource: resource with name ${params.name} and type ${params.type} not found`,
          );
        }
        send(res, 200, r);
      },
    },
    {
      method: "PUT",
      template: "/resources/{type}/{name}",
      handler: (ctx) => {
        const { params, res } = ctx;
        const r = json(ctx);
        if (!r) return;
        if (!checkResource(ctx, r, params.type)) return;
        const versions = resources.get(`${params.type}/${params.name}`);
        if (!versions) {
          return error(
            res,
            500,
            `Failed to update resource: resource with name ${params.name} and type ${params.type} not found`,
          );
        }
        const version = String(versions.length + 1);
        const updated = {
          ...r,
          id: versions[0].id,
          name: params.name,
          resource: params.type,
          metadata: { ...(r.metadata as Record<string, string> | undefined), version },
        } as unknown as Resource;
        versions.push(updated);
        send(res, 200, updated);
      },
    },
    {
      method: "DELETE",
      template: "/resources/{type}/{name}",
      handler: ({ res, params }) => {
        resources.delete(`${params.type}/${params.name}`);
        send(res, 204); // also when it did not exist, as the real server
      },
    },
    {
      method: "GET",
      template: "/resources/{type}/{name}/{version}",
      handler: ({ res, params }) => {
        const r = resources.get(`${params.type}/${params.name}`)?.find((x) =>
          x.metadata.version === params.version
        );
        if (!r) {
          return error(
            res,
            500,
            `Failed to find resource: resource with name ${params.name}, type ${params.type} ` +
              `and version ${params.version} not found`,
          );
        }
        send(res, 200, r);
      },
    },
    {
      method: "POST",
      template: "/resource-definitions",
      handler: (ctx) => {
        const d = json(ctx);
        if (!d) return;
        const def = definition(d, uuid());
        definitions.set(def.name, def);
        send(ctx.res, 201, def);
      },
    },
    {
      method: "POST",
      template: "/resource-definitions/apply",
      handler: (ctx) => {
        const d = json(ctx);
        if (!d) return;
        if (typeof d.name !== "string" || d.name === "") {
          return error(ctx.res, 400, "Resource name is required");
        }
        // Like the v0.6 server: an update keeps the body's id (usually none).
        const def = definition(d, definitions.has(d.name) ? undefined : uuid());
        definitions.set(def.name, def);
        send(ctx.res, 201, def);
      },
    },
    {
      method: "GET",
      template: "/resource-definitions/{name}",
      handler: ({ res, params }) => {
        const def = definitions.get(params.name);
        if (!def) return error(res, 500, missingDefinition(params.name));
        send(res, 200, def);
      },
    },
    {
      method: "PUT",
      template: "/resource-definitions/{name}",
      handler: (ctx) => {
        const d = json(ctx);
        if (!d) return;
        const old = definitions.get(ctx.params.name);
        if (!old) return error(ctx.res, 500, "Failed to update resource definition: not found");
        const def = definition({ ...d, name: ctx.params.name }, old.id);
        definitions.set(def.name, def);
        send(ctx.res, 200, def);
      },
    },
    {
      method: "DELETE",
      template: "/resource-definitions/{name}",
      handler: ({ res, params }) => {
        definitions.delete(params.name);
        send(res, 204);
      },
    },
    {
      method: "POST",
      template: "/pipelines",
      handler: (ctx) => {
        const p = json(ctx);
        if (!p) return;
        const resource = String(p.resource ?? "");
        if (!definitions.has(resource)) return error(ctx.res, 500, missingDefinition(resource));
        const pipeline = goPipeline(p);
        pipelines.set(pipeline.name, pipeline);
        send(ctx.res, 201, pipeline);
      },
    },
    {
      method: "GET",
      template: "/pipelines/{name}",
      notInV06: true,
      handler: ({ res, params }) => {
        const p = pipelines.get(params.name);
        if (!p) return error(res, 404, "Pipeline not found");
        send(res, 200, p);
      },
    },
    {
      method: "PUT",
      template: "/pipelines/{name}",
      notInV06: true,
      handler: (ctx) => {
        const p = json(ctx);
        if (!p) return;
        if (p.name !== ctx.params.name) {
          return error(ctx.res, 400, "Pipeline name in URL and body do not match");
        }
        if (!pipelines.has(ctx.params.name)) return error(ctx.res, 404, "Pipeline not found");
        const pipeline = goPipeline(p);
        pipelines.set(pipeline.name, pipeline);
        send(ctx.res, 200, pipeline);
      },
    },
    {
      method: "DELETE",
      template: "/pipelines/{name}",
      notInV06: true,
      handler: ({ res, params }) => {
        if (!pipelines.delete(params.name)) return error(res, 404, "Pipeline not found");
        send(res, 204);
      },
    },
    {
      method: "GET",
      template: "/logs",
      handler: ({ res, rec }) => {
        const { runid, driver, pipeline } = rec.query;
        send(
          res,
          200,
          stored().filter((l) =>
            (!runid || l.runid === runid) && (!driver || l.driver === driver) &&
            (!pipeline || l.pipeline === pipeline)
          ).map(goLog),
        );
      },
    },
    {
      method: "POST",
      template: "/logs",
      handler: (ctx) => {
        const l = json(ctx, true); // this handler answers in plain text
        if (!l) return;
        logs.push(l as unknown as LogEntry); // stored, not streamed (as the real server)
        send(ctx.res, 201, "Created");
      },
    },
    {
      method: "GET",
      template: "/logs/streams/{drivername}/{runid}",
      handler: (ctx) => openStream(ctx, ctx.params.runid, ctx.params.drivername),
    },
    {
      method: "GET",
      template: "/logs/pipeline/{runid}",
      handler: (ctx) => openStream(ctx, ctx.params.runid),
    },
    {
      method: "POST",
      template: "/drivers/broadcast-message",
      handler: (ctx) => {
        const m = json(ctx);
        if (!m) return;
        // The Go type has a string payload: anything else fails to decode.
        if (typeof m.payload !== "string" || typeof m.event !== "string") {
          return error(ctx.res, 400, "could not parse request body");
        }
        messages.push({ ...m, id: uuid() });
        send(ctx.res, 200, { message: "message published" });
      },
    },
  ];

  function definition(d: Record<string, unknown>, id: string | undefined): ResourceDefinition {
    return {
      id: id ?? (typeof d.id === "string" ? d.id : ""),
      name: String(d.name ?? ""),
      description: String(d.description ?? ""),
      version: String(d.version ?? ""),
      schema: d.schema ?? null,
    };
  }

  /** A pipeline as the Go server echoes it: every field, nil as null. */
  function goPipeline(p: Record<string, unknown>): Pipeline {
    return {
      name: String(p.name ?? ""),
      description: String(p.description ?? ""),
      version: String(p.version ?? ""),
      resource: String(p.resource ?? ""),
      steps: (p.steps ?? null) as Pipeline["steps"],
      metadata: (p.metadata ?? null) as Pipeline["metadata"],
    };
  }

  /** Matches a path against the routes: case-insensitive, trailing slashes ignored. */
  function route(method: string, path: string) {
    const parts = path.split("/").filter((p) => p !== "");
    let pathKnown = false;
    for (const r of routes) {
      if (routing === "v0.6" && r.notInV06) continue;
      const tpl = r.template.split("/").filter((p) => p !== "");
      if (tpl.length !== parts.length) continue;
      const params: Record<string, string> = {};
      let ok = true;
      for (let i = 0; i < tpl.length && ok; i++) {
        const m = /^\{(.+)\}$/.exec(tpl[i]);
        // Taken as sent, as the v0.6 server (Fiber) does: `web%20app` is not `web app`.
        if (m) params[m[1]] = parts[i];
        else ok = tpl[i].toLowerCase() === parts[i].toLowerCase();
      }
      if (!ok) continue;
      // Routes are in swagger order: `/apply` comes before `/{name}`.
      pathKnown = true;
      if (r.method === method) return { route: r, params };
    }
    return { pathKnown };
  }

  function matches(f: Fault, rec: RecordedRequest): boolean {
    if (f.match === undefined) return true;
    if (typeof f.match === "function") return f.match(rec);
    return f.match === rec.operation || f.match === `${rec.method} ${rec.path}`;
  }

  // --- the server ---------------------------------------------------------

  async function handle(req: IncomingMessage, res: ServerResponse) {
    const chunks: Uint8Array[] = [];
    for await (const c of req) chunks.push(c as Uint8Array);
    const url = new URL(req.url ?? "/", "http://localhost");
    const headers: Record<string, string> = {};
    for (const [k, val] of Object.entries(req.headers)) {
      if (val !== undefined) headers[k.toLowerCase()] = Array.isArray(val) ? val.join(", ") : val;
    }
    const method = (req.method ?? "GET").toUpperCase();
    const found = route(method, url.pathname);
    const rec: RecordedRequest = {
      method,
      path: url.pathname,
      query: Object.fromEntries(url.searchParams),
      headers,
      body: new TextDecoder().decode(concat(chunks)),
      operation: "route" in found && found.route
        ? `${found.route.method} ${found.route.template}`
        : undefined,
    };
    requests.push(rec);

    const fault = faults.find((f) => f.left > 0 && matches(f, rec));
    if (fault) {
      fault.left--;
      if (fault.delay) await sleep(fault.delay);
      if (fault.drop) {
        res.socket?.destroy();
        res.destroy();
        return;
      }
      if (fault.status !== undefined) return send(res, fault.status, fault.body, fault.headers);
    }

    const skipAuth = ["/health", "/swagger", "/metrics"].some((p) => url.pathname.startsWith(p));
    if (options.auth && !skipAuth) {
      const auth = headers.authorization;
      if (!auth) return error(res, 401, "missing Authorization header");
      const [scheme, token] = auth.split(" ", 2);
      if (scheme.toLowerCase() !== "bearer" || !token) {
        return error(res, 401, "invalid Authorization header format");
      }
      if (!options.auth(token)) return error(res, 401, "invalid token");
    }

    if (!("route" in found) || !found.route) {
      if (found.pathKnown) return send(res, 405, "Method Not Allowed");
      return send(res, 404, `Cannot ${method} ${url.pathname}`);
    }
    await found.route.handler({ req, res, rec, params: found.params });
  }

  const server: Server = createServer((req, res) => {
    handle(req, res).catch((err) => {
      if (!res.headersSent) send(res, 500, `test server: ${err}`);
      else res.destroy();
    });
  });
  server.on("connection", (socket: Socket) => {
    sockets.add(socket);
    socket.setNoDelay?.(true);
    socket.on("close", () => sockets.delete(socket));
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => resolve());
  });
  const address = server.address();
  if (address === null || typeof address === "string") throw new Error("no TCP address");

  let closed: Promise<void> | undefined;
  const api: TestApiServer = {
    url: `http://127.0.0.1:${address.port}`,
    requests,
    resources,
    definitions,
    pipelines,
    logs,
    messages,
    sse,
    get openStreams() {
      return streams.size;
    },
    fail(fault) {
      faults.push({ ...fault, left: fault.times ?? 1 });
    },
    pushLog(entry) {
      logs.push(entry);
      for (const s of streams) {
        if (s.runId === entry.runid && (s.driver === undefined || s.driver === entry.driver)) {
          writeEvent(s, JSON.stringify(entry));
        }
      }
    },
    sseWrite(raw) {
      for (const s of streams) write(s, raw);
    },
    dropStreams() {
      for (const s of [...streams]) kill(s);
    },
    async waitForStreams(n, timeout = 10_000) {
      const end = Date.now() + timeout;
      while (streams.size < n) {
        if (Date.now() > end) {
          throw new Error(`${streams.size} log streams open after ${timeout} ms, wanted ${n}`);
        }
        await sleep(5);
      }
    },
    close() {
      closed ??= new Promise<void>((resolve) => {
        for (const s of [...streams]) kill(s);
        server.close(() => resolve());
        for (const socket of sockets) socket.destroy();
        (server as { closeAllConnections?: () => void }).closeAllConnections?.();
      });
      return closed;
    },
    [Symbol.asyncDispose]() {
      return api.close();
    },
  };
  return api;
}

function concat(chunks: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}
