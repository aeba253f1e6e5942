import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { getEventListeners } from "node:events";
import { jetstreamManager } from "@nats-io/jetstream";
import { type Driver, serve, ShutdownError, startDriver } from "./mod.ts";
import { publishEvent, readStream } from "./testing.ts";
import { consumerState, conveyorEnv, type Env, sleep, spawnProgram, waitFor } from "./test_util.ts";

const quiet = { handleSignals: false, configureLogging: false } as const;

// deno-lint-ignore no-explicit-any
const results = async (env: Env): Promise<any[]> =>
  (await readStream(env.nc, "pipeline-engine")).map((m) => m.json);

/** Runs testdata/slow_driver in its own process, on the runtime running the tests. */
function spawnDriver(env: Env, name: string, jobMs: number) {
  return spawnProgram("slow_driver", {
    NATS_URL: env.url,
    DRIVER_NAME: name,
    JOB_MS: String(jobMs),
  });
}

describe("graceful shutdown", () => {
  it("on options.signal: stops pulling, finishes the job in flight, reports it, then resolves", async () => {
    await using env = await conveyorEnv();
    const started: string[] = [];
    const ac = new AbortController();
    const serving = serve({
      name: "grace",
      resources: ["pipeline"],
      async reconcile({ resource, signal, logger }) {
        started.push(resource.name);
        await sleep(800);
        logger.info("done");
        assert.equal(signal.aborted, false, "not aborted within shutdownTimeout");
        return { success: true, message: resource.name };
      },
    }, { servers: env.url, signal: ac.signal, concurrency: 1, configureLogging: false });
    // Interest retention: publish only once the consumer exists.
    await waitFor(() => consumerState(env.nc, "grace"), "consumer created");
    for (const name of ["a", "b", "c"]) await publishEvent(env.nc, { resource: "pipeline", name });
    await waitFor(() => started.length === 1, "first job started");
    ac.abort();
    await serving;
    const r = await results(env);
    assert.equal(r.length, 1, "the job in flight was reported");
    assert.equal(r[0].driverresult.message, started[0]);
    const logs = await readStream(env.nc, "logs-engine");
    assert.equal(logs.length, 1, "its log line was stored before the result");
    const s = await consumerState(env.nc, "grace");
    assert.equal(s.ackPending, 0, "nothing left unacknowledged");
    assert.equal(s.pending, 2, "the other events wait in the stream");
    assert.deepEqual(started, ["a"]);
  });

  it("hands back the events it pulled ahead, unstarted, for another instance to run", async () => {
    await using env = await conveyorEnv();
    const ran: { by: string; name: string; attempt: number }[] = [];
    const driver = (by: string): Driver => ({
      name: "ahead-stop",
      resources: ["pipeline"],
      async reconcile({ resource, attempt }) {
        ran.push({ by, name: resource.name, attempt });
        if (resource.name === "slow") await sleep(800);
        return { success: true, message: "ok" };
      },
    });
    const a = await startDriver(driver("a"), { servers: env.url, ...quiet, concurrency: 1 });
    // Short reconciles first, so that A pulls ahead behind the slow one.
    for (let i = 0; i < 20; i++) {
      await publishEvent(env.nc, { resource: "pipeline", name: `f${i}` });
    }
    await waitFor(async () => (await results(env)).length === 20, "20 results");
    await publishEvent(env.nc, { resource: "pipeline", name: "slow" });
    for (let i = 0; i < 10; i++) {
      await publishEvent(env.nc, { resource: "pipeline", name: `g${i}` });
    }
    await waitFor(() => ran.some((r) => r.name === "slow"), "the slow job running");
    await sleep(200);
    const queued = (await consumerState(env.nc, "ahead-stop")).ackPending - 1;
    assert.ok(queued > 0, "A pulled events ahead");
    await a.stop();
    assert.deepEqual(ran.filter((r) => r.name.startsWith("g")), [], "none started by A");
    await using _b = await startDriver(driver("b"), { servers: env.url, ...quiet });
    await waitFor(async () => (await results(env)).length === 31, "31 results", 15_000);
    const g = ran.filter((r) => r.name.startsWith("g"));
    assert.equal(g.length, 10, "each run once");
    assert.ok(g.every((r) => r.by === "b"));
    const s = await consumerState(env.nc, "ahead-stop");
    assert.equal(s.pending + s.ackPending, 0);
  });

  it("after shutdownTimeout aborts ctx.signal and hands the event to another instance", async () => {
    await using env = await conveyorEnv();
    const reasons: unknown[] = [];
    const stubborn: Driver = {
      name: "handover",
      resources: ["pipeline"],
      reconcile({ signal }) {
        // Never finishes by itself; ends only when aborted.
        return new Promise((_, reject) =>
          signal.addEventListener("abort", () => {
            reasons.push(signal.reason);
            reject(signal.reason);
          })
        );
      },
    };
    const first = await startDriver(stubborn, { servers: env.url, ...quiet, shutdownTimeout: 300 });
    const e = await publishEvent(env.nc, { resource: "pipeline", name: "web" });
    await waitFor(
      async () => (await consumerState(env.nc, "handover")).ackPending === 1,
      "in flight",
    );
    await first.stop();
    assert.ok(reasons[0] instanceof ShutdownError);
    assert.equal(first.stats().requeued, 1);
    assert.equal((await results(env)).length, 0, "no result for an abandoned job");
    const s = await consumerState(env.nc, "handover");
    assert.equal(s.ackPending + s.pending, 1, "the event is back for redelivery");

    const attempts: number[] = [];
    await using _second = await startDriver({
      ...stubborn,
      reconcile({ attempt }) {
        attempts.push(attempt);
        return { success: true, message: "taken over" };
      },
    }, { servers: env.url, ...quiet });
    const [r] = await waitFor(async () => {
      const r = await results(env);
      return r.length ? r : undefined;
    }, "result from the second instance");
    assert.equal(r.run_id, e.message.run_id);
    assert.equal(r.driverresult.message, "taken over");
    assert.deepEqual(attempts, [2]);
  });

  for (const signal of ["SIGTERM", "SIGINT"] as const) {
    it(`on ${signal} mid-job: publishes the job's result, exits 0, loses no event`, async () => {
      await using env = await conveyorEnv();
      await using driver = spawnDriver(env, signal, 1_500);
      await driver.ready();
      const names = ["one", "two", "three"];
      for (const name of names) await publishEvent(env.nc, { resource: "pipeline", name });
      await waitFor(() => driver.out.includes("started one"), "job started");
      driver.kill(signal);
      const code = await driver.exited;
      assert.equal(code, 0, `exit code (stdout: ${driver.out})`);
      assert.match(driver.out, /finished one/);
      assert.match(driver.out, /closed/);
      const r = await results(env);
      assert.equal(r.length, 1);
      assert.equal(r[0].driverresult.message, "built one");
      const s = await consumerState(env.nc, signal);
      assert.equal(s.ackPending, 0);
      assert.equal(s.pending, 2, "two events wait for the next instance");

      // The next instance picks up exactly what is left.
      const seen: string[] = [];
      await using _next = await startDriver({
        name: signal,
        resources: ["pipeline"],
        reconcile({ resource }) {
          seen.push(resource.name);
          return { success: true, message: `built ${resource.name}` };
        },
      }, { servers: env.url, ...quiet });
      await waitFor(async () => (await results(env)).length === 3, "all three results");
      assert.deepEqual(seen.sort(), ["three", "two"]);
    });
  }

  it("on a second SIGTERM stops waiting, hands the job back and still exits 0", async () => {
    await using env = await conveyorEnv();
    // A job far longer than the test, that ignores ctx.signal.
    await using driver = spawnDriver(env, "impatient", 60_000);
    await driver.ready();
    const e = await publishEvent(env.nc, { resource: "pipeline", name: "forever" });
    await waitFor(() => driver.out.includes("started forever"), "job started");
    driver.kill("SIGTERM");
    await sleep(300);
    driver.kill("SIGTERM");
    assert.equal(await driver.exited, 0, `exit code (stdout: ${driver.out})`);
    assert.doesNotMatch(driver.out, /finished forever/);
    assert.equal((await results(env)).length, 0);

    const taken: number[] = [];
    await using _next = await startDriver({
      name: "impatient",
      resources: ["pipeline"],
      reconcile({ attempt }) {
        taken.push(attempt);
      },
    }, { servers: env.url, ...quiet });
    const [r] = await waitFor(async () => {
      const r = await results(env);
      return r.length ? r : undefined;
    }, "the handed-back event's result");
    assert.equal(r.run_id, e.message.run_id);
    assert.deepEqual(taken, [2]);
  });

  it("stop() is idempotent and `await using` shuts down", async () => {
    await using env = await conveyorEnv();
    let running;
    {
      await using d = await startDriver({
        name: "scoped",
        resources: ["pipeline"],
        reconcile() {},
      }, { servers: env.url, ...quiet });
      running = d;
      await Promise.all([d.stop(), d.stop()]);
    }
    await running.closed;
    assert.equal(running.stats().inFlight, 0);
  });

  it("stop() is bounded by shutdownTimeout even while every log publish times out", async () => {
    await using env = await conveyorEnv();
    // No stream for logs.*, and a subscriber that never answers: every log
    // publish waits for an acknowledgement that does not come.
    await (await jetstreamManager(env.nc)).streams.delete("logs-engine");
    env.nc.subscribe("logs.>", { callback: () => {} });
    await env.nc.flush();
    let returned = 0;
    const d = await startDriver({
      name: "bounded-stop",
      resources: ["pipeline"],
      reconcile({ logger }) {
        for (let i = 0; i < 20; i++) logger.info(`line ${i}`);
        returned++;
        return { success: true, message: "ok" };
      },
    }, { servers: env.url, ...quiet, shutdownTimeout: 1_000 });
    await publishEvent(env.nc, { resource: "pipeline", name: "web" });
    await waitFor(() => returned === 1, "reconcile returned");
    const started = Date.now();
    const outcome = await Promise.race([
      d.stop().then(() => "stopped"),
      sleep(20_000).then(() => "still stopping after 20 s"),
    ]);
    const took = Date.now() - started;
    assert.equal(outcome, "stopped");
    assert.ok(took < 1_000 + 3_500, `stop() took ${took} ms with shutdownTimeout 1000`);
    assert.equal((await results(env)).length, 0, "no result without its logs");
    const s = await consumerState(env.nc, "bounded-stop");
    assert.equal(s.ackPending + s.pending, 1, "the event went back to the stream");
  });

  it("removes its listener from options.signal when it stops", async () => {
    await using env = await conveyorEnv();
    const ac = new AbortController();
    const d = await startDriver({ name: "listener", resources: ["pipeline"], reconcile() {} }, {
      servers: env.url,
      signal: ac.signal,
      configureLogging: false,
    });
    assert.equal(getEventListeners(ac.signal, "abort").length, 1);
    await d.stop();
    assert.equal(getEventListeners(ac.signal, "abort").length, 0);
  });

  it("exits the process only once every driver in it has stopped", async () => {
    await using env = await conveyorEnv();
    await using p = spawnProgram("two_drivers", {
      NATS_URL: env.url,
      DRIVER_A: "exit-a",
      DRIVER_B: "exit-b",
      JOB_MS: "2000",
    });
    await p.ready();
    await publishEvent(env.nc, { resource: "a", name: "stuck" });
    await publishEvent(env.nc, { resource: "b", name: "work" });
    await waitFor(() => p.out.includes("a started") && p.out.includes("b started"), "both started");
    p.kill("SIGTERM");
    await waitFor(() => p.out.includes("a closed"), "driver A stopped", 10_000);
    assert.equal(await p.exited, 0, `exit code (stdout: ${p.out})`);
    assert.match(p.out, /b finished[\s\S]*b closed/, "B finished its job before the exit");
    const r = await results(env);
    assert.deepEqual(r.map((x) => x.driverresult.message), ["b done"]);
  });

  it("with exitProcess false, leaves the process to the application", async () => {
    await using env = await conveyorEnv();
    await using p = spawnProgram("two_drivers", {
      NATS_URL: env.url,
      DRIVER_A: "stay-a",
      DRIVER_B: "stay-b",
      JOB_MS: "100",
      EXIT_PROCESS: "0",
    });
    await p.ready();
    await publishEvent(env.nc, { resource: "a", name: "stuck" });
    await publishEvent(env.nc, { resource: "b", name: "work" });
    await waitFor(() => p.out.includes("b closed") && p.out.includes("a started"), "B done");
    p.kill("SIGTERM");
    await waitFor(() => p.out.includes("a closed"), "driver A stopped", 10_000);
    const still = await Promise.race([
      p.exited.then(() => "exited"),
      sleep(1_500).then(() => "running"),
    ]);
    assert.equal(
      still,
      "running",
      "the hung reconcile's timer keeps the process, as the app chose",
    );
    p.kill("SIGKILL");
    await p.exited;
  });
});
