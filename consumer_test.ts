// The consumer policy: a start never narrows what running instances of
// another version need, and an instance reconciles only what it handles.
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { nanos } from "@nats-io/transport-node";
import {
  AckPolicy,
  type ConsumerConfig,
  DeliverPolicy,
  jetstreamManager,
} from "@nats-io/jetstream";
import { consumerWants, EVENTS_KEY, fleetOf, planConsumer } from "./consumer.ts";
import { ConsumerError, type Driver, type ServeOptions, startDriver } from "./mod.ts";
import { publishEvent } from "./testing.ts";
import {
  consumerState,
  conveyorEnv,
  type Env,
  type Envelope,
  envelope,
  quiet,
  results,
  sleep,
  waitFor,
  waitForResults,
} from "./test_util.ts";

const defaults = { ackWait: 30_000, maxAckPending: 1_000, maxAttempts: 5 };

function existing(overrides: Partial<ConsumerConfig> = {}): ConsumerConfig {
  return {
    name: "app",
    durable_name: "app",
    ack_policy: AckPolicy.Explicit,
    deliver_policy: DeliverPolicy.All,
    filter_subjects: ["resources.a", "drivers.app.resources.a"],
    ack_wait: nanos(30_000),
    max_ack_pending: 1_000,
    max_deliver: 8,
    metadata: { [EVENTS_KEY]: "*" },
    ...overrides,
  } as ConsumerConfig;
}

describe("planConsumer", () => {
  const v1 = consumerWants({ name: "app", resources: ["a"] }, defaults);
  const v2 = consumerWants({ name: "app", resources: ["a", "b"] }, defaults);

  it("creates a durable explicit-ack consumer with the backstop and the events it handles", () => {
    const plan = planConsumer(
      undefined,
      consumerWants({
        name: "app",
        resources: ["a"],
        events: ["create", "create", "process"],
      }, defaults),
      "widen",
    );
    assert.equal(plan.action, "create");
    assert.equal(plan.config.durable_name, "app");
    assert.equal(plan.config.max_deliver, 8);
    assert.deepEqual(plan.config.metadata, { [EVENTS_KEY]: '["create","process"]' });
  });

  it("widens: a v1 start keeps v2's resource types, larger ack_wait and limits", () => {
    const v2Made = existing({
      filter_subjects: v2.subjects,
      ack_wait: nanos(90_000),
      max_ack_pending: 5_000,
      max_deliver: 20,
    });
    const plan = planConsumer(v2Made, v1, "widen");
    assert.equal(plan.action, "keep", JSON.stringify(plan.changes));
  });

  it("widens: a v2 start adds its types, and raises what is lower", () => {
    const plan = planConsumer(
      existing({ ack_wait: nanos(9_000), max_ack_pending: 1 }),
      v2,
      "widen",
    );
    assert.equal(plan.action, "update");
    assert.deepEqual([...plan.config.filter_subjects!].sort(), [...v2.subjects].sort());
    assert.equal(plan.config.ack_wait, nanos(30_000));
    assert.equal(plan.config.max_ack_pending, 1_000);
  });

  it("replace: sets exactly this instance's settings", () => {
    const plan = planConsumer(
      existing({ filter_subjects: v2.subjects, ack_wait: nanos(90_000) }),
      v1,
      "replace",
    );
    assert.deepEqual(plan.config.filter_subjects, v1.subjects);
    assert.equal(plan.config.ack_wait, nanos(30_000));
    assert.match(plan.changes.join("\n"), /filter_subjects - resources\.b/);
  });

  it("unions the events the versions handle, `*` winning", () => {
    const create = consumerWants({ name: "app", resources: ["a"], events: ["create"] }, defaults);
    const del = consumerWants({ name: "app", resources: ["a"], events: ["delete"] }, defaults);
    const after = planConsumer(
      existing({ metadata: { [EVENTS_KEY]: '["create"]' } }),
      del,
      "widen",
    );
    assert.equal(after.config.metadata?.[EVENTS_KEY], '["create","delete"]');
    assert.equal(planConsumer(existing(), create, "widen").action, "keep");
    const fleet = fleetOf({ ack_wait: nanos(9_000), metadata: after.config.metadata });
    assert.equal(fleet.ackWaitMs, 9_000);
    assert.deepEqual([...(fleet.events as Set<string>)], ["create", "delete"]);
  });

  it("gives an unlimited max_deliver (older runtimes) the backstop, and keeps server-managed metadata out", () => {
    const plan = planConsumer(
      existing({ max_deliver: -1, metadata: { "_nats.ver": "2.11.0", team: "ci" } }),
      v1,
      "widen",
    );
    assert.equal(plan.config.max_deliver, 8);
    assert.deepEqual(plan.config.metadata, { team: "ci", [EVENTS_KEY]: "*" });
  });

  it("keeps an unlimited max_ack_pending unlimited when widening", () => {
    assert.equal(planConsumer(existing({ max_ack_pending: -1 }), v1, "widen").action, "keep");
    assert.equal(
      planConsumer(existing({ max_ack_pending: -1 }), v1, "replace").config.max_ack_pending,
      1_000,
    );
  });

  it("refuses a push or non-explicit consumer with a ConsumerError saying what to do", () => {
    assert.throws(
      () => planConsumer(existing({ ack_policy: AckPolicy.All }), v1, "widen"),
      (err) => err instanceof ConsumerError && /delete it/.test(err.message),
    );
  });
});

