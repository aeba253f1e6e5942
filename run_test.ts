// The per-event path under deterministic failures and hung work: every event
// ends in a result or a reason within its attempts, and `concurrency` bounds
// the driver code that really runs.
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { configure, type LogRecord, reset } from "@logtape/logtape";
import { type Driver, ReconcileTimeoutError, startDriver } from "./mod.ts";
import { MIN_PREFETCH_CAP, MIN_SETTLING } from "./flow.ts";
import { publishEvent, readStream } from "./testing.ts";
import {
  consumerState,
  conveyorEnv,
  drained,
  type Env,
  envelope,
  publishMany,
  quiet,
  results,
  sleep,
  waitFor,
  waitForResults,
} from "./test_util.ts";

/** Publishes raw wire text to resources.{type}, as a misbehaving publisher could. */
async function publishRaw(env: Env, type: string, body: string) {
  return await jetstream(env.nc).publish(`resources.${type}`, body);
}

/**
 * Takes the log store away: no stream for logs.*, and a subscriber that never
 * answers, so log publishes time out. `restore()` brings the stream back.
 */
async function blockLogStore(env: Env): Promise<{ restore(): Promise<void> }> {
  const jsm = await jetstreamManager(env.nc);
  const config = (await jsm.streams.info("logs-engine")).config;
  await jsm.streams.delete("logs-engine");
  const swallow = env.nc.subscribe("logs.>", { callback: () => {} });
  await env.nc.flush();
  return {
    async restore() {
      swallow.unsubscribe();
      await jsm.streams.add(config);
    },
  };
}

function wire(fields: { id?: string; runId?: string; spec?: string; name?: string }): string {
  const resource = `{"id":"r1","name":${JSON.stringify(fields.name ?? "web")},` +
    `"resource":"pipeline","metadata":{"version":"1"},"spec":${fields.spec ?? "{}"}}`;
  return `{"event":"create","id":${JSON.stringify(fields.id ?? crypto.randomUUID())},` +
    `"run_id":"${fields.runId ?? crypto.randomUUID()}","payload":${JSON.stringify(resource)}}`;
}

