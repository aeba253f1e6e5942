// The testing kit and typed specs, as a driver author uses them: without NATS
// (reconcileOnce) and against a real nats-server (startTestConveyor).
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import * as v from "valibot";
import {
  defineDriver,
  type Driver,
  InvalidSpecError,
  PermanentError,
  ReconcileTimeoutError,
  type SpecSchema,
  startDriver,
} from "./mod.ts";
import { spawnSync } from "node:child_process";
import { readdirSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import {
  fetchNatsServer,
  findNatsServer,
  type ReconcileDecision,
  reconcileOnce,
  startNatsServer,
  startTestConveyor,
  type TestConveyor,
} from "./testing.ts";

const quiet = { handleSignals: false, configureLogging: false } as const;

const Build = v.object({
  image: v.pipe(v.string(), v.minLength(1)),
  replicas: v.optional(v.pipe(v.number(), v.integer(), v.minValue(1)), 1),
  env: v.optional(v.record(v.string(), v.string()), {}),
});

/** A driver with a typed spec: the compiler checks the uses of resource.spec. */
const builder = defineDriver({
  name: "builder",
  resources: ["app"],
  spec: Build,
  reconcile({ resource, logger }) {
    const { image, replicas } = resource.spec; // typed, no guard
    const upper: string = image.toUpperCase();
    const twice: number = replicas * 2;
    logger.with({ image }).info(`building ${upper}`, { twice });
    return { success: true, message: `built ${image} x${replicas}`, data: resource.spec };
  },
});

describe("typed specs", () => {
  it("gives reconcile the schema's output, defaults applied", async () => {
    const { result, decision, logs } = await reconcileOnce(builder, {
      name: "web",
      spec: { image: "node:22" },
    });
    assert.deepEqual(decision, { action: "ack" });
    assert.deepEqual(result, {
      success: true,
      message: "built node:22 x1",
      data: { image: "node:22", replicas: 1, env: {} },
    });
    assert.deepEqual(logs, [{
      level: "info",
      message: "building NODE:22",
      labels: { image: "node:22", twice: 2 },
    }]);
  });

  it("fails a spec that does not fit at once, naming every problem, without calling reconcile", async () => {
    let called = 0;
    const strict = defineDriver({ ...builder, reconcile: () => void called++ });
    const { result, decision } = await reconcileOnce(strict, {
      name: "web",
      spec: { image: "", replicas: 0.5, env: { A: 1 } },
    });
    assert.equal(called, 0);
    assert.equal(decision.action, "terminate");
    const error = (decision as Extract<ReconcileDecision, { action: "terminate" }>).error;
    assert.ok(error instanceof InvalidSpecError && error instanceof PermanentError);
    assert.deepEqual(error.issues.map((i) => i.path), ["image", "replicas", "replicas", "env.A"]);
    assert.equal(result?.success, false);
    assert.match(result!.message, /^resource spec does not fit the driver's schema: image: /);
    assert.match(result!.message, /replicas: .*; env\.A: /);
    assert.deepEqual(result!.data, { error: "InvalidSpecError", attempts: 1 });
  });

  it("bounds what a hostile spec can put in the failure", async () => {
    const spec = {
      image: "x",
      env: Object.fromEntries(Array.from({ length: 5_000 }, (_, i) => [`K${i}`, i])),
    };
    const { result } = await reconcileOnce(builder, { name: "web", spec });
    const err = new InvalidSpecError(
      Array.from({ length: 5_000 }, () => ({ path: "a", message: "x".repeat(10_000) })),
    );
    assert.equal(err.issues.length, 20);
    assert.ok(err.message.length < 20 * 310 + 200, `${err.message.length} characters`);
    assert.match(result!.message, /\(and 4980 more\)$/);
  });

  it("takes any Standard Schema, async ones too", async () => {
    const even: SpecSchema<number> = {
      "~standard": {
        validate: (value: unknown) =>
          Promise.resolve(
            typeof value === "number" && value % 2 === 0
              ? { value: value / 2 }
              : { issues: [{ message: "not an even number", path: [{ key: "n" }] }] },
          ),
      },
    };
    const half = defineDriver({
      name: "half",
      resources: ["num"],
      spec: even,
      reconcile: ({ resource }) => ({ success: true, message: `${resource.spec + 0}` }),
    });
    assert.equal((await reconcileOnce(half, { name: "n", spec: 8 })).result?.message, "4");
    const bad = await reconcileOnce(half, { name: "n", spec: 3 });
    assert.equal(
      bad.result?.message,
      "resource spec does not fit the driver's schema: n: not an even number",
    );
  });

  it("leaves drivers without a schema as they were: spec is unknown", async () => {
    const plain: Driver = {
      name: "plain",
      resources: ["app"],
      reconcile: ({ resource }) => ({ success: true, message: JSON.stringify(resource.spec) }),
    };
    assert.equal(
      (await reconcileOnce(plain, { name: "x", spec: { a: [1] } })).result?.message,
      '{"a":[1]}',
    );
  });

  it("refuses a spec that is not a schema when the driver starts", async () => {
    await assert.rejects(
      // deno-lint-ignore no-explicit-any
      startDriver({ ...builder, spec: { parse() {} } as any }, {
        ...quiet,
        servers: "nats://127.0.0.1:1",
      }),
      /spec must be a valibot schema or another Standard Schema/,
    );
  });
});

describe("reconcileOnce applies the runtime's rules", () => {
  const flaky = defineDriver({
    name: "flaky",
    resources: ["app"],
    events: ["create", "update"],
    reconcile({ attempt }) {
      throw new Error(`attempt ${attempt} failed`);
    },
  });

  it("retries a throw, then reports the failure on the last attempt", async () => {
    const first = await reconcileOnce(flaky, { name: "web" }, { maxAttempts: 3 });
    assert.equal(first.result, undefined);
    assert.equal(first.decision.action, "retry");
    const last = await reconcileOnce(flaky, { name: "web" }, { attempt: 3, maxAttempts: 3 });
    assert.equal(last.decision.action, "terminate");
    assert.deepEqual(last.result, {
      success: false,
      message: "attempt 3 failed",
      data: { error: "Error", attempts: 3 },
    });
  });

  it("skips an event the driver does not handle, without calling reconcile", async () => {
    const { decision, result } = await reconcileOnce(flaky, { name: "web" }, { event: "delete" });
    assert.equal(decision.action, "skip");
    assert.equal(result, undefined);
  });

  it("turns an invalid result into a failure, as the runtime reports it", async () => {
    const sloppy = defineDriver({
      name: "sloppy",
      resources: ["app"],
      // deno-lint-ignore no-explicit-any
      reconcile: () => ({ success: "yes" }) as any,
    });
    const { result, decision } = await reconcileOnce(sloppy, { name: "web" });
    assert.equal(decision.action, "terminate");
    assert.match(result!.message, /reconcile returned an invalid DriverResult/);
  });

  it("aborts ctx.signal on reconcileTimeout and on the caller's signal", async () => {
    const patient = defineDriver({
      name: "patient",
      resources: ["app"],
      reconcile: ({ signal }) =>
        new Promise((_, reject) => signal.addEventListener("abort", () => reject(signal.reason))),
    });
    const timedOut = await reconcileOnce(patient, { name: "web" }, {
      reconcileTimeout: 20,
      maxAttempts: 1,
    });
    assert.equal(timedOut.decision.action, "terminate");
    assert.ok(
      (timedOut.decision as { error?: unknown }).error instanceof ReconcileTimeoutError,
    );
    const ac = new AbortController();
    const pending = reconcileOnce(patient, { name: "web" }, { signal: ac.signal });
    ac.abort(new Error("shutting down"));
    const stopped = await pending;
    assert.equal(stopped.decision.action, "handBack");
    assert.equal(stopped.result, undefined);
  });
});

describe("startTestConveyor", () => {
  let conveyor: TestConveyor;
  before(async () => {
    conveyor = await startTestConveyor();
  });
  after(() => conveyor?.stop());

  it("runs a typed driver end to end: emit, typed logs and results", async () => {
    await using _d = await startDriver(builder, { ...quiet, servers: conveyor.url });
    const { message } = await conveyor.emit({
      resource: "app",
      name: "web",
      spec: { image: "node:22", replicas: 2 },
    });
    const result = await conveyor.waitForResult(message.run_id);
    assert.equal(result.driverresult.success, true);
    assert.equal(result.driverresult.message, "built node:22 x2");
    assert.equal(result.driverresult.driver, "builder");
    const lines = [];
    for await (const line of conveyor.logs(message.run_id)) {
      lines.push(line);
      break;
    }
    assert.equal(lines[0].message, "building NODE:22");
    assert.equal(lines[0].driver, "builder");

    // A bad spec: a failure naming the problem, reported once.
    const bad = await conveyor.emit({ resource: "app", name: "bad", spec: { replicas: 2 } });
    const failed = await conveyor.waitForResult(bad.message.run_id);
    assert.equal(failed.driverresult.success, false);
    assert.match(failed.driverresult.message, /image: /);
  });

  it("addresses an event to one driver as the pipeline engine does", async () => {
    const seen: string[] = [];
    const step = defineDriver({
      name: "step",
      resources: ["app"],
      reconcile: ({ event }) => {
        seen.push(event);
      },
    });
    await using _d = await startDriver(step, { ...quiet, servers: conveyor.url });
    const e = await conveyor.emit({ resource: "app", name: "p" }, {
      event: "process",
      driver: "step",
    });
    assert.equal(e.subject, "drivers.step.resources.app");
    await conveyor.waitForResult(e.message.run_id);
    assert.ok(seen.includes("process"));
  });

  it("results() follows every result in order; waitForResult times out with a clear error", async () => {
    const iterator = conveyor.results()[Symbol.asyncIterator]();
    const first = await iterator.next();
    assert.equal(first.done, false);
    assert.equal(first.value!.event, "driver.result");
    await iterator.return?.();
    await assert.rejects(
      conveyor.waitForResult(crypto.randomUUID(), { timeout: 100 }),
      /no result of run .* within 100 ms/,
    );
  });
});

describe("finding and fetching nats-server", () => {
  it("fetches a nats-server >= 2.10 from Debian's archive into the cache directory given", async (t) => {
    const hasApt = spawnSync("sh", ["-c", "command -v apt-get && command -v dpkg"]).status === 0;
    if (!hasApt) {
      t.skip("no apt-get and dpkg here (not Debian or Ubuntu): nothing to fetch with");
      return;
    }
    // The network fetch is checked once, on Deno; Bun and Node run the same code.
    if (!("Deno" in globalThis)) {
      t.skip("the archive is fetched from on Deno only, to spare the network");
      return;
    }
    const cacheDir = await mkdtemp(join(tmpdir(), "conveyor-fetch-"));
    try {
      const binary = fetchNatsServer({ cacheDir });
      assert.equal(binary, join(cacheDir, "nats-server", "usr", "sbin", "nats-server"));
      const version = spawnSync(binary, ["--version"], { encoding: "utf8" }).stdout;
      const [, major, minor] = /v(\d+)\.(\d+)/.exec(version)!.map(Number);
      assert.ok(major > 2 || minor >= 10, version);
      assert.deepEqual(readdirSync(cacheDir), ["nats-server"], "the apt work directory is gone");
      // A second call finds it without fetching.
      const started = Date.now();
      assert.equal(fetchNatsServer({ cacheDir }), binary);
      assert.ok(Date.now() - started < 5_000);
      // And the kit runs on it.
      await using server = await startNatsServer({ binary });
      assert.match(server.url, /^nats:\/\/127\.0\.0\.1:\d+$/);
    } finally {
      await rm(cacheDir, { recursive: true, force: true });
    }
  });

  it("uses NATS_SERVER_BIN first", () => {
    const saved = process.env.NATS_SERVER_BIN;
    process.env.NATS_SERVER_BIN = "/opt/nats/nats-server";
    try {
      assert.equal(findNatsServer(), "/opt/nats/nats-server");
    } finally {
      if (saved === undefined) delete process.env.NATS_SERVER_BIN;
      else process.env.NATS_SERVER_BIN = saved;
    }
  });
});
