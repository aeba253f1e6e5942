import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import process from "node:process";
import * as v from "valibot";
import { Client, type ClientOptions, OPERATIONS, type TokenSource } from "./client.ts";
import {
  ApiNetworkError,
  ApiTimeoutError,
  AuthError,
  ConfigError,
  ConveyorApiError,
} from "./errors.ts";
import { makeTestPki } from "./test_pki.ts";
import { X509Certificate } from "node:crypto";
import { decodeProtectedHeader } from "jose";
import { configure, type LogRecord, reset } from "@logtape/logtape";
import { startTestApiServer, type TestApiServer } from "./test_api_server.ts";
import type { LogEntry, Pipeline } from "./types.ts";
import { createServer } from "node:net";

/** A port nothing listens on (bound, then released). */
async function closedPort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, "127.0.0.1", r));
  const { port } = s.address() as { port: number };
  await new Promise((r) => s.close(r));
  return port;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/**
 * The server's own swagger.json, read where it lives (never copied here): from
 * the repository root (Deno, Bun) or from npm/ (the Node build). A clone from a
 * forge has no ../shared next to it, so the coverage tests skip there.
 */
const swaggerCandidates = [
  new URL("../shared/conveyor/swagger.json", import.meta.url),
  new URL("../../shared/conveyor/swagger.json", import.meta.url),
];
const swaggerFile = swaggerCandidates.find((u) => existsSync(u));
const swaggerPaths = swaggerCandidates.map((u) => u.pathname).join(" and ");
/** Why the coverage tests skip, or false when they run. */
const noSwagger = !swaggerFile &&
  `../shared/conveyor/swagger.json not found (looked for ${swaggerPaths})`;
// Deno and Bun do not print a skip reason (Node does): say it once here.
if (noSwagger) {
  console.warn(`client_test: skipping the OPERATIONS-versus-swagger.json test: ${noSwagger}`);
}

function swaggerOperations(): string[] {
  assert.ok(swaggerFile, "swagger.json not found");
  const swagger = JSON.parse(readFileSync(swaggerFile, "utf8")) as {
    paths: Record<string, Record<string, unknown>>;
  };
  const ops: string[] = [];
  for (const [path, methods] of Object.entries(swagger.paths)) {
    for (const method of Object.keys(methods)) ops.push(`${method.toUpperCase()} ${path}`);
  }
  assert.ok(ops.length >= 20, `swagger.json lists ${ops.length} operations`);
  return ops.sort();
}

/** A TokenSource that hands out a new token each time, as a JWT signer does. */
function counterAuth(): TokenSource & { calls: number } {
  const auth = {
    calls: 0,
    token() {
      auth.calls++;
      return Promise.resolve(`tok-${auth.calls}`);
    },
  };
  return auth;
}

function client(api: TestApiServer, options: ClientOptions = {}): Client {
  return new Client({
    baseUrl: api.url,
    retry: { initialDelay: 10, maxDelay: 2_000 },
    ...options,
  });
}

async function rejection(p: Promise<unknown>): Promise<unknown> {
  return await p.then(() => assert.fail("expected a rejection"), (err) => err);
}

function apiError(err: unknown): ConveyorApiError {
  assert.ok(err instanceof ConveyorApiError, `expected a ConveyorApiError, got ${err}`);
  return err;
}

const schema = {
  type: "object",
  properties: { image: { type: "string" } },
  required: ["image"],
};

/** A definition and a pipeline for resources of type "app". */
async function seed(c: Client): Promise<void> {
  await c.createResourceDefinition({ name: "app", schema });
  await c.createPipeline({
    name: "ci",
    resource: "app",
    steps: [{ id: "1", name: "build", driver: "builder" }],
  });
}

