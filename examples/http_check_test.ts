// examples/http_check.ts: URLs served by a local node:http server, the
// Conveyor API by the test API server; the outcome recorded with a PUT.
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { Client, type Resource, startDriver } from "../mod.ts";
import { reconcileOnce, startTestConveyor } from "../testing.ts";
import { startTestApiServer, type TestApiServer } from "../test_api_server.ts";
import { httpCheck, type UrlCheck } from "./http_check.ts";

const quiet = { handleSignals: false, configureLogging: false } as const;

describe("examples/http_check.ts", () => {
  let site: Server;
  let base = "";
  let api: TestApiServer;
  let client: Client;

  before(async () => {
    // /ok answers 200, /created 201, /slow after 5 s, anything else 404.
    site = createServer((req, res) => {
      const send = (status: number) => {
        res.writeHead(status, { connection: "close" });
        res.end(String(status));
      };
      const path = new URL(req.url ?? "/", "http://x").pathname;
      if (path === "/slow") {
        const t = setTimeout(() => send(200), 5_000);
        res.on("close", () => clearTimeout(t));
      } else send(path === "/ok" ? 200 : path === "/created" ? 201 : 404);
    });
    await new Promise<void>((r) => site.listen(0, "127.0.0.1", r));
    base = `http://127.0.0.1:${(site.address() as AddressInfo).port}`;
    api = await startTestApiServer();
    client = new Client({ baseUrl: api.url });
    await client.applyResourceDefinition({ name: "http-check", schema: { type: "object" } });
  });
  after(async () => {
    site?.closeAllConnections();
    await new Promise((r) => site?.close(r));
    await api?.close();
  });

  /** Creates the resource on the API and returns it as the server sends it in events. */
  async function created(name: string, spec: unknown): Promise<Resource> {
    await client.createResource({ name, resource: "http-check", spec });
    return await client.getResource("http-check", name);
  }
  const puts = (name: string) =>
    api.requests.filter((r) => r.method === "PUT" && r.path === `/resources/http-check/${name}`);

  it("succeeds when every URL answers the expected status, and records it with a PUT", async () => {
    const spec = { urls: [`${base}/ok`, `${base}/ok?again`] };
    const resource = await created("web", spec);
    const { result, logs, decision } = await reconcileOnce(httpCheck, resource, { client });
    assert.deepEqual(decision, { action: "ack" });
    assert.equal(result?.success, true);
    assert.equal(result?.message, "2 of 2 URLs answered 200");
    const checks = (result?.data as { checks: UrlCheck[] }).checks;
    assert.deepEqual(checks.map((c) => [c.url, c.status, c.ok]), [
      [`${base}/ok`, 200, true],
      [`${base}/ok?again`, 200, true],
    ]);
    assert.deepEqual(logs.slice(0, 2).map((l) => [l.level, l.labels.status]), [
      ["info", 200],
      ["info", 200],
    ]);
    assert.match(logs[0].message, new RegExp(`^GET ${base}/ok: 200 \\(\\d+ ms\\)$`));
    assert.equal(logs[2].message, "recorded the outcome as version 2");

    // The PUT: the resource as sent, its metadata strings only, the outcome added.
    assert.equal(puts("web").length, 1);
    const body = JSON.parse(puts("web")[0].body);
    assert.deepEqual(body.spec, spec, "the spec as the user wrote it: no defaults added");
    assert.equal(body.metadata.version, "1");
    const stored = api.resources.get("http-check/web")!.at(-1)!;
    assert.equal(stored.metadata.version, "2");
    assert.equal(stored.metadata["http-check.outcome"], "passing");
    assert.equal(stored.metadata["http-check.summary"], "2 of 2 URLs answered 200");
    assert.ok(!Number.isNaN(Date.parse(String(stored.metadata["http-check.checked-at"]))));
    assert.ok(Object.values(stored.metadata).every((x) => typeof x === "string"));
  });

  it("fails when a URL answers another status or not at all, and records that", async () => {
    const resource = await created("broken", {
      urls: [`${base}/ok`, `${base}/missing`, `${base}/slow`, "http://127.0.0.1:1/"],
      timeoutMs: 300,
    });
    const started = Date.now();
    const { result, logs, decision } = await reconcileOnce(httpCheck, resource, { client });
    assert.ok(Date.now() - started < 3_000, "each URL bounded by timeoutMs");
    assert.deepEqual(decision, { action: "ack" });
    assert.equal(result?.success, false);
    assert.equal(result?.message, "1 of 4 URLs answered 200");
    const checks = (result?.data as { checks: UrlCheck[] }).checks;
    assert.deepEqual(checks.map((c) => [c.status, c.ok]), [
      [200, true],
      [404, false],
      [null, false],
      [null, false],
    ]);
    assert.equal(checks[2].error, "no answer within 300 ms");
    assert.deepEqual(logs.slice(0, 4).map((l) => l.level), ["info", "warning", "error", "error"]);
    assert.match(logs[1].message, /: 404, expected 200 /);
    const stored = api.resources.get("http-check/broken")!.at(-1)!;
    assert.equal(stored.metadata["http-check.outcome"], "failing");
    assert.equal(stored.metadata["http-check.summary"], "1 of 4 URLs answered 200");
  });

  it("takes expectStatus; runs without a client, recording nothing", async () => {
    const before = api.requests.length;
    const { result, logs } = await reconcileOnce(httpCheck, {
      name: "created",
      spec: { urls: [`${base}/created`], expectStatus: 201 },
    });
    assert.equal(result?.success, true);
    assert.equal(result?.message, "1 of 1 URLs answered 201");
    assert.equal(logs.length, 1);
    assert.equal(api.requests.length, before);
  });

  it("refuses a spec without http(s) URLs as a permanent failure", async () => {
    for (const spec of [{ urls: [] }, { urls: ["not a url"] }, { urls: ["file:///etc/passwd"] }]) {
      const { result, decision } = await reconcileOnce(httpCheck, { name: "bad", spec });
      assert.equal(decision.action, "terminate", JSON.stringify(spec));
      assert.match(result!.message, /^resource spec does not fit the driver's schema: urls/);
    }
  });

  it("skips the update events its own PUT causes", async () => {
    const { decision } = await reconcileOnce(httpCheck, { name: "web" }, { event: "update" });
    assert.equal(decision.action, "skip");
  });

  it("rejects with ctx.signal's reason when the runtime gives up mid-check", async () => {
    const ac = new AbortController();
    const pending = reconcileOnce(httpCheck, { name: "s", spec: { urls: [`${base}/slow`] } }, {
      signal: ac.signal,
      client,
    });
    const before = api.requests.length;
    await new Promise((r) => setTimeout(r, 100));
    const reason = new Error("shutting down");
    ac.abort(reason);
    const { decision } = await pending;
    assert.equal(decision.action, "handBack");
    assert.equal((decision as { error?: unknown }).error, reason);
    assert.equal(api.requests.length, before, "nothing recorded");
  });

  it("runs under the real runtime with ctx.client from apiUrl", async () => {
    await using conveyor = await startTestConveyor();
    await using _running = await startDriver(httpCheck, {
      ...quiet,
      servers: conveyor.url,
      apiUrl: api.url,
    });
    const resource = await created("live", { urls: [`${base}/ok`] });
    const e = await conveyor.emit({
      resource: "http-check",
      name: "live",
      spec: resource.spec,
      metadata: resource.metadata as Record<string, string>,
    });
    const { driverresult } = await conveyor.waitForResult(e.message.run_id);
    assert.equal(driverresult.success, true);
    assert.equal(driverresult.message, "1 of 1 URLs answered 200");
    const stored = api.resources.get("http-check/live")!.at(-1)!;
    assert.equal(stored.metadata["http-check.outcome"], "passing");
    assert.equal(stored.metadata["http-check.run"], e.message.run_id);
  });
});
