import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { jetstreamManager } from "@nats-io/jetstream";
import { AckPolicy, DeliverPolicy } from "@nats-io/jetstream";
import { nanos } from "@nats-io/transport-node";
import {
  ConfigError,
  ConnectError,
  type Driver,
  type ReconcileContext,
  resultMsgId,
  startDriver,
  StreamNotFoundError,
} from "./mod.ts";
import { type PublishedEvent, publishEvent, startNatsServer } from "./testing.ts";
import {
  consumerState,
  conveyorEnv,
  drained,
  envelope,
  quiet,
  results,
  sddValidators,
  sleep,
  waitFor,
  waitForResults,
} from "./test_util.ts";

describe("serve: starting up", () => {
  it("creates the durable pull consumer with both subject forms per resource type", async () => {
    await using env = await conveyorEnv();
    await using _d = await startDriver({
      name: "builder",
      resources: ["pipeline", "image"],
      reconcile() {},
    }, { servers: env.url, ...quiet, ackWait: 5_000, maxAckPending: 64 });
    const { config } = await consumerState(env.nc, "builder");
    assert.equal(config.durable_name, "builder");
    assert.equal(config.name, "builder");
    assert.equal(config.ack_policy, AckPolicy.Explicit);
    assert.equal(config.deliver_policy, DeliverPolicy.All);
    assert.equal(config.ack_wait, nanos(5_000));
    assert.equal(config.max_ack_pending, 64);
    assert.deepEqual([...config.filter_subjects!].sort(), [
      "drivers.builder.resources.image",
      "drivers.builder.resources.pipeline",
      "resources.image",
      "resources.pipeline",
    ]);
  });

  it("updates a consumer left by the Go SDK (no durable name, max_ack_pending 1, fewer resources)", async () => {
    await using env = await conveyorEnv();
    const jsm = await jetstreamManager(env.nc);
    await jsm.consumers.add("messages", {
      name: "legacy",
      filter_subjects: ["resources.pipeline", "drivers.legacy.resources.pipeline"],
      ack_policy: AckPolicy.Explicit,
      deliver_policy: DeliverPolicy.All,
      max_ack_pending: 1,
    });
    const running = await startDriver({
      name: "legacy",
      resources: ["pipeline", "image"],
      reconcile() {},
    }, { servers: env.url, ...quiet });
    await running.stop();
    const { config } = await consumerState(env.nc, "legacy");
    assert.equal(config.max_ack_pending, 1_000);
    assert.ok(
      !config.inactive_threshold || config.inactive_threshold >= nanos(50 * 365 * 24 * 3_600_000),
      "the consumer no longer expires",
    );
    // With no client left, past the 5 s the Go SDK's consumer would have had.
    await sleep(5_500);
    assert.equal((await consumerState(env.nc, "legacy")).config.name, "legacy");
    assert.equal(config.filter_subjects?.length, 4);
  });

  it("rejects invalid driver and resource names with a ConfigError", async () => {
    const base: Driver = { name: "ok", resources: ["pipeline"], reconcile() {} };
    for (
      const [driver, field] of [
        [{ ...base, name: "has.dot" }, "name"],
        [{ ...base, name: "has space" }, "name"],
        [{ ...base, name: "" }, "name"],
        [{ ...base, name: "a>b" }, "name"],
        [{ ...base, resources: [] }, "resources"],
        [{ ...base, resources: ["x*"] }, "resources"],
        [{ ...base, reconcile: undefined }, "reconcile"],
      ] as const
    ) {
      await assert.rejects(
        startDriver(driver as unknown as Driver, { servers: "nats://127.0.0.1:1", ...quiet }),
        (err) => err instanceof ConfigError && err.field === field,
      );
    }
  });

  it("rejects with a ConnectError when NATS cannot be reached within connectTimeout", async () => {
    const server = await startNatsServer();
    const url = server.url;
    await server.stop(); // a port nothing listens on any more
    await assert.rejects(
      startDriver({ name: "x", resources: ["pipeline"], reconcile() {} }, {
        servers: url,
        connectTimeout: 500,
        ...quiet,
      }),
      (err) => err instanceof ConnectError && err.cause !== undefined && err.servers[0] === url,
    );
  });

  it("keeps credentials in the server URL out of a ConnectError's message and JSON", async () => {
    const server = await startNatsServer();
    const port = server.port;
    await server.stop();
    const err = await startDriver({ name: "x", resources: ["pipeline"], reconcile() {} }, {
      servers: [`nats://alice:s3cret@127.0.0.1:${port}`, `bob:hunter2@127.0.0.1:${port}`],
      connectTimeout: 300,
      ...quiet,
    }).then(() => undefined, (e) => e);
    assert.ok(err instanceof ConnectError);
    const shown = `${err.message} ${JSON.stringify(err)} ${String(err)}`;
    assert.doesNotMatch(shown, /s3cret|hunter2|alice|bob/);
    assert.deepEqual(err.servers, [`nats://127.0.0.1:${port}`, `127.0.0.1:${port}`]);
  });

  it("rejects with a StreamNotFoundError asking whether the Conveyor server runs", async () => {
    await using server = await startNatsServer();
    await assert.rejects(
      startDriver({ name: "x", resources: ["pipeline"], reconcile() {} }, {
        servers: server.url,
        ...quiet,
      }),
      (err) =>
        err instanceof StreamNotFoundError && err.stream === "messages" &&
        /is the Conveyor server running/.test(err.message),
    );
  });
});