describe("Client: swagger.json coverage", () => {
  it("OPERATIONS names an existing Client method for every swagger operation, and nothing else", {
    skip: noSwagger,
  }, () => {
    const ops = swaggerOperations();
    const missing = ops.filter((op) => !(op in OPERATIONS));
    assert.deepEqual(missing, [], `operations without an entry in OPERATIONS: ${missing}`);
    for (const op of ops) {
      const name = OPERATIONS[op];
      assert.equal(
        typeof (Client.prototype as unknown as Record<string, unknown>)[name],
        "function",
        `OPERATIONS["${op}"] = "${name}" is not a Client method`,
      );
    }
    const extra = Object.keys(OPERATIONS).filter((op) => !ops.includes(op));
    assert.deepEqual(extra, [], `OPERATIONS entries not in swagger.json: ${extra}`);
  });

  it("calls every operation (every swagger operation, when swagger.json is there), with a token on all but /health", async () => {
    const auth = counterAuth();
    await using api = await startTestApiServer({ auth: (t) => t.startsWith("tok-") });
    const c = client(api, { auth, headers: { "User-Agent": "conveyor-test" } });

    const health = await c.health();
    assert.equal(health.status, "healthy");
    assert.equal(typeof health.time, "number");

    const def = await c.createResourceDefinition({ name: "app", description: "apps", schema });
    assert.match(def.id, /^[0-9a-f-]{36}$/);
    assert.deepEqual({ ...def, id: "" }, {
      id: "",
      name: "app",
      description: "apps",
      version: "",
      schema,
    });
    const applied = await c.applyResourceDefinition({ name: "app", version: "2", schema });
    assert.equal(applied.version, "2");
    assert.equal((await c.getResourceDefinition("app")).version, "2");
    const updatedDef = await c.updateResourceDefinition("app", {
      name: "app",
      version: "3",
      schema,
    });
    assert.equal(updatedDef.version, "3");

    const pipeline: Pipeline = {
      name: "ci",
      resource: "app",
      steps: [{ id: "1", name: "build", driver: "builder" }],
    };
    const created = await c.createPipeline(pipeline);
    assert.deepEqual(created.steps, pipeline.steps);
    assert.equal(created.description, ""); // the Go server echoes every field
    assert.equal(created.metadata, undefined); // null metadata is dropped
    assert.equal((await c.getPipeline("ci")).resource, "app");
    const updatedPipeline = await c.updatePipeline("ci", { ...pipeline, description: "CI" });
    assert.equal(updatedPipeline.description, "CI");

    const res = await c.createResource({
      name: "web",
      resource: "app",
      pipeline: "ci",
      spec: { image: "node:20" },
    });
    assert.equal(res.name, "web");
    assert.equal(res.version, "1");
    assert.match(res.runid, /^[0-9a-f-]{36}$/);
    const list = await c.listResources("app");
    assert.deepEqual(list.map((r) => r.name), ["web"]);
    const web = await c.getResource("app", "web");
    assert.deepEqual(web.spec, { image: "node:20" });
    assert.equal(web.metadata.version, "1");
    const v2 = await c.updateResource("app", "web", { ...web, spec: { image: "node:22" } });
    assert.equal(v2.metadata.version, "2");
    assert.deepEqual((await c.getResourceVersion("app", "web", 1)).spec, { image: "node:20" });
    assert.deepEqual((await c.getResourceVersion("app", "web", "2")).spec, { image: "node:22" });

    const runId = res.runid;
    const entry: LogEntry = {
      runid: runId,
      driver: "builder",
      timestamp: new Date().toISOString(),
      message: "hello",
    };
    assert.equal(await c.createLog(entry), undefined);
    assert.deepEqual(await c.listLogs({ runId }), [entry]);
    for await (const l of c.streamLogs({ runId, driver: "builder" })) {
      assert.deepEqual(l, entry);
      break;
    }
    for await (const l of c.streamPipelineLogs({ runId })) {
      assert.deepEqual(l, entry);
      break;
    }

    const sent = await c.broadcastMessage({ event: "create", runId, payload: web });
    assert.deepEqual(sent, { message: "message published" });
    assert.deepEqual(JSON.parse(api.messages[0].payload as string), web);
    // The client's runId goes on the wire as the server's run_id, and only that.
    assert.equal(api.messages[0].run_id, runId);
    assert.equal("runId" in api.messages[0], false);

    await c.deleteResource("app", "web");
    await c.deletePipeline("ci");
    await c.deleteResourceDefinition("app");
    assert.equal(api.resources.size + api.pipelines.size + api.definitions.size, 0);

    // Every operation reached the server at least once: those of the
    // server's swagger.json where it is at hand, else those of OPERATIONS
    // (which the test above holds equal to swagger.json's).
    const called = new Set(api.requests.map((r) => r.operation));
    const expected = swaggerFile ? swaggerOperations() : Object.keys(OPERATIONS);
    const uncalled = expected.filter((op) => !called.has(op));
    assert.deepEqual(uncalled, [], `operations never called: ${uncalled}`);

    for (const r of api.requests) {
      if (r.path === "/health") {
        assert.equal(r.headers.authorization, undefined, "no token for /health");
      } else {
        assert.match(r.headers.authorization ?? "", /^Bearer tok-\d+$/, `${r.method} ${r.path}`);
      }
      assert.equal(r.headers["user-agent"], "conveyor-test");
      if (r.body !== "") assert.equal(r.headers["content-type"], "application/json");
      else assert.equal(r.headers["content-type"], undefined);
    }
    // A fresh token per request.
    assert.equal(auth.calls, api.requests.length - 1);
    // Trailing slashes as the Go client posts.
    const posts = api.requests.filter((r) => r.method === "POST").map((r) => r.path);
    assert.ok(posts.includes("/resources/"));
    assert.ok(posts.includes("/resource-definitions/"));
  });
});