describe("deterministic failures end within maxAttempts", () => {
  it("reports data larger than the server's max_payload as a failure, reconciling once", async () => {
    await using env = await conveyorEnv();
    let calls = 0;
    await using _d = await startDriver({
      name: "huge",
      resources: ["pipeline"],
      reconcile() {
        calls++;
        return { success: true, message: "deployed", data: { blob: "x".repeat(2 * 1024 * 1024) } };
      },
    }, { servers: env.url, ...quiet, maxAttempts: 2, retryDelay: 50 });
    const e = await publishEvent(env.nc, { resource: "pipeline", name: "web" });
    const [r] = await waitForResults(env, 1);
    await drained(env, "huge");
    assert.equal(calls, 1, "a deploy is not rerun because its result is too large");
    const { driverresult } = envelope(r);
    assert.equal(envelope(r).run_id, e.message.run_id);
    assert.equal(driverresult.success, false);
    assert.match(driverresult.message, /max_payload/);
    assert.equal(driverresult.data.error, "ResultTooLargeError");
    assert.ok(driverresult.data.bytes > 2 * 1024 * 1024);
    assert.equal((await consumerState(env.nc, "huge")).redelivered, 0);
  });

  it("stores a log line larger than max_payload truncated with a marker, and reports the result", async () => {
    await using env = await conveyorEnv();
    let calls = 0;
    await using _d = await startDriver({
      name: "verbose",
      resources: ["pipeline"],
      reconcile({ logger }) {
        calls++;
        logger.info("before");
        logger.info("é".repeat(1024 * 1024)); // 2 MiB of UTF-8
        logger.info("after");
        return { success: true, message: "ok" };
      },
    }, { servers: env.url, ...quiet, maxAttempts: 2, retryDelay: 50 });
    const e = await publishEvent(env.nc, { resource: "pipeline", name: "web" });
    const [r] = await waitForResults(env, 1);
    assert.equal(envelope(r).driverresult.success, true);
    assert.equal(calls, 1);
    const logs = await readStream(env.nc, "logs-engine", `logs.${e.message.run_id}`);
    const messages = logs.map((m) => (m.json as { message: string }).message);
    assert.equal(messages.length, 3);
    assert.equal(messages[0], "before");
    assert.equal(messages[2], "after");
    assert.match(messages[1], /^é+… \[truncated: 2097152 bytes do not fit/);
    const max = env.nc.info!.max_payload;
    assert.ok(new TextEncoder().encode(JSON.stringify(logs[1].json)).length < max);
  });

  it("terminates a message whose id has a newline, with a failure result, without reconciling", async () => {
    await using env = await conveyorEnv();
    const seen: string[] = [];
    await using _d = await startDriver({
      name: "ids",
      resources: ["pipeline"],
      reconcile({ message }) {
        seen.push(message.id);
      },
    }, { servers: env.url, ...quiet, maxAttempts: 2, retryDelay: 50 });
    const runId = crypto.randomUUID();
    const ack = await publishRaw(env, "pipeline", wire({ id: "evil\r\nInjected: yes", runId }));
    await publishRaw(env, "pipeline", wire({ id: "x".repeat(300) }));
    await publishEvent(env.nc, { resource: "pipeline", name: "good", id: "fine" });
    const stored = await waitForResults(env, 2);
    await drained(env, "ids");
    assert.deepEqual(seen, ["fine"]);
    const bad = stored.map(envelope).find((e) => e.run_id === runId)!;
    assert.equal(bad.driverresult.success, false);
    assert.match(bad.driverresult.message, /id: must not contain control characters/);
    const header = stored.find((m) => envelope(m).run_id === runId)!.headers["Nats-Msg-Id"];
    assert.equal(header, `driver.result.ids.${runId}.seq-${ack.seq}`);
    assert.equal((await consumerState(env.nc, "ids")).redelivered, 0);
  });

  it("gives a message for any thrown value, even one whose String() throws", async () => {
    await using env = await conveyorEnv();
    let calls = 0;
    await using _d = await startDriver({
      name: "hostile",
      resources: ["pipeline"],
      reconcile() {
        calls++;
        throw Object.create(null);
      },
    }, { servers: env.url, ...quiet, maxAttempts: 2, retryDelay: 50 });
    await publishEvent(env.nc, { resource: "pipeline", name: "web" });
    const [r] = await waitForResults(env, 1);
    await drained(env, "hostile");
    assert.equal(calls, 2);
    const { driverresult } = envelope(r);
    assert.equal(driverresult.success, false);
    assert.match(driverresult.message, /^non-Error thrown: /);
    assert.deepEqual(driverresult.data, { error: "object", attempts: 2 });
  });

  it("echoes a spec nested 8,000 deep (beyond Node's JSON.stringify) in its result", async () => {
    await using env = await conveyorEnv();
    const depth = 8_000;
    const spec = '{"a":'.repeat(depth) + "1" + "}".repeat(depth);
    let calls = 0;
    await using _d = await startDriver({
      name: "deep",
      resources: ["pipeline"],
      reconcile({ resource }) {
        calls++;
        let v = resource.spec as Record<string, unknown>;
        let n = 0;
        while (typeof v === "object") {
          v = v.a as Record<string, unknown>;
          n++;
        }
        return { success: true, message: `depth ${n}` };
      },
    }, { servers: env.url, ...quiet, maxAttempts: 2, retryDelay: 50 });
    const runId = crypto.randomUUID();
    await publishRaw(env, "pipeline", wire({ runId, spec }));
    const [r] = await waitForResults(env, 1);
    assert.equal(calls, 1);
    assert.equal(envelope(r).driverresult.message, `depth ${depth}`);
    // The resource is echoed exactly as received.
    const text = new TextDecoder().decode(
      (await (await jetstreamManager(env.nc)).streams.getMessage("pipeline-engine", {
        seq: r.seq,
      }))!.data,
    );
    assert.ok(text.includes(`"spec":${spec}`));
  });

  it("counts every hand-back: after maxAttempts deliveries it reports before reconciling again", async () => {
    await using env = await conveyorEnv();
    const attempts: number[] = [];
    const hanging: Driver = {
      name: "handed",
      resources: ["pipeline"],
      reconcile({ attempt, signal }) {
        attempts.push(attempt);
        // Ends only when the shutdown aborts it: the event is handed back.
        return new Promise((_, reject) =>
          signal.addEventListener("abort", () => reject(signal.reason))
        );
      },
    };
    const opts = { servers: env.url, ...quiet, maxAttempts: 2, shutdownTimeout: 100 };
    const e = await (async () => {
      const first = await startDriver(hanging, opts);
      const e = await publishEvent(env.nc, { resource: "pipeline", name: "web" });
      await waitFor(() => attempts.length === 1, "first attempt");
      await first.stop();
      return e;
    })();
    const second = await startDriver(hanging, opts);
    await waitFor(() => attempts.length === 2, "second attempt");
    await second.stop();
    assert.equal((await results(env)).length, 0, "a hand-back reports nothing");

    await using _third = await startDriver(hanging, opts);
    const [r] = await waitForResults(env, 1);
    assert.deepEqual(attempts, [1, 2], "reconcile does not run a third time");
    assert.equal(envelope(r).run_id, e.message.run_id);
    assert.equal(envelope(r).driverresult.data.error, "AttemptsExhaustedError");
    assert.match(envelope(r).driverresult.message, /gave up after 2 deliveries/);
    await drained(env, "handed");
  });

  it("sets the consumer's max_deliver a few above maxAttempts as a server-side backstop", async () => {
    await using env = await conveyorEnv();
    await using _d = await startDriver({
      name: "backstop",
      resources: ["pipeline"],
      reconcile() {},
    }, {
      servers: env.url,
      ...quiet,
      maxAttempts: 4,
    });
    assert.equal((await consumerState(env.nc, "backstop")).config.max_deliver, 7);
  });
});

describe("hung work", () => {
  it("keeps a reconcile that ignores ctx.signal in its slot: concurrency bounds the code running", async () => {
    await using env = await conveyorEnv();
    let running = 0;
    let peak = 0;
    const runs: { id: string; attempt: number }[] = [];
    const d = await startDriver({
      name: "stubborn",
      resources: ["pipeline"],
      async reconcile({ message, attempt }) {
        runs.push({ id: message.id, attempt });
        running++;
        peak = Math.max(peak, running);
        await sleep(1_500); // ignores ctx.signal
        running--;
        return { success: true, message: "late" };
      },
    }, {
      servers: env.url,
      ...quiet,
      concurrency: 1,
      reconcileTimeout: 200,
      maxAttempts: 2,
      retryDelay: 50,
    });
    for (let i = 0; i < 3; i++) await publishEvent(env.nc, { resource: "pipeline", name: `r${i}` });
    await waitFor(() => d.stats().hung === 1, "a hung reconcile in stats()");
    assert.equal(d.stats().inFlight, 1);
    const stored = await waitForResults(env, 3, 30_000);
    await d.stop();
    assert.equal(peak, 1, "never two reconciles at once with concurrency 1");
    assert.ok(stored.every((m) => envelope(m).driverresult.success === false));
    assert.ok(
      stored.every((m) => /did not finish within 200 ms/.test(envelope(m).driverresult.message)),
    );
    assert.equal(runs.length, 6, "each event: 2 attempts, one after the other");
    // stop() does not wait for code that ignores its signal; it ends by itself.
    await waitFor(() => d.stats().inFlight === 0, "the last hung reconcile to return");
    assert.equal(d.stats().hung, 0);
  });

  it("does not store lines logged after reconcile returned, and warns", async () => {
    await using env = await conveyorEnv();
    const records: LogRecord[] = [];
    await configure({
      sinks: { mem: (r: LogRecord) => records.push(r) },
      loggers: [
        { category: ["conveyor"], lowestLevel: "warning", sinks: ["mem"] },
        { category: ["logtape", "meta"], lowestLevel: "warning", sinks: [] },
      ],
      reset: true,
    });
    try {
      let afterwards!: () => void;
      await using _d = await startDriver({
        name: "late",
        resources: ["pipeline"],
        reconcile({ logger }) {
          logger.info("during");
          afterwards = () => logger.info("after the result");
          return { success: true, message: "ok" };
        },
      }, { servers: env.url, handleSignals: false });
      const e = await publishEvent(env.nc, { resource: "pipeline", name: "web" });
      await waitForResults(env, 1);
      afterwards();
      await sleep(300);
      const logs = await readStream(env.nc, "logs-engine", `logs.${e.message.run_id}`);
      assert.deepEqual(logs.map((m) => (m.json as { message: string }).message), ["during"]);
      const warning = records.find((r) =>
        r.rawMessage.toString().includes("after reconcile returned")
      );
      assert.ok(warning, "the runtime warns about the dropped line");
      assert.equal(warning.properties.runId, e.message.run_id);
    } finally {
      await reset();
    }
  });

  it("hands back, rather than runs beside it, a redelivery of an event whose hung reconcile still runs", async () => {
    await using env = await conveyorEnv();
    let running = 0;
    let peak = 0;
    const attempts: number[] = [];
    await using d = await startDriver({
      name: "overlap",
      resources: ["pipeline"],
      async reconcile({ attempt }) {
        attempts.push(attempt);
        running++;
        peak = Math.max(peak, running);
        if (attempt === 1) await sleep(1_500); // ignores ctx.signal
        running--;
        return { success: true, message: `attempt ${attempt}` };
      },
    }, {
      servers: env.url,
      ...quiet,
      concurrency: 4,
      reconcileTimeout: 100,
      maxAttempts: 20,
      retryDelay: 50,
      retryMaxDelay: 100,
    });
    await publishEvent(env.nc, { resource: "pipeline", name: "web" });
    const [r] = await waitForResults(env, 1);
    assert.equal(peak, 1, "two attempts of the same event never ran at once");
    assert.ok(d.stats().requeued >= 1, "redeliveries were handed back while attempt 1 ran");
    assert.ok(attempts.length === 2 && attempts[1] > 2, `attempts run: ${attempts}`);
    assert.equal(envelope(r).driverresult.message, `attempt ${attempts[1]}`);
  });
});

describe("storing logs and results", () => {
  it("hands the event back after settleTimeout when its logs cannot be stored, then reports it", async () => {
    await using env = await conveyorEnv();
    const logStore = await blockLogStore(env);
    const attempts: number[] = [];
    await using d = await startDriver({
      name: "unstored",
      resources: ["pipeline"],
      reconcile({ attempt, logger }) {
        attempts.push(attempt);
        logger.info(`attempt ${attempt}`);
        return { success: true, message: "ok" };
      },
    }, { servers: env.url, ...quiet, settleTimeout: 1_000, retryDelay: 200, maxAttempts: 10 });
    await publishEvent(env.nc, { resource: "pipeline", name: "web" });
    await waitFor(() => d.stats().requeued >= 1, "the event handed back", 10_000);
    assert.equal((await results(env)).length, 0, "no result without its logs");
    // The log store comes back: the next attempt is stored and reported.
    await logStore.restore();
    const [r] = await waitForResults(env, 1);
    assert.equal(envelope(r).driverresult.success, true);
    const last = attempts[attempts.length - 1];
    assert.ok(last >= 2);
    const logs = await readStream(env.nc, "logs-engine");
    assert.ok(logs.some((m) => (m.json as { message: string }).message === `attempt ${last}`));
  });
});

describe("flow: pulling ahead and settling beside the next reconcile", () => {
  it("pulls ahead only after short reconciles, and keeps what it pulled alive past ack_wait behind a long one", async () => {
    await using env = await conveyorEnv();
    const attempts: number[] = [];
    let slowRunning = false;
    await using _d = await startDriver({
      name: "ahead",
      resources: ["pipeline"],
      async reconcile({ resource, attempt }) {
        attempts.push(attempt);
        if (resource.name === "slow") {
          slowRunning = true;
          await sleep(3_300);
          slowRunning = false;
        }
        return { success: true, message: "ok" };
      },
    }, { servers: env.url, ...quiet, concurrency: 1, ackWait: 1_000 });
    for (let i = 0; i < 20; i++) {
      await publishEvent(env.nc, { resource: "pipeline", name: `f${i}` });
    }
    await waitForResults(env, 20);
    await publishEvent(env.nc, { resource: "pipeline", name: "slow" });
    for (let i = 0; i < 20; i++) {
      await publishEvent(env.nc, { resource: "pipeline", name: `g${i}` });
    }
    await waitFor(() => slowRunning, "the slow reconcile running");
    await sleep(300);
    const during = await consumerState(env.nc, "ahead");
    // The slow event and up to 16 queued behind it (how many depends on the
    // pulls open when the events came); the rest wait in the stream.
    assert.ok(during.ackPending > 1, `${during.ackPending} delivered: some pulled ahead`);
    assert.ok(during.ackPending <= 1 + MIN_PREFETCH_CAP, `${during.ackPending} delivered`);
    assert.equal(during.pending + during.ackPending, 21);
    // The queued events wait 3.3 s, three times ack_wait: +WPI keeps them here.
    await waitForResults(env, 41);
    await drained(env, "ahead");
    const after = await consumerState(env.nc, "ahead");
    assert.equal(after.redelivered, 0);
    assert.equal(after.delivered, 41);
    assert.equal(attempts.length, 41);
    assert.ok(attempts.every((a) => a === 1));
  });

  it("stops pulling ahead once reconciles turn long: no more delivered than its slots", async () => {
    await using env = await conveyorEnv();
    let running = 0;
    let longDone = 0;
    await using _d = await startDriver({
      name: "turns-long",
      resources: ["pipeline"],
      async reconcile({ resource }) {
        if (!resource.name.startsWith("long")) return;
        running++;
        await sleep(600);
        running--;
        longDone++;
      },
    }, { servers: env.url, ...quiet, concurrency: 2 });
    for (let i = 0; i < 20; i++) {
      await publishEvent(env.nc, { resource: "pipeline", name: `f${i}` });
    }
    await waitForResults(env, 20);
    for (let i = 0; i < 30; i++) {
      await publishEvent(env.nc, { resource: "pipeline", name: `long${i}` });
    }
    // What was pulled while reconciles were short runs first; then the
    // average of 600 ms leaves nothing to pull ahead at concurrency 2.
    await waitFor(() => longDone >= 20, "20 long ones done", 20_000);
    const delivered: number[] = [];
    for (let i = 0; i < 5; i++) {
      delivered.push((await consumerState(env.nc, "turns-long")).ackPending);
      await sleep(150);
    }
    // Two running, and at most two storing their results (a moment each):
    // pulling ahead would show up to 16 more.
    assert.ok(delivered.every((n) => n <= 4), `delivered: ${delivered.join(", ")}`);
    assert.ok(running <= 2);
    await waitForResults(env, 50);
  });

  it("gives a ctx.signal read only after the timeout already aborted, with the timeout as reason", async () => {
    await using env = await conveyorEnv();
    const seen: { aborted: boolean; reason: unknown }[] = [];
    await using _d = await startDriver({
      name: "late-signal",
      resources: ["pipeline"],
      async reconcile(ctx) {
        await sleep(400);
        seen.push({ aborted: ctx.signal.aborted, reason: ctx.signal.reason });
      },
    }, { servers: env.url, ...quiet, reconcileTimeout: 150, maxAttempts: 1 });
    await publishEvent(env.nc, { resource: "pipeline", name: "web" });
    await waitForResults(env, 1);
    assert.equal(seen.length, 1);
    assert.equal(seen[0].aborted, true);
    assert.ok(seen[0].reason instanceof ReconcileTimeoutError);
  });

  it("stops starting reconciles while too many events wait to store their logs, and loses none", async () => {
    await using env = await conveyorEnv();
    const logStore = await blockLogStore(env);
    let reconciles = 0;
    await using d = await startDriver({
      name: "backpressure",
      resources: ["pipeline"],
      reconcile({ logger }) {
        reconciles++;
        logger.info("line");
        return { success: true, message: "ok" };
      },
    }, { servers: env.url, ...quiet, concurrency: 1, settleTimeout: 60_000, maxAttempts: 10 });
    await publishMany(env.nc, 100, "r");
    await waitFor(() => reconciles >= MIN_SETTLING, "reconciles started");
    await sleep(1_000);
    // Concurrency 1 and at most max(2 * concurrency, 64) events settling: 1 + 64.
    assert.ok(reconciles <= MIN_SETTLING + 1, `${reconciles} reconciles while nothing is stored`);
    assert.equal(d.stats().requeued, 0);
    await logStore.restore();
    const stored = await waitForResults(env, 100);
    assert.equal(new Set(stored.map((m) => envelope(m).resource.name)).size, 100);
    await drained(env, "backpressure");
  });
});