describe("serve: the reconcile flow", () => {
  it("delivers events from both subject forms to reconcile with a full context", async () => {
    await using env = await conveyorEnv();
    const seen: ReconcileContext[] = [];
    await using _d = await startDriver({
      name: "echo",
      resources: ["pipeline"],
      reconcile(ctx) {
        seen.push(ctx);
        return { success: true, message: "ok", data: { name: ctx.resource.name } };
      },
    }, { servers: env.url, ...quiet });
    const a = await publishEvent(env.nc, { resource: "pipeline", name: "from-api" });
    const b = await publishEvent(env.nc, {
      resource: "pipeline",
      name: "from-step",
      driver: "echo",
      event: "process",
      pipeline: "ci",
    });
    await publishEvent(env.nc, { resource: "other", name: "not-mine" });
    await publishEvent(env.nc, {
      resource: "pipeline",
      name: "for-another-driver",
      driver: "deploy",
    });
    await waitForResults(env, 2);
    await sleep(200);
    assert.deepEqual(seen.map((c) => c.resource.name).sort(), ["from-api", "from-step"]);
    const step = seen.find((c) => c.resource.name === "from-step")!;
    assert.equal(step.event, "process");
    assert.equal(step.runId, b.message.run_id);
    assert.equal(step.attempt, 1);
    assert.equal(step.resource.pipeline, "ci");
    assert.deepEqual(step.message, b.message);
    assert.ok(step.signal instanceof AbortSignal && !step.signal.aborted);
    assert.equal(step.logger.runId, b.message.run_id);
    const api = seen.find((c) => c.resource.name === "from-api")!;
    assert.deepEqual(api.resource, a.message.payload);
    assert.equal((await results(env)).length, 2);
  });

  it("publishes results in the server's envelope, valid against the SDD schemas", async () => {
    await using env = await conveyorEnv();
    const sdd = sddValidators();
    await using _d = await startDriver({
      name: "shape",
      resources: ["pipeline"],
      reconcile({ resource }) {
        if (resource.name === "nothing") return;
        if (resource.name === "fails") return { success: false, message: "tests failed" };
        return { success: true, message: "built", data: { image: "web:1", layers: [1, 2] } };
      },
    }, { servers: env.url, ...quiet });
    const sent = new Map<string, PublishedEvent>();
    for (const name of ["with-data", "nothing", "fails"]) {
      const e = await publishEvent(env.nc, { resource: "pipeline", name, pipeline: "ci" });
      sent.set(e.message.run_id, e);
    }
    const stored = await waitForResults(env, 3);
    for (const m of stored) {
      const env_ = envelope(m);
      const e = sent.get(env_.run_id)!;
      assert.ok(e, "result for a run that was published");
      assert.deepEqual(Object.keys(env_).sort(), ["driverresult", "event", "resource", "run_id"]);
      assert.equal(env_.event, "driver.result");
      assert.deepEqual(env_.resource, e.message.payload, "resource as received");
      assert.equal(sdd["resource"](env_.resource), undefined);
      assert.equal(sdd["driver-result-event"](env_.driverresult), undefined);
      assert.equal(env_.driverresult.driver, "shape");
      assert.equal(
        m.headers["Nats-Msg-Id"],
        resultMsgId("shape", e.message.run_id, e.message.id),
      );
      const { success, message, data } = env_.driverresult;
      assert.equal(sdd["driver-result"]({ success, message, data }), undefined);
      switch (e.message.payload.name) {
        case "with-data":
          assert.deepEqual(env_.driverresult, {
            success: true,
            message: "built",
            data: { image: "web:1", layers: [1, 2] },
            driver: "shape",
          });
          break;
        case "nothing":
          assert.equal(success, true);
          assert.equal(data, null);
          break;
        case "fails":
          assert.equal(success, false);
          assert.equal(message, "tests failed");
          break;
      }
    }
    await drained(env, "shape");
  });

  it("gives N events N results, once each, and leaves the consumer drained", async () => {
    await using env = await conveyorEnv();
    const N = 60;
    let calls = 0;
    await using _d = await startDriver({
      name: "many",
      resources: ["pipeline"],
      async reconcile({ logger, resource }) {
        calls++;
        logger.info(`working on ${resource.name}`);
        await sleep(Math.random() * 20);
        return { success: true, message: "ok" };
      },
    }, { servers: env.url, ...quiet, concurrency: 8 });
    const runIds = new Set<string>();
    for (let i = 0; i < N; i++) {
      const e = await publishEvent(env.nc, {
        resource: "pipeline",
        name: `r${i}`,
        driver: i % 2 ? "many" : undefined,
      });
      runIds.add(e.message.run_id);
    }
    const stored = await waitForResults(env, N);
    await drained(env, "many");
    await sleep(300);
    const final = await results(env);
    assert.equal(final.length, N);
    assert.deepEqual(new Set(final.map((m) => envelope(m).run_id)), runIds);
    assert.equal(calls, N);
    assert.equal(stored.length, N);
  });

  it("stores one result when the same event is delivered twice or its result is published again", async () => {
    await using env = await conveyorEnv();
    const runId = crypto.randomUUID();
    const id = crypto.randomUUID();
    // A result already stored for (driver, run, message), as when the
    // runtime published it and then lost the connection before the ack.
    const { jetstream } = await import("@nats-io/jetstream");
    await jetstream(env.nc).publish("pipelines.driver.result", "{}", {
      msgID: resultMsgId("dedupe", runId, id),
    });
    let calls = 0;
    await using _d = await startDriver({
      name: "dedupe",
      resources: ["pipeline"],
      reconcile() {
        calls++;
        return { success: true, message: "ok" };
      },
    }, { servers: env.url, ...quiet });
    // The same event, twice (a redelivery after a crash looks the same).
    await publishEvent(env.nc, { resource: "pipeline", name: "web", runId, id });
    await publishEvent(env.nc, { resource: "pipeline", name: "web", runId, id });
    const other = await publishEvent(env.nc, { resource: "pipeline", name: "other" });
    await waitFor(() => calls === 3, "3 reconciles");
    await drained(env, "dedupe");
    const stored = await results(env);
    assert.equal(stored.length, 2, "the pre-stored one and the other event's");
    assert.equal(envelope(stored[1]).run_id, other.message.run_id);
  });

  it("shares one consumer between two instances without processing an event twice", async () => {
    await using env = await conveyorEnv();
    const byInstance: string[][] = [[], []];
    const make = (i: number): Driver => ({
      name: "shared",
      resources: ["pipeline"],
      async reconcile({ message }) {
        byInstance[i].push(message.id);
        await sleep(20);
        return { success: true, message: `instance ${i}` };
      },
    });
    await using _a = await startDriver(make(0), { servers: env.url, ...quiet, concurrency: 2 });
    await using _b = await startDriver(make(1), { servers: env.url, ...quiet, concurrency: 2 });
    const ids: string[] = [];
    for (let i = 0; i < 40; i++) {
      ids.push((await publishEvent(env.nc, { resource: "pipeline", name: `r${i}` })).message.id);
    }
    await waitForResults(env, 40);
    await drained(env, "shared");
    const all = [...byInstance[0], ...byInstance[1]];
    assert.equal(all.length, 40, "each event reconciled once");
    assert.deepEqual(new Set(all), new Set(ids));
    assert.ok(byInstance[0].length > 0 && byInstance[1].length > 0, "both instances took work");
  });

  it("keeps a reconcile three times longer than ack_wait from being redelivered", async () => {
    await using env = await conveyorEnv();
    let calls = 0;
    const slow: Driver = {
      name: "slow",
      resources: ["pipeline"],
      async reconcile({ attempt }) {
        calls++;
        assert.equal(attempt, 1);
        await sleep(3_300);
        return { success: true, message: "done" };
      },
    };
    // A second instance is there to take the event if it were redelivered.
    await using _a = await startDriver(slow, { servers: env.url, ...quiet, ackWait: 1_000 });
    await using _b = await startDriver(slow, { servers: env.url, ...quiet, ackWait: 1_000 });
    await publishEvent(env.nc, { resource: "pipeline", name: "long" });
    await waitForResults(env, 1);
    await drained(env, "slow");
    const s = await consumerState(env.nc, "slow");
    assert.equal(calls, 1);
    assert.equal(s.redelivered, 0);
    assert.equal(s.delivered, 1);
  });

  it("runs at most `concurrency` reconciles and pulls no more than it can start", async () => {
    await using env = await conveyorEnv();
    let running = 0;
    let peak = 0;
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    await using _d = await startDriver({
      name: "bounded",
      resources: ["pipeline"],
      async reconcile() {
        running++;
        peak = Math.max(peak, running);
        await gate;
        running--;
      },
    }, { servers: env.url, ...quiet, concurrency: 3 });
    for (let i = 0; i < 10; i++) {
      await publishEvent(env.nc, { resource: "pipeline", name: `r${i}` });
    }
    await waitFor(() => running === 3, "3 running");
    await sleep(300);
    const s = await consumerState(env.nc, "bounded");
    assert.equal(s.ackPending, 3, "only the running ones are delivered");
    assert.equal(s.pending, 7, "the rest wait in the stream");
    release();
    await waitForResults(env, 10);
    assert.equal(peak, 3);
  });

  it("does not let one slow reconcile hold back the others", async () => {
    await using env = await conveyorEnv();
    let releaseSlow!: () => void;
    const slowGate = new Promise<void>((r) => (releaseSlow = r));
    await using _d = await startDriver({
      name: "hol",
      resources: ["pipeline"],
      async reconcile({ resource }) {
        if (resource.name === "slow") await slowGate;
      },
    }, { servers: env.url, ...quiet, concurrency: 2 });
    await publishEvent(env.nc, { resource: "pipeline", name: "slow" });
    for (let i = 0; i < 5; i++) await publishEvent(env.nc, { resource: "pipeline", name: `f${i}` });
    const five = await waitForResults(env, 5);
    assert.ok(five.every((m) => envelope(m).resource.name !== "slow"));
    releaseSlow();
    await waitForResults(env, 6);
  });

  it("skips events not in driver.events without a result", async () => {
    await using env = await conveyorEnv();
    const events: string[] = [];
    const running = await startDriver({
      name: "picky",
      resources: ["pipeline"],
      events: ["create"],
      reconcile({ event }) {
        events.push(event);
      },
    }, { servers: env.url, ...quiet });
    await publishEvent(env.nc, { resource: "pipeline", name: "a", event: "delete" });
    await publishEvent(env.nc, { resource: "pipeline", name: "b", event: "create" });
    await waitForResults(env, 1);
    await drained(env, "picky");
    assert.deepEqual(events, ["create"]);
    assert.equal(running.stats().skipped, 1);
    await running.stop();
  });
});