describe("Client: requests", () => {
  it("URL-encodes path parameters", async () => {
    await using api = await startTestApiServer();
    const c = client(api);
    for (const name of ["a b", "a/b", "a?b#c", "...", "ünï", "100%"]) {
      await rejection(c.getResource("my type", name));
      const req = api.requests.at(-1)!;
      assert.equal(req.operation, "GET /resources/{type}/{name}", `name ${name}: ${req.path}`);
      assert.equal(decodeURIComponent(req.path.split("/")[3]), name);
      assert.equal(req.path.split("/")[2], "my%20type");
    }
    for (const name of ["", ".", ".."]) {
      await assert.rejects(c.getResource("app", name), TypeError);
    }
    assert.throws(() => c.streamLogs({ runId: "", driver: "x" }), TypeError);
  });

  it("refuses to create a resource whose name or type the server could never serve back", async () => {
    await using api = await startTestApiServer();
    const c = client(api);
    await seed(c);
    const before = api.requests.length;
    for (const name of ["web app", "a/b", "100%", "ünï", "a?b"]) {
      await assert.rejects(
        c.createResource({ name, resource: "app", spec: { image: "a" } }),
        (e: unknown) => e instanceof TypeError && /needs percent-encoding/.test(e.message),
        name,
      );
    }
    await assert.rejects(
      c.createResource({ name: "web", resource: "my app", spec: {} }),
      TypeError,
    );
    for (const name of ["my type", "a/b", "ünï"]) {
      for (
        const call of [
          () => c.createResourceDefinition({ name, schema: {} }),
          () => c.applyResourceDefinition({ name, schema: {} }),
          () => c.createPipeline({ name, resource: "app", steps: [] }),
        ]
      ) {
        await assert.rejects(call(), /needs percent-encoding/, name);
      }
    }
    assert.equal(api.requests.length, before, "nothing sent");
    await c.createResource({ name: "web-app_1.x", resource: "app", spec: { image: "a" } });
    assert.equal((await c.getResource("app", "web-app_1.x")).name, "web-app_1.x");

    // Why: sent past the client, such a resource is stored, but the server
    // looks up the encoded path parameter as it is, and never finds it.
    const raw = await fetch(`${api.url}/resources/`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ name: "web app", resource: "app", spec: { image: "a" } }),
    });
    assert.equal(raw.status, 201);
    await raw.body?.cancel();
    const lost = apiError(await rejection(c.getResource("app", "web app")));
    assert.equal(lost.notFound, true);
    assert.equal(api.requests.at(-1)!.path, "/resources/app/web%20app");
  });

  it("sends list filters as runid, driver and pipeline; drops the server's empty pipeline", async () => {
    await using api = await startTestApiServer();
    const c = client(api);
    const runId = crypto.randomUUID();
    api.logs.push(
      { runid: runId, driver: "a", timestamp: "1", message: "x", pipeline: "ci" },
      { runid: runId, driver: "b", timestamp: "2", message: "y" },
      { runid: "other", driver: "a", timestamp: "3", message: "z" },
    );
    assert.deepEqual((await c.listLogs({ runId, driver: "b" })).map((l) => l.message), ["y"]);
    assert.deepEqual(api.requests.at(-1)!.query, { runid: runId, driver: "b" });
    // In the server's store order: pipeline ("" first), driver, timestamp.
    const all = await c.listLogs({ runId });
    assert.deepEqual(all[0], { runid: runId, driver: "b", timestamp: "2", message: "y" });
    assert.equal(all[1].pipeline, "ci");
    assert.equal((await c.listLogs({ pipeline: "ci" })).length, 1);
    assert.deepEqual(api.requests.at(-1)!.query, { pipeline: "ci" });
    api.fail({ match: "GET /logs", status: 200, body: null });
    assert.deepEqual(await c.listLogs(), []); // a Go nil slice
  });

  it("sends a broadcast payload given as a string unchanged", async () => {
    await using api = await startTestApiServer();
    const c = client(api);
    await c.broadcastMessage({ event: "ping", payload: '{"already":"json"}' });
    assert.equal(api.messages[0].payload, '{"already":"json"}');
    assert.equal(api.messages[0].event, "ping");
  });

  it("signs its requests with the identity CONVEYOR_CERT_FILE, _KEY_FILE and _CA_FILE name, as serve() does", async () => {
    await using pki = await makeTestPki();
    const leaf = pki.leaves.p256;
    const vars = {
      CONVEYOR_CERT_FILE: leaf.cert.path,
      CONVEYOR_KEY_FILE: leaf.keys.pkcs8.path,
      CONVEYOR_CA_FILE: pki.ca.cert.path,
    };
    const saved = Object.fromEntries(Object.keys(vars).map((k) => [k, process.env[k]]));
    // The stand-in server accepts a JWT whose x5c leaf is that certificate.
    const leafDer = new X509Certificate(leaf.cert.pem).raw.toString("base64");
    await using api = await startTestApiServer({
      auth: (t) => {
        try {
          return decodeProtectedHeader(t).x5c?.[0] === leafDer;
        } catch {
          return false;
        }
      },
    });
    try {
      Object.assign(process.env, vars);
      const fromEnv = new Client({ baseUrl: api.url });
      await fromEnv.createResourceDefinition({ name: "app", schema });
      assert.match(api.requests.at(-1)!.headers.authorization ?? "", /^Bearer ey/);
      const none = new Client({ baseUrl: api.url, auth: false, retry: { attempts: 1 } });
      assert.equal(apiError(await rejection(none.getResourceDefinition("app"))).status, 401);
      process.env.CONVEYOR_KEY_FILE = pki.other.leaf.keys.pkcs8.path; // not the leaf's key
      const wrong = new Client({ baseUrl: api.url });
      const err = await rejection(wrong.getResourceDefinition("app"));
      assert.ok(err instanceof AuthError, `${err}`);
    } finally {
      for (const [k, v] of Object.entries(saved)) {
        if (v === undefined) delete process.env[k];
        else process.env[k] = v;
      }
    }
  });

  it("warns once, through LogTape, when it would send a token over plain http to another host", async () => {
    const records: LogRecord[] = [];
    await configure({
      sinks: { test: (r) => void records.push(r) },
      loggers: [
        { category: ["conveyor", "client"], lowestLevel: "debug", sinks: ["test"] },
        { category: ["logtape", "meta"], lowestLevel: "warning", sinks: [] },
      ],
    });
    try {
      await using api = await startTestApiServer();
      const token = { token: () => Promise.resolve("t") };
      // Loopback (the test server) is fine over http.
      const local = client(api, { auth: token });
      await seed(local);
      assert.equal(records.length, 0);
      // Another host: the request fails (the name does not resolve), the warning comes once.
      const remote = new Client({
        baseUrl: "http://conveyor.invalid",
        auth: token,
        retry: { attempts: 1 },
      });
      await rejection(remote.getResourceDefinition("app"));
      await rejection(remote.getResourceDefinition("app"));
      assert.equal(records.length, 1);
      assert.equal(records[0].level, "warning");
      assert.equal(records[0].properties.url, "http://conveyor.invalid");
      // Without a token, nothing to warn about.
      await rejection(new Client({ baseUrl: "http://conveyor.invalid", auth: false }).health());
      assert.equal(records.length, 1);
    } finally {
      await reset();
    }
  });

  it("refuses durations timers cannot wait and counts that make no sense, naming the option", () => {
    const field = (o: ClientOptions) => {
      try {
        new Client({ baseUrl: "http://x", ...o });
      } catch (e) {
        assert.ok(e instanceof ConfigError, String(e));
        return e.field;
      }
      return "accepted";
    };
    assert.equal(field({ timeout: 2 ** 31 }), "timeout");
    assert.equal(field({ timeout: -1 }), "timeout");
    assert.equal(field({ timeout: Number.NaN }), "timeout");
    assert.equal(field({ timeout: Infinity }), "accepted", "Infinity: no limit");
    assert.equal(field({ streamConnectTimeout: 2 ** 40 }), "streamConnectTimeout");
    assert.equal(field({ streamIdleTimeout: 0 }), "accepted", "0: no idle timeout");
    assert.equal(field({ streamIdleTimeout: 2 ** 31 }), "streamIdleTimeout");
    assert.equal(field({ retry: { maxDelay: Infinity } }), "retry.maxDelay");
    assert.equal(field({ retry: { initialDelay: -5 } }), "retry.initialDelay");
    assert.equal(field({ retry: { attempts: 0 } }), "retry.attempts");
    assert.equal(field({ retry: { attempts: 2.5 } }), "retry.attempts");
    assert.equal(field({ streamMaxRetries: Infinity }), "accepted");
    assert.equal(field({ streamMaxRetries: -1 }), "streamMaxRetries");
    for (const streamDedupeWindow of [0, 1.5, 1_000_001, Infinity, NaN]) {
      assert.equal(field({ streamDedupeWindow }), "streamDedupeWindow", `${streamDedupeWindow}`);
    }
    assert.equal(field({ streamDedupeWindow: 1_000_000 }), "accepted");
  });

  it("with timeout: Infinity, waits for a slow answer rather than timing out at once", async () => {
    await using api = await startTestApiServer();
    const c = client(api, { timeout: Infinity, retry: { attempts: 1 } });
    api.fail({ delay: 300 });
    assert.equal((await c.health()).status, "healthy");
  });

  it("takes the base URL from CONVEYOR_API_URL, else localhost:8080, and keeps a path prefix", async () => {
    const before = process.env.CONVEYOR_API_URL;
    try {
      delete process.env.CONVEYOR_API_URL;
      assert.equal(new Client().baseUrl, "http://localhost:8080");
      process.env.CONVEYOR_API_URL = "http://conveyor.internal:9000/";
      assert.equal(new Client().baseUrl, "http://conveyor.internal:9000");
      assert.equal(new Client({ baseUrl: "http://x:1" }).baseUrl, "http://x:1");
    } finally {
      if (before === undefined) delete process.env.CONVEYOR_API_URL;
      else process.env.CONVEYOR_API_URL = before;
    }
    for (const bad of ["not a url", "ftp://x", "http://x/api?v=1", "http://x/#top", "http://x/?"]) {
      assert.throws(
        () => new Client({ baseUrl: bad }),
        (e: unknown) => e instanceof ConfigError && e.field === "baseUrl",
        bad,
      );
    }

    await using api = await startTestApiServer();
    const seen: string[] = [];
    const c = new Client({
      baseUrl: `${api.url}/prefix/`,
      fetch: (input, init) => {
        seen.push(String(input));
        return fetch(String(input).replace("/prefix", ""), init);
      },
    });
    await c.health();
    assert.deepEqual(seen, [`${api.url}/prefix/health`]);
  });

  it("the test server wants a JSON Content-Type, as the real one", async () => {
    await using api = await startTestApiServer();
    const res = await fetch(`${api.url}/resource-definitions/`, {
      method: "POST",
      body: JSON.stringify({ name: "app", schema }),
      headers: { "Content-Type": "text/plain" },
    });
    assert.equal(res.status, 400);
    assert.deepEqual(await res.json(), { error: "Invalid request payload" });
    // The client sets it, so the same request passes.
    await client(api).createResourceDefinition({ name: "app", schema });
  });
});

