// examples/multi_resource.ts: two resource types with their own typed specs;
// events a driver does not handle are skipped, reconcile never called.
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { type Driver, startDriver } from "../mod.ts";
import { readStream, reconcileOnce, startTestConveyor } from "../testing.ts";
import { consumerReady, spawnProgram, waitFor } from "../test_util.ts";
import { deployer, drivers, repoMirror } from "./multi_resource.ts";

const quiet = { handleSignals: false, configureLogging: false } as const;

/** The spec type a driver's reconcile gets. */
type SpecOf<D> = D extends Driver<infer S> ? S : never;
// Compile-time checks: each driver's spec is its schema's output, defaults included.
const _repo: SpecOf<typeof repoMirror> = { url: "https://example.com/r.git", branch: "main" };
const _deploy: SpecOf<typeof deployer> = { image: "web:1", replicas: 2, env: {} };

describe("examples/multi_resource.ts", () => {
  it("gives each driver its own typed spec, defaults applied", async () => {
    const repo = await reconcileOnce(repoMirror, {
      name: "web",
      spec: { url: "https://git.example.com/web.git" },
    });
    assert.deepEqual(repo.decision, { action: "ack" });
    assert.deepEqual(repo.result, {
      success: true,
      message: "mirrored https://git.example.com/web.git@main",
      data: { type: "repository", name: "web", event: "create" },
    });
    assert.deepEqual(repo.logs[0], {
      level: "info",
      message: "cloning https://git.example.com/web.git",
      labels: { type: "repository", event: "create", branch: "main" },
    });

    const deploy = await reconcileOnce(deployer, {
      name: "web",
      spec: { image: "web:2", replicas: 2 },
    }, { event: "update" });
    assert.deepEqual(deploy.decision, { action: "ack" });
    assert.equal(deploy.result?.message, "rolled out web:2 x2");
    assert.deepEqual(deploy.logs.map((l) => [l.message, l.labels.vars]), [
      ["replica 1/2: web:2", 0],
      ["replica 2/2: web:2", 0],
      [deploy.logs[2].message, undefined],
    ]);
    assert.match(deploy.logs[2].message, /^rolled out web:2 x2 \(\d+ ms\)$/);
    assert.equal(
      (await reconcileOnce(deployer, { name: "w", spec: { image: "web:1" } })).result?.message,
      "deployed web:1 x1",
    );
  });

  it("skips the events a driver does not handle, without calling reconcile", async () => {
    const cases: [Driver, string][] = [
      [repoMirror, "update"],
      [repoMirror, "delete"],
      [deployer, "delete"],
    ];
    for (const [driver, event] of cases) {
      // An invalid spec too: the event is skipped before the spec is looked at.
      const { decision, result, logs } = await reconcileOnce(driver, { name: "x", spec: 42 }, {
        event,
      });
      assert.equal(decision.action, "skip", `${driver.name} ${event}`);
      assert.match((decision as { reason: string }).reason, new RegExp(`event "${event}"`));
      assert.equal(result, undefined);
      assert.deepEqual(logs, []);
    }
  });

  it("refuses a spec of the wrong shape for each type", async () => {
    const repo = await reconcileOnce(repoMirror, { name: "r", spec: { image: "web:1" } });
    assert.equal(repo.decision.action, "terminate");
    assert.match(repo.result!.message, /url: /);
    const deploy = await reconcileOnce(deployer, {
      name: "d",
      spec: { image: "web:1", replicas: -1 },
    });
    assert.equal(deploy.decision.action, "terminate");
    assert.match(deploy.result!.message, /replicas: /);
  });

  it("runs both under the real runtime: results for handled events, skips for the rest", async () => {
    await using conveyor = await startTestConveyor();
    await using repo = await startDriver(repoMirror, { ...quiet, servers: conveyor.url });
    await using deploy = await startDriver(deployer, { ...quiet, servers: conveyor.url });
    const url = "https://git.example.com/api.git";
    const handled = [
      await conveyor.emit({ resource: "repository", name: "api", spec: { url } }),
      await conveyor.emit({ resource: "deployment", name: "api", spec: { image: "api:1" } }),
      await conveyor.emit({ resource: "deployment", name: "api", spec: { image: "api:2" } }, {
        event: "update",
      }),
    ];
    // Not handled: acknowledged and skipped, no result.
    await conveyor.emit({ resource: "repository", name: "api", spec: { url } }, {
      event: "update",
    });
    await conveyor.emit({ resource: "repository", name: "api" }, { event: "delete" });
    await conveyor.emit({ resource: "deployment", name: "api" }, { event: "delete" });
    const messages = [];
    for (const e of handled) {
      const { driverresult } = await conveyor.waitForResult(e.message.run_id);
      messages.push([driverresult.driver, driverresult.message]);
    }
    assert.deepEqual(messages, [
      ["repo-mirror", `mirrored ${url}@main`],
      ["deployer", "deployed api:1 x1"],
      ["deployer", "rolled out api:2 x1"],
    ]);
    await waitFor(
      () => repo.stats().skipped === 2 && deploy.stats().skipped === 1,
      "the skipped events",
    );
    // Only the three handled events have a result.
    const stored = await readStream(conveyor.url, "pipeline-engine");
    assert.deepEqual(
      stored.map((m) => (m.json as { run_id: string }).run_id).sort(),
      handled.map((e) => e.message.run_id).sort(),
    );
  });

  it("serves both drivers from one process when run as a program", async () => {
    await using conveyor = await startTestConveyor();
    await using program = spawnProgram("examples/multi_resource", { NATS_URL: conveyor.url }, {
      stderr: "capture",
    });
    for (const d of drivers) await consumerReady(conveyor.url, d.name);
    const a = await conveyor.emit({
      resource: "repository",
      name: "p",
      spec: { url: "https://x.example/p.git", branch: "dev" },
    });
    const b = await conveyor.emit({
      resource: "deployment",
      name: "p",
      spec: { image: "p:1", replicas: 0 },
    });
    const ra = await conveyor.waitForResult(a.message.run_id, { timeout: 30_000 });
    const rb = await conveyor.waitForResult(b.message.run_id, { timeout: 30_000 });
    assert.equal(ra.driverresult.message, "mirrored https://x.example/p.git@dev", program.err);
    assert.equal(rb.driverresult.message, "deployed p:1 x0");
  });
});
