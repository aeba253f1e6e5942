// Health probes: the Web handler's answers, and the HTTP server of option
// `health` following the driver's connection to NATS; and stats() exact.
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import {
  ConfigError,
  type DriverHealth,
  healthHandler,
  PermanentError,
  startDriver,
} from "./mod.ts";
import { publishEvent } from "./testing.ts";
import { conveyorEnv, quiet, waitFor, waitForResults } from "./test_util.ts";

const status = (over: Partial<DriverHealth>): DriverHealth => ({
  alive: true,
  ready: true,
  connected: true,
  consuming: true,
  stopping: false,
  ...over,
});

const driver = {
  name: "probed",
  resources: ["pipeline"],
  reconcile: () => ({ success: true, message: "ok" }),
};

async function probe(url: string): Promise<number | "refused"> {
  try {
    const res = await fetch(url);
    await res.body?.cancel();
    return res.status;
  } catch {
    return "refused";
  }
}

describe("health", () => {
  it("answers /healthz by liveness and /readyz by readiness, with the status as JSON", async () => {
    let current = status({});
    const handler = healthHandler({ health: () => current });
    const get = (path: string, method = "GET") =>
      handler(new Request(`http://x${path}`, { method }));
    assert.equal(get("/healthz").status, 200);
    assert.deepEqual(await get("/readyz").json(), current);
    current = status({ ready: false, connected: false });
    assert.equal(get("/healthz").status, 200, "alive while NATS is down");
    const r = get("/readyz");
    assert.equal(r.status, 503);
    assert.equal(((await r.json()) as DriverHealth).connected, false);
    assert.equal(get("/probes/readyz/").status, 503, "mountable under a prefix");
    assert.equal(get("/metrics").status, 404);
    assert.equal(get("/readyz", "POST").status, 405);
    assert.equal(get("/readyz", "HEAD").body, null);
    current = status({ alive: false, ready: false });
    assert.equal(get("/healthz").status, 503);
  });

  it("serves the probes over HTTP; readiness follows NATS going away and coming back", async () => {
    await using env = await conveyorEnv();
    const running = await startDriver(driver, {
      servers: env.url,
      ...quiet,
      health: { port: 0, hostname: "127.0.0.1" },
    });
    try {
      const url = running.healthUrl!;
      assert.match(url, /^http:\/\/127\.0\.0\.1:\d+$/);
      await waitFor(async () => (await probe(`${url}/readyz`)) === 200, "ready");
      assert.equal(await probe(`${url}/healthz`), 200);
      const restarted = env.server.restart({ downtime: 3_000 });
      await waitFor(async () => (await probe(`${url}/readyz`)) === 503, "not ready", 5_000);
      assert.equal(await probe(`${url}/healthz`), 200, "still alive");
      assert.equal(running.health().connected, false);
      await restarted;
      await waitFor(async () => (await probe(`${url}/readyz`)) === 200, "ready again", 20_000);
      await running.stop();
      assert.equal(await probe(`${url}/healthz`), "refused", "the server is closed on stop");
      assert.equal(running.health().alive, false);
    } finally {
      await running.stop();
    }
  });

  it("is not ready while its consumer is missing, and ready again once it is recreated", async () => {
    await using env = await conveyorEnv();
    await using running = await startDriver(driver, {
      servers: env.url,
      ...quiet,
      health: { port: 0, hostname: "127.0.0.1" },
    });
    const url = `${running.healthUrl}/readyz`;
    await waitFor(async () => (await probe(url)) === 200, "ready");
    await (await jetstreamManager(env.nc)).consumers.delete("messages", "probed");
    // The pull fails at once; the runtime recreates the consumer, then waits
    // at least 250 ms before pulling again: polled often, the 503 shows.
    const seen = new Set<number | "refused">();
    await waitFor(
      async () => {
        seen.add(await probe(url));
        return seen.has(503) && (await probe(url)) === 200;
      },
      "not ready, then ready again",
      15_000,
    );
    assert.equal(running.health().consuming, true);
    await publishEvent(env.nc, { resource: "pipeline", name: "after" });
    await waitForResults(env, 1);
  });

  it("is off by default, and a port in use is a ConfigError at start", async () => {
    await using env = await conveyorEnv();
    await using first = await startDriver(driver, {
      servers: env.url,
      ...quiet,
      health: { port: 0, hostname: "127.0.0.1" },
    });
    await using plain = await startDriver(driver, { servers: env.url, ...quiet });
    assert.equal(plain.healthUrl, undefined);
    const port = Number(new URL(first.healthUrl!).port);
    await assert.rejects(
      startDriver(driver, { servers: env.url, ...quiet, health: { port, hostname: "127.0.0.1" } }),
      (err: unknown) => err instanceof ConfigError && err.field === "health",
    );
  });
});

describe("stats", () => {
  it("counts a known mix exactly, and keeps the latest failure", async () => {
    await using env = await conveyorEnv();
    const before = Date.now();
    await using running = await startDriver({
      name: "counted",
      resources: ["pipeline"],
      reconcile({ resource, attempt }) {
        if (resource.name === "perm") throw new PermanentError("cannot ever work");
        if (resource.name === "flaky" && attempt === 1) throw new Error("first try fails");
        return { success: true, message: "ok" };
      },
    }, { servers: env.url, ...quiet, maxAttempts: 3, retryDelay: 100 });
    // One at a time, so that the latest failure is known.
    await publishEvent(env.nc, { resource: "pipeline", name: "ok" });
    await publishEvent(env.nc, { resource: "pipeline", name: "perm" });
    await waitForResults(env, 2);
    await waitFor(() => running.stats().lastError, "the failure noted");
    assert.equal(running.stats().lastError?.message, "cannot ever work");
    await publishEvent(env.nc, { resource: "pipeline", name: "flaky" });
    await waitForResults(env, 3);
    await waitFor(() => running.stats().settling === 0, "settled");
    assert.equal(running.stats().lastError?.message, "first try fails");
    await jetstream(env.nc).publish("resources.pipeline", "not json");
    await waitFor(() => running.stats().invalid === 1, "the malformed message terminated");
    const s = running.stats();
    assert.equal(s.received, 5, "ok, perm, flaky twice, the malformed one");
    assert.equal(s.succeeded, 2);
    assert.equal(s.failed, 1);
    assert.equal(s.retried, 1);
    assert.equal(s.invalid, 1);
    assert.equal(s.skipped, 0);
    assert.equal(s.requeued, 0);
    assert.equal(s.inFlight, 0);
    assert.equal(s.hung, 0);
    assert.equal(s.queued, 0);
    assert.ok(s.startedAt >= before && s.startedAt <= Date.now());
    assert.match(s.lastError!.message, /JSON/);
    assert.equal(s.lastError!.runId, undefined);
    assert.ok(s.lastError!.at >= s.startedAt);
  });
});