describe("Client: errors", () => {
  it("400 and 404 with JSON bodies: ConveyorApiError with the server's error text", async () => {
    await using api = await startTestApiServer();
    const c = client(api);
    const e400 = apiError(await rejection(c.createResource({ name: "web", resource: "" })));
    assert.equal(e400.status, 400);
    assert.equal(e400.error, "Resource type is required");
    assert.equal(e400.method, "POST");
    assert.equal(e400.path, "/resources/");
    assert.equal(e400.message, "POST /resources/ failed with 400: Resource type is required");

    // A handler's own 404 (e.g. GET /pipelines/{name} where it is routed).
    const e404 = apiError(await rejection(c.getPipeline("nope")));
    assert.equal(e404.status, 404);
    assert.equal(e404.error, "Pipeline not found");
    assert.equal(e404.notFound, true);
    assert.equal(api.requests.length, 2);
  });

  it("a missing resource is a 500 (as on the v0.6 server), not retried", async () => {
    await using api = await startTestApiServer();
    const c = client(api);
    const err = apiError(await rejection(c.getResource("app", "ghost")));
    assert.equal(err.status, 500);
    assert.equal(
      err.error,
      "Failed to find resource: resource with name ghost and type app not found",
    );
    assert.equal(err.path, "/resources/app/ghost");
    assert.equal(api.requests.length, 1);
    assert.equal(err.notFound, true, "told apart without matching text");
    // The same for a missing definition and a missing version, all 500 as on the v0.6 server.
    const missing = [
      await rejection(c.getResourceDefinition("ghost")),
      await rejection(c.createResource({ name: "web", resource: "ghost", spec: {} })),
      await rejection(c.createPipeline({ name: "ci", resource: "ghost", steps: [] })),
    ].map(apiError);
    for (const e of missing) {
      assert.equal(e.status, 500);
      assert.equal(
        e.error,
        "Failed to find resource definition: resource definition with name ghost not found",
      );
      assert.equal(e.notFound, true, `${e.method} ${e.path}`);
    }
    await seed(c);
    await c.createResource({ name: "web", resource: "app", spec: { image: "a" } });
    const noVersion = apiError(await rejection(c.getResourceVersion("app", "web", 9)));
    assert.equal(noVersion.status, 500);
    assert.equal(
      noVersion.error,
      "Failed to find resource: resource with name web, type app and version 9 not found",
    );
    assert.equal(noVersion.notFound, true);
    api.fail({ status: 500, body: { error: "Error getting logs" } });
    assert.equal(apiError(await rejection(c.listLogs())).notFound, false);
  });

  it("plain-text error bodies: 404 of an unrouted path on the v0.6 server, 500, 400", async () => {
    await using api = await startTestApiServer({ routing: "v0.6" });
    const c = client(api);
    for (const call of [() => c.listResources("app"), () => c.getPipeline("ci")]) {
      const err = apiError(await rejection(call()));
      assert.equal(err.status, 404);
      assert.match(err.error, /^Cannot GET \/(resources\/app|pipelines\/ci)$/);
      assert.equal(err.notFound, false, "an unrouted path is not a missing thing");
    }
    api.fail({ status: 500, body: "Error getting logs\n" });
    const e500 = apiError(await rejection(c.listLogs()));
    assert.equal(e500.status, 500);
    assert.equal(e500.error, "Error getting logs");
    api.fail({ status: 400, body: "" });
    assert.equal(apiError(await rejection(c.createLog({} as LogEntry))).error, "Bad Request");
  });

  it("401 from the server when the token is refused", async () => {
    await using api = await startTestApiServer({ auth: (t) => t === "good" });
    const bad = client(api, { auth: { token: () => Promise.resolve("bad") } });
    const err = apiError(await rejection(bad.getResourceDefinition("app")));
    assert.equal(err.status, 401);
    assert.equal(err.error, "invalid token");
    const none = apiError(await rejection(client(api).getResourceDefinition("app")));
    assert.equal(none.error, "missing Authorization header");
    assert.equal(api.requests.length, 2, "401 is not retried");
    // /health needs no token.
    assert.equal((await client(api).health()).status, "healthy");
  });

  it("a token source that fails rejects the call, without a request", async () => {
    await using api = await startTestApiServer();
    const boom = new Error("cannot sign");
    const c = client(api, { auth: { token: () => Promise.reject(boom) } });
    assert.equal(await rejection(c.getResource("app", "web")), boom);
    assert.equal(api.requests.length, 0);
  });

  it("a 2xx body of the wrong shape: ConveyorApiError naming the problem", async () => {
    await using api = await startTestApiServer();
    const c = client(api);
    api.fail({ match: "GET /resources/{type}/{name}", status: 200, body: { name: 5 } });
    const err = apiError(await rejection(c.getResource("app", "web")));
    assert.equal(err.status, 200);
    assert.match(err.error, /^unexpected response body: /);
    assert.match(err.error, /name/);
    assert.ok(err.cause instanceof v.ValiError);

    api.fail({ status: 200, body: "<html>proxy login</html>" });
    assert.match(apiError(await rejection(c.listLogs())).error, /unexpected response body/);

    api.fail({ status: 201, body: "{not json", headers: { "content-type": "application/json" } });
    const bad = apiError(
      await rejection(c.createPipeline({ name: "x", resource: "y", steps: [] })),
    );
    assert.equal(bad.status, 201);
    assert.match(bad.error, /not valid JSON/);
  });

  it("a dropped connection: ApiNetworkError with the cause", async () => {
    await using api = await startTestApiServer();
    const c = client(api, { retry: { attempts: 1 } });
    api.fail({ drop: true });
    const err = await rejection(c.health());
    assert.ok(err instanceof ApiNetworkError, String(err));
    assert.equal(err.method, "GET");
    assert.equal(err.path, "/health");
    assert.ok(err.cause !== undefined);
  });

  it("no answer within timeout: ApiTimeoutError", async () => {
    await using api = await startTestApiServer();
    const c = client(api, { timeout: 100, retry: { attempts: 1 } });
    api.fail({ delay: 1_000 });
    const started = Date.now();
    const err = await rejection(c.getResource("app", "web"));
    assert.ok(err instanceof ApiTimeoutError, String(err));
    assert.equal(err.timeout, 100);
    assert.equal(err.path, "/resources/app/web");
    assert.ok(Date.now() - started < 900);
  });
});