const stored = async (env: Env): Promise<Envelope[]> => (await results(env)).map(envelope);
const waitForStored = async (env: Env, n: number): Promise<Envelope[]> =>
  (await waitForResults(env, n, 30_000)).map(envelope);

/** A version of driver "app": records the names of what it reconciled. */
function version(resources: string[], events?: string[]) {
  const seen: string[] = [];
  const driver: Driver = {
    name: "app",
    resources,
    events,
    reconcile({ resource, event }) {
      seen.push(`${resource.resource}/${event}/${resource.name}`);
      return { success: true, message: `v${resources.length}` };
    },
  };
  return { driver, seen };
}

describe("rolling deploys: two versions share one consumer", () => {
  const opts = (env: Env): ServeOptions => ({
    servers: env.url,
    ...quiet,
    retryDelay: 50,
    retryMaxDelay: 200,
  });

  it("a v1 start and stop does not narrow v2's filter: type-b events still reach v2", async () => {
    await using env = await conveyorEnv();
    const v2 = version(["a", "b"]);
    await using _v2 = await startDriver(v2.driver, opts(env));
    const v1 = version(["a"]);
    const old = await startDriver(v1.driver, opts(env));
    await old.stop();
    const filter = (await consumerState(env.nc, "app")).config.filter_subjects!;
    assert.ok(filter.includes("resources.b"), `filter kept b: ${filter}`);
    await publishEvent(env.nc, { resource: "b", name: "after-v1" });
    await waitForStored(env, 1);
    assert.deepEqual(v2.seen, ["b/create/after-v1"]);
  });

  it("side by side, v1 never reconciles what only v2 handles; then v1 alone reports it as not handled", async () => {
    await using env = await conveyorEnv();
    const v1 = version(["a"]);
    const v2 = version(["a", "b"]);
    const first = await startDriver(v1.driver, { ...opts(env), concurrency: 4 });
    const second = await startDriver(v2.driver, { ...opts(env), concurrency: 4 });
    for (let i = 0; i < 10; i++) {
      await publishEvent(env.nc, { resource: i % 2 ? "b" : "a", name: `r${i}` });
    }
    const both = await waitForStored(env, 10);
    assert.ok(both.every((r) => r.driverresult.success), "every event succeeded once");
    assert.equal(new Set(both.map((r) => r.run_id)).size, 10);
    assert.ok(v1.seen.every((s) => s.startsWith("a/")), `v1 saw ${v1.seen}`);
    assert.equal(v2.seen.filter((s) => s.startsWith("b/")).length, 5);
    await second.stop();

    // v2 rolled back: the filter still has b; v1 hands b events back, and
    // reports them as failed once their attempts are spent.
    await publishEvent(env.nc, { resource: "b", name: "orphan" });
    await publishEvent(env.nc, { resource: "a", name: "still-mine" });
    const all = await waitForStored(env, 12);
    const orphan = all.find((r) => r.resource.name === "orphan")!;
    assert.equal(orphan.driverresult.success, false);
    assert.match(orphan.driverresult.message, /handles resource type "b"/);
    assert.equal(orphan.driverresult.data.error, "NotHandledError");
    assert.ok(!v1.seen.some((s) => s.includes("orphan")));
    assert.ok(v1.seen.includes("a/create/still-mine"));
    await first.stop();
  });

  it("hands an event name back to the version that handles it; skips one no version handles", async () => {
    await using env = await conveyorEnv();
    const creates = version(["a"], ["create"]);
    const both = version(["a"], ["create", "delete"]);
    await using _c = await startDriver(creates.driver, { ...opts(env), concurrency: 1 });
    await using _b = await startDriver(both.driver, { ...opts(env), concurrency: 1 });
    const meta = (await consumerState(env.nc, "app")).config.metadata;
    assert.equal(meta?.[EVENTS_KEY], '["create","delete"]');
    for (let i = 0; i < 6; i++) {
      await publishEvent(env.nc, { resource: "a", name: `d${i}`, event: "delete" });
    }
    await publishEvent(env.nc, { resource: "a", name: "nobody", event: "archive" });
    const r = await waitForStored(env, 6);
    assert.ok(r.every((x) => x.driverresult.success));
    assert.equal(both.seen.filter((s) => s.includes("/delete/")).length, 6);
    assert.ok(!creates.seen.some((s) => s.includes("/delete/")));
    await waitFor(async () => {
      const s = await consumerState(env.nc, "app");
      return s.pending === 0 && s.ackPending === 0;
    }, "archive skipped");
    assert.equal((await stored(env)).length, 6, "no result for an event no version handles");
  });

  it("a start with a shorter ack_wait does not lower it: a long job runs once", async () => {
    await using env = await conveyorEnv();
    const runs: string[] = [];
    const slow: Driver = {
      name: "app",
      resources: ["a"],
      async reconcile({ message }) {
        runs.push(message.id);
        await sleep(4_000);
        return { success: true, message: "done" };
      },
    };
    await using _a = await startDriver(slow, { ...opts(env), ackWait: 9_000 });
    await publishEvent(env.nc, { resource: "a", name: "long" });
    await waitFor(() => runs.length === 1, "job started");
    // Two instances that would like 1 s, ready to take a redelivery.
    await using _b = await startDriver(slow, { ...opts(env), ackWait: 1_000 });
    await using _c = await startDriver(slow, { ...opts(env), ackWait: 1_000 });
    const s = await consumerState(env.nc, "app");
    assert.equal(s.config.ack_wait, nanos(9_000));
    await waitForStored(env, 1);
    await sleep(500);
    assert.equal(runs.length, 1, "ran once");
    assert.equal((await consumerState(env.nc, "app")).redelivered, 0);
  });

  it("consumerPolicy replace narrows on purpose, and a running v2 widens it again", async () => {
    await using env = await conveyorEnv();
    const v2 = version(["a", "b"]);
    const running = await startDriver(v2.driver, opts(env));
    await running.stop();
    const v1 = version(["a"]);
    const narrowed = await startDriver(v1.driver, { ...opts(env), consumerPolicy: "replace" });
    let filter = (await consumerState(env.nc, "app")).config.filter_subjects!;
    assert.deepEqual([...filter].sort(), ["drivers.app.resources.a", "resources.a"]);
    await narrowed.stop();

    // A v2 instance that runs while someone replaces the filter restores it.
    await using _v2 = await startDriver(v2.driver, opts(env));
    const jsm = await jetstreamManager(env.nc);
    await jsm.consumers.update("messages", "app", { filter_subjects: ["resources.a"] });
    filter = await waitFor(
      async () => {
        const f = (await consumerState(env.nc, "app")).config.filter_subjects!;
        return f.includes("resources.b") ? f : undefined;
      },
      "v2 widened the filter again",
      20_000,
    );
    assert.ok(filter.includes("drivers.app.resources.b"));
  });
});