describe("serve: bad input and failures", () => {
  it("terminates malformed messages with a reason, reports what it can, and goes on", async () => {
    await using env = await conveyorEnv();
    const { jetstream } = await import("@nats-io/jetstream");
    const js = jetstream(env.nc);
    const handled: string[] = [];
    const running = await startDriver({
      name: "strict",
      resources: ["pipeline"],
      reconcile({ resource }) {
        handled.push(resource.name);
      },
    }, { servers: env.url, ...quiet });
    const readableRun = crypto.randomUUID();
    const resource = { id: "1", name: "web", resource: "pipeline", metadata: {}, spec: null };
    const bad = [
      "not json at all",
      JSON.stringify({ event: "create" }),
      JSON.stringify({ event: "create", id: "m", run_id: crypto.randomUUID(), payload: "{oops" }),
      JSON.stringify({
        event: "create",
        id: "m",
        run_id: crypto.randomUUID(),
        payload: JSON.stringify({ name: "no-id-or-type" }),
      }),
      // Readable run and resource, but no event name: gets a failure result.
      JSON.stringify({ id: "m2", run_id: readableRun, payload: JSON.stringify(resource) }),
      "[1,2,3]",
    ];
    for (const b of bad) await js.publish("resources.pipeline", b);
    await publishEvent(env.nc, { resource: "pipeline", name: "good" });
    await waitFor(() => handled.includes("good"), "the good event");
    const stored = await waitForResults(env, 2);
    await drained(env, "strict");
    const s = await consumerState(env.nc, "strict");
    assert.equal(s.redelivered, 0, "terminated, not redelivered");
    assert.deepEqual(handled, ["good"]);
    assert.equal(running.stats().invalid, bad.length);
    const failure = stored.map(envelope).find((e) => e.run_id === readableRun)!;
    assert.equal(failure.driverresult.success, false);
    assert.match(failure.driverresult.message, /invalid DriverMessage.*event/);
    assert.deepEqual(failure.resource, resource);
    await running.stop();
  });

  it("retries a throwing reconcile with a growing delay, then reports the failure", async () => {
    await using env = await conveyorEnv();
    const attempts: { attempt: number; at: number }[] = [];
    const running = await startDriver({
      name: "flaky",
      resources: ["pipeline"],
      reconcile({ attempt, resource }) {
        attempts.push({ attempt, at: Date.now() });
        if (resource.name === "recovers" && attempt === 2) return { success: true, message: "ok" };
        throw new Error(`boom ${attempt}`);
      },
    }, { servers: env.url, ...quiet, maxAttempts: 3, retryDelay: 200 });
    const e = await publishEvent(env.nc, { resource: "pipeline", name: "always" });
    const stored = await waitForResults(env, 1);
    assert.deepEqual(attempts.map((a) => a.attempt), [1, 2, 3]);
    // 200 ms then 400 ms, ±20%.
    assert.ok(attempts[1].at - attempts[0].at >= 150, "first retry waits");
    assert.ok(attempts[2].at - attempts[1].at >= 300, "second retry waits longer");
    const r = envelope(stored[0]);
    assert.equal(r.run_id, e.message.run_id);
    assert.equal(r.driverresult.success, false);
    assert.equal(r.driverresult.message, "boom 3");
    assert.deepEqual(r.driverresult.data, { error: "Error", attempts: 3 });
    await drained(env, "flaky");

    attempts.length = 0;
    await publishEvent(env.nc, { resource: "pipeline", name: "recovers" });
    const two = await waitForResults(env, 2);
    assert.equal(envelope(two[1]).driverresult.success, true);
    assert.deepEqual(attempts.map((a) => a.attempt), [1, 2]);
    assert.equal(running.stats().retried, 3);
    await running.stop();
  });

  it("fails at once on PermanentError, an invalid result and data that is not JSON", async () => {
    await using env = await conveyorEnv();
    const { PermanentError } = await import("./mod.ts");
    let calls = 0;
    await using _d = await startDriver({
      name: "perm",
      resources: ["pipeline"],
      // deno-lint-ignore no-explicit-any
      reconcile({ resource }): any {
        calls++;
        if (resource.name === "perm") throw new PermanentError("spec.image is required");
        if (resource.name === "bigint") return { success: true, message: "ok", data: { n: 1n } };
        return { ok: true };
      },
    }, { servers: env.url, ...quiet, maxAttempts: 5, retryDelay: 50 });
    await publishEvent(env.nc, { resource: "pipeline", name: "perm" });
    await publishEvent(env.nc, { resource: "pipeline", name: "shape" });
    await publishEvent(env.nc, { resource: "pipeline", name: "bigint" });
    const stored = await waitForResults(env, 3);
    await drained(env, "perm");
    assert.equal(calls, 3);
    const byName = new Map(
      stored.map((m) => [envelope(m).resource.name, envelope(m).driverresult]),
    );
    assert.equal(byName.get("perm").message, "spec.image is required");
    assert.equal(byName.get("perm").success, false);
    assert.match(byName.get("shape").message, /invalid DriverResult/);
    assert.equal(byName.get("bigint").success, false);
    assert.match(byName.get("bigint").message, /cannot be encoded as JSON/);
  });

  it("aborts ctx.signal when reconcileTimeout passes and counts the attempt as failed", async () => {
    await using env = await conveyorEnv();
    const reasons: unknown[] = [];
    await using _d = await startDriver({
      name: "hang",
      resources: ["pipeline"],
      reconcile({ signal }) {
        // Hangs until aborted, as a stuck HTTP call would.
        return new Promise((_, reject) => {
          signal.addEventListener("abort", () => {
            reasons.push(signal.reason);
            reject(signal.reason);
          });
        });
      },
    }, { servers: env.url, ...quiet, reconcileTimeout: 300, maxAttempts: 2, retryDelay: 50 });
    await publishEvent(env.nc, { resource: "pipeline", name: "stuck" });
    const [r] = await waitForResults(env, 1);
    assert.equal(reasons.length, 2);
    assert.equal((reasons[0] as Error).name, "ReconcileTimeoutError");
    assert.equal(envelope(r).driverresult.success, false);
    assert.match(envelope(r).driverresult.message, /did not finish within 300 ms/);
    await drained(env, "hang");
  });

  it("recreates its consumer when it is deleted under it", async () => {
    await using env = await conveyorEnv();
    const names: string[] = [];
    await using _d = await startDriver({
      name: "phoenix",
      resources: ["pipeline"],
      reconcile({ resource }) {
        names.push(resource.name);
      },
    }, { servers: env.url, ...quiet });
    const jsm = await jetstreamManager(env.nc);
    await jsm.consumers.delete("messages", "phoenix");
    // Interest retention: an event published while no consumer exists is
    // dropped by the server, so wait for the consumer to come back.
    const s = await waitFor(() => consumerState(env.nc, "phoenix"), "consumer back", 30_000);
    assert.equal(s.config.durable_name, "phoenix");
    await publishEvent(env.nc, { resource: "pipeline", name: "after-delete" });
    await waitForResults(env, 1, 30_000);
    assert.deepEqual(names, ["after-delete"]);
  });

  it("keeps working across a NATS server restart", async () => {
    await using env = await conveyorEnv();
    const names: string[] = [];
    await using _d = await startDriver({
      name: "survivor",
      resources: ["pipeline"],
      reconcile({ resource }) {
        names.push(resource.name);
      },
    }, { servers: env.url, ...quiet });
    await publishEvent(env.nc, { resource: "pipeline", name: "before" });
    await waitForResults(env, 1);
    await env.server.restart({ downtime: 500 });
    await waitFor(async () => {
      try {
        await publishEvent(env.url, { resource: "pipeline", name: "after" });
        return true;
      } catch {
        return false;
      }
    }, "publish after restart");
    await waitForResults(env, 2, 30_000);
    assert.deepEqual(names, ["before", "after"]);
  });
});
