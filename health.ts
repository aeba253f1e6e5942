/**
 * Health checks of a running driver: a Web-standard `(Request) => Response`
 * handler with `/healthz` (alive) and `/readyz` (connected and consuming),
 * to mount in any server, and a small HTTP server for it on Deno, Bun and
 * Node (`health: { port }`, env `CONVEYOR_HEALTH_PORT`).
 *
 * @module
 */
import { createServer, type Server } from "node:http";

/** What a running driver reports about itself. */
export interface DriverHealth {
  /** The runtime runs (false once it has stopped). */
  alive: boolean;
  /** Connected and consuming, and not shutting down: it takes events. */
  ready: boolean;
  /** The NATS connection is up (false while it reconnects). */
  connected: boolean;
  /** The last pull from the consumer succeeded (false while it fails, e.g. the consumer is missing). */
  consuming: boolean;
  /** A shutdown has begun. */
  stopping: boolean;
}

/**
 * A handler for health probes: `GET /healthz` answers 200 while the runtime
 * runs, `GET /readyz` 200 while it is ready (else 503); both with the
 * {@link DriverHealth} as JSON. Any other path is 404, any other method 405.
 * Paths are matched on their end, so the handler can be mounted under a prefix.
 *
 * @example
 * ```ts
 * import { healthHandler, startDriver } from "@conveyor/driver";
 *
 * const running = await startDriver({
 *   name: "echo",
 *   resources: ["pipeline"],
 *   reconcile: () => ({ success: true, message: "ok" }),
 * });
 * const health = healthHandler(running);
 * // Deno: Deno.serve({ port: 8080 }, health);  Bun: Bun.serve({ port: 8080, fetch: health });
 * console.log((await health(new Request("http://localhost/readyz"))).status); // 200
 * await running.stop();
 * ```
 */
export function healthHandler(
  source: { health(): DriverHealth },
): (request: Request) => Response {
  return (request) => {
    const path = new URL(request.url).pathname.replace(/\/+$/, "");
    const which = path.endsWith("/healthz") ? "alive" : path.endsWith("/readyz") ? "ready" : "";
    if (!which) return new Response("not found\n", { status: 404 });
    if (request.method !== "GET" && request.method !== "HEAD") {
      return new Response("method not allowed\n", { status: 405, headers: { allow: "GET, HEAD" } });
    }
    const status = source.health();
    const ok = status[which];
    return new Response(request.method === "HEAD" ? null : JSON.stringify(status) + "\n", {
      status: ok ? 200 : 503,
      headers: { "content-type": "application/json", "cache-control": "no-store" },
    });
  };
}

/** A running health server. */
export interface HealthServer {
  /** Its base URL, e.g. `http://127.0.0.1:8080`. */
  url: string;
  /** Stops listening and closes open connections. */
  close(): Promise<void>;
}

/**
 * Serves `handler` over HTTP on `port` (0: any free one) and `hostname`
 * with `node:http`, which Deno, Bun and Node all provide.
 */
export function serveHealth(
  handler: (request: Request) => Response,
  port: number,
  hostname = "0.0.0.0",
): Promise<HealthServer> {
  const server: Server = createServer((req, res) => {
    const response = handler(
      new Request(`http://${req.headers.host ?? "localhost"}${req.url ?? "/"}`, {
        method: req.method,
      }),
    );
    res.writeHead(response.status, Object.fromEntries(response.headers));
    void response.text().then((body) => res.end(body));
  });
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, hostname, () => {
      server.off("error", reject);
      const address = server.address();
      const actual = typeof address === "object" && address ? address.port : port;
      const host = hostname === "0.0.0.0" || hostname === "::" ? "127.0.0.1" : hostname;
      resolve({
        url: `http://${host.includes(":") ? `[${host}]` : host}:${actual}`,
        close: () =>
          new Promise<void>((done) => {
            server.close(() => done());
            (server as { closeAllConnections?: () => void }).closeAllConnections?.();
          }),
      });
    });
  });
}