describe("Client: aborts", () => {
  it("rejects with the signal's reason, during the request and before it, without retrying", async () => {
    await using api = await startTestApiServer();
    const c = client(api);
    api.fail({ delay: 2_000, times: 5 });
    const ac = new AbortController();
    const p = c.getResource("app", "web", { signal: ac.signal });
    await sleep(100);
    ac.abort();
    assert.equal((await rejection(p) as Error).name, "AbortError");
    assert.equal(api.requests.length, 1);

    const reason = new Error("user cancelled");
    assert.equal(await rejection(c.health({ signal: AbortSignal.abort(reason) })), reason);
    assert.equal(api.requests.length, 1, "no request with an aborted signal");
  });

  it("aborts during the delay between retries", async () => {
    await using api = await startTestApiServer();
    const c = client(api, { retry: { initialDelay: 60_000, maxDelay: 60_000 } });
    api.fail({ status: 503, body: { error: "busy" } });
    const ac = new AbortController();
    const p = c.getResource("app", "web", { signal: ac.signal });
    while (api.requests.length === 0) await sleep(5);
    await sleep(50);
    ac.abort();
    assert.equal((await rejection(p) as Error).name, "AbortError");
    assert.equal(api.requests.length, 1);
  });
});

describe("Client: retries", () => {
  it("retries GET on 429, 502, 503, 504, network errors and timeouts", async () => {
    await using api = await startTestApiServer();
    const c = client(api, { timeout: 200 });
    await seed(c);
    await c.createResource({ name: "web", resource: "app", spec: { image: "a" } });
    const first = api.requests.length;
    api.fail({ match: "GET /resources/{type}/{name}", status: 502, body: "Bad Gateway" });
    api.fail({ match: "GET /resources/{type}/{name}", status: 504, body: { error: "timeout" } });
    assert.equal((await c.getResource("app", "web")).name, "web");
    api.fail({ match: "GET /resources/{type}/{name}", drop: true });
    api.fail({ match: "GET /resources/{type}/{name}", delay: 1_000 });
    assert.equal((await c.getResource("app", "web")).name, "web");
    api.fail({ match: "GET /resources/{type}", status: 429, body: "slow down" });
    assert.equal((await c.listResources("app")).length, 1);
    assert.deepEqual(api.requests.slice(first).map((r) => r.operation), [
      ...Array(6).fill("GET /resources/{type}/{name}"),
      "GET /resources/{type}",
      "GET /resources/{type}",
    ]);
  });

  it("does not repeat a PUT or DELETE that may have reached the server: one update, one version", async () => {
    await using api = await startTestApiServer();
    const c = client(api, { timeout: 200 });
    await seed(c);
    await c.createResource({ name: "web", resource: "app", spec: { image: "a" } });
    const web = await c.getResource("app", "web");
    const first = api.requests.length;
    // The server takes the PUT but answers after the client's timeout: as
    // on the real server, it stored a version and published an `update`.
    api.fail({ match: "PUT /resources/{type}/{name}", delay: 600 });
    const late = await rejection(c.updateResource("app", "web", { ...web, spec: { image: "b" } }));
    assert.ok(late instanceof ApiTimeoutError);
    await waitFor(() => api.resources.get("app/web")?.length === 2);
    api.fail({ match: "PUT /resources/{type}/{name}", status: 503, body: { error: "busy" } });
    assert.equal(apiError(await rejection(c.updateResource("app", "web", web))).status, 503);
    api.fail({ match: "PUT /resources/{type}/{name}", drop: true });
    assert.ok(await rejection(c.updateResource("app", "web", web)) instanceof ApiNetworkError);
    api.fail({ match: "DELETE /resources/{type}/{name}", status: 502, body: "Bad Gateway" });
    assert.equal(apiError(await rejection(c.deleteResource("app", "web"))).status, 502);
    await sleep(700);
    assert.equal(
      api.resources.get("app/web")?.length,
      2,
      "versions 1 and 2 only: no second update",
    );
    assert.deepEqual(api.requests.slice(first).map((r) => r.operation), [
      ...Array(3).fill("PUT /resources/{type}/{name}"),
      "DELETE /resources/{type}/{name}",
    ]);
  });

  it("retries a PUT like a GET when the call says it may repeat (idempotent: true)", async () => {
    await using api = await startTestApiServer();
    const c = client(api);
    await seed(c);
    await c.createResource({ name: "web", resource: "app", spec: { image: "a" } });
    const web = await c.getResource("app", "web");
    const first = api.requests.length;
    api.fail({ match: "PUT /resources/{type}/{name}", status: 503, body: { error: "busy" } });
    await c.updateResource("app", "web", { ...web, spec: { image: "b" } }, { idempotent: true });
    assert.equal(api.requests.length - first, 2);
  });

  it("retries any method that provably never reached the server (connection refused)", async () => {
    await using api = await startTestApiServer();
    const closed = await closedPort();
    let calls = 0;
    // The first attempt really connects to a closed port; the next ones reach the server.
    const c = new Client({
      baseUrl: api.url,
      retry: { initialDelay: 10 },
      fetch: (input, init) => {
        const url = new URL(String(input instanceof Request ? input.url : input));
        if (calls++ === 0) url.port = String(closed);
        return fetch(url, init);
      },
    });
    await seed(c); // two POSTs
    assert.equal(calls, 3, "the first refused, then both sent");
    assert.equal(api.requests.length, 2, "each reached the server once");
    const err = await rejection(
      new Client({ baseUrl: `http://127.0.0.1:${closed}`, retry: { attempts: 1 } }).createLog({
        runid: "r",
        driver: "d",
        timestamp: "t",
        message: "m",
      }),
    );
    assert.ok(err instanceof ApiNetworkError && err.notSent, `${err}`);
  });

  it("keeps an error's text short, whatever the server sends", async () => {
    await using api = await startTestApiServer();
    const c = client(api, { retry: { attempts: 1 } });
    api.fail({ status: 500, body: { error: `boom ${"x".repeat(50_000)}` } });
    const json = apiError(await rejection(c.health()));
    assert.ok(json.error.startsWith("boom xxx"));
    assert.ok(json.error.length < 2_100, `${json.error.length} characters`);
    api.fail({ status: 502, body: "y".repeat(5_000_000) });
    const text = apiError(await rejection(c.health()));
    assert.ok(text.error.length < 2_100, `${text.error.length} characters`);
    assert.ok(text.message.length < 2_200);
  });

  it("stops after `attempts` and throws the last error", async () => {
    await using api = await startTestApiServer();
    const c = client(api, { retry: { attempts: 3, initialDelay: 1 } });
    api.fail({ status: 503, body: { error: "still busy" }, times: 5 });
    const err = apiError(await rejection(c.health()));
    assert.equal(err.status, 503);
    assert.equal(err.error, "still busy");
    assert.equal(api.requests.length, 3);
  });

  it("honours Retry-After in seconds and as an HTTP date", async () => {
    await using api = await startTestApiServer();
    const c = client(api);
    api.fail({ status: 503, body: { error: "busy" }, headers: { "Retry-After": "1" } });
    let started = Date.now();
    await c.health();
    assert.ok(Date.now() - started >= 950, `waited ${Date.now() - started} ms`);
    assert.equal(api.requests.length, 2);

    // HTTP dates have whole seconds: at least 1 s, at most 2 s ahead.
    const date = new Date(Math.ceil(Date.now() / 1000) * 1000 + 1000).toUTCString();
    api.fail({ status: 429, body: "slow down", headers: { "Retry-After": date } });
    started = Date.now();
    await c.health();
    assert.ok(Date.now() - started >= 500, `waited ${Date.now() - started} ms`);
    assert.equal(api.requests.length, 4);
  });

  it("gives up at once when Retry-After asks for more than maxDelay", async () => {
    await using api = await startTestApiServer();
    const c = client(api, { retry: { maxDelay: 1_000 } });
    api.fail({ status: 503, body: { error: "maintenance" }, headers: { "Retry-After": "3600" } });
    const started = Date.now();
    const err = apiError(await rejection(c.health()));
    assert.equal(err.status, 503);
    assert.equal(api.requests.length, 1);
    assert.ok(Date.now() - started < 500);
  });

  it("never retries a POST: not on 503, nor on a dropped connection, nor on a timeout", async () => {
    await using api = await startTestApiServer();
    const c = client(api, { timeout: 100 });
    await seed(c);
    const before = api.requests.length;
    const spec = { image: "x" };
    api.fail({ match: "POST /resources", status: 503, body: { error: "busy" } });
    assert.equal(
      apiError(await rejection(c.createResource({ name: "a", resource: "app", spec }))).status,
      503,
    );
    api.fail({ match: "POST /resources", drop: true });
    assert.ok(
      await rejection(c.createResource({ name: "a", resource: "app", spec })) instanceof
        ApiNetworkError,
    );
    api.fail({ match: "POST /resources", delay: 500 });
    assert.ok(
      await rejection(c.createResource({ name: "a", resource: "app", spec })) instanceof
        ApiTimeoutError,
    );
    api.fail({ match: "POST /logs", status: 429, body: "slow down" });
    await rejection(c.createLog({ runid: "r", driver: "d", timestamp: "t", message: "m" }));
    assert.equal(api.requests.length - before, 4);
  });
});

describe("Client: log streams", () => {
  it("streams a driver's lines; the request timeout does not cut the stream", async () => {
    await using api = await startTestApiServer();
    const c = client(api, { timeout: 50 });
    const runId = crypto.randomUUID();
    api.sse.heartbeatFirst = true;
    const got: string[] = [];
    const done = (async () => {
      for await (const l of c.streamLogs({ runId, driver: "builder" })) {
        got.push(l.message);
        if (got.length === 2) break;
      }
    })();
    await api.waitForStreams(1);
    await sleep(300); // six request timeouts
    api.pushLog({ runid: runId, driver: "other", timestamp: "1", message: "not mine" });
    api.pushLog({ runid: runId, driver: "builder", timestamp: "2", message: "one" });
    api.pushLog({ runid: runId, driver: "builder", timestamp: "3", message: "two" });
    await done;
    assert.deepEqual(got, ["one", "two"]);
    await waitFor(() => api.openStreams === 0); // `break` closed the connection
    assert.equal(api.requests.length, 1);
    assert.equal(api.requests[0].path, `/logs/streams/builder/${runId}`);
  });

  it("resumes a dropped pipeline stream without repeating replayed lines, with a new token", async () => {
    const auth = counterAuth();
    await using api = await startTestApiServer({ auth: (t) => t.startsWith("tok-") });
    const c = client(api, { auth });
    const runId = crypto.randomUUID();
    // Stored: the replay sends them as the Go server marshals them (other
    // field order, "pipeline": ""), unlike the live JSON below.
    api.logs.push(
      { runid: runId, driver: "a", timestamp: "1", message: "same" },
      { runid: runId, driver: "b", timestamp: "1", message: "same" },
    );
    api.sse.dropAfter.push(3);
    const got: LogEntry[] = [];
    const ac = new AbortController();
    const done = (async () => {
      for await (const l of c.streamPipelineLogs({ runId, signal: ac.signal })) {
        got.push(l);
        if (got.length === 2) {
          // The live line in field order of a driver: message first.
          api.pushLog(
            JSON.parse(`{"message":"live","timestamp":"2","driver":"a","runid":"${runId}"}`),
          );
        }
        if (got.length === 4) ac.abort();
      }
    })();
    await api.waitForStreams(1);
    await waitFor(() => api.requests.length === 2);
    await api.waitForStreams(1);
    api.pushLog({ runid: runId, driver: "a", timestamp: "1", message: "same" }); // a true repeat
    await done; // aborting ends the loop quietly
    assert.deepEqual(got.map((l) => `${l.driver}:${l.message}`), [
      "a:same",
      "b:same",
      "a:live",
      "a:same",
    ]);
    assert.ok(got.every((l) => !("pipeline" in l)));
    assert.deepEqual(api.requests.map((r) => r.headers.authorization), [
      "Bearer tok-1",
      "Bearer tok-2",
    ]);
  });

  it("drops a replay longer than its dedupe window exactly: each line once, none lost", async () => {
    await using api = await startTestApiServer();
    const window = 50;
    const c = client(api, { streamDedupeWindow: window });
    const runId = crypto.randomUUID();
    const t0 = Date.parse("2026-11-28T10:00:00.000Z");
    const at = (ms: number) => new Date(t0 + ms).toISOString();
    const lines = (driver: string, from: number, to: number) =>
      Array.from({ length: to - from }, (_, i) => ({
        runid: runId,
        driver,
        timestamp: at(from + i),
        message: `${driver}${from + i}`,
      }));
    // Two drivers with interleaved times; the server replays by driver, then
    // time, so the window (50) holds only the last of b's lines. Two lines
    // share a millisecond, to exercise the ties at the window's edge.
    api.logs.push(...lines("a", 0, 200), ...lines("b", 0, 200));
    api.logs.push({ runid: runId, driver: "a", timestamp: at(199), message: "a199-twin" });
    api.sse.dropAfter.push(401); // the 1st connection ends after its replay
    const got: string[] = [];
    for await (const l of c.streamPipelineLogs({ runId })) {
      got.push(l.message);
      if (got.length === 401) {
        // Written while the stream is down: more than the window, for both drivers.
        await waitFor(() => api.openStreams === 0);
        api.logs.push(...lines("a", 200, 300), ...lines("b", 200, 300));
        api.sse.heartbeatFirst = true;
        // Once reconnected (its replay written), one live line ends the test.
        waitFor(() => api.requests.length === 2 && api.openStreams === 1)
          .then(() => sleep(50))
          .then(() =>
            api.pushLog({ runid: runId, driver: "a", timestamp: at(1e6), message: "end" })
          );
      }
      if (l.message === "end") break;
    }
    const expected = [
      ...lines("a", 0, 300).map((l) => l.message),
      "a199-twin",
      ...lines("b", 0, 300).map((l) => l.message),
      "end",
    ];
    const counts = new Map<string, number>();
    for (const m of got) counts.set(m, (counts.get(m) ?? 0) + 1);
    assert.deepEqual([...counts].filter(([, n]) => n > 1), [], "no line twice");
    assert.deepEqual([...counts.keys()].sort(), expected.sort(), "no line lost");
    assert.equal(api.requests.length, 2);
  });

  it("a stream line that is not a log entry: ConveyorApiError", async () => {
    await using api = await startTestApiServer();
    const c = client(api);
    const runId = crypto.randomUUID();
    api.sse.heartbeatFirst = true;
    const done = rejection((async () => {
      for await (const _ of c.streamPipelineLogs({ runId })) { /* none expected */ }
    })());
    await api.waitForStreams(1);
    api.sseWrite('data: {"runid":"x","message":3}\n\n');
    const err = apiError(await done);
    assert.equal(err.status, 200);
    assert.match(err.error, /unexpected response body/);
    await waitFor(() => api.openStreams === 0);

    const notJson = rejection((async () => {
      for await (const _ of c.streamPipelineLogs({ runId })) { /* none expected */ }
    })());
    await api.waitForStreams(1);
    api.sseWrite("data: hello\n\n");
    assert.match(apiError(await notJson).error, /not JSON/);
  });

  it("a 4xx on connect rejects the iteration", async () => {
    await using api = await startTestApiServer({ auth: () => false });
    const c = client(api, { auth: counterAuth() });
    const err = apiError(
      await rejection((async () => {
        for await (const _ of c.streamLogs({ runId: "r", driver: "d" })) { /* none */ }
      })()),
    );
    assert.equal(err.status, 401);
    assert.equal(api.requests.length, 1);
  });
});

async function waitFor(check: () => boolean, timeout = 10_000): Promise<void> {
  const end = Date.now() + timeout;
  while (!check()) {
    if (Date.now() > end) throw new Error("timed out");
    await sleep(5);
  }
}
