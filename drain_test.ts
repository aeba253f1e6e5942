// The serverless batch mode: a bounded invocation with the runtime's
// guarantees, against a real nats-server. Nothing is lost or run twice
// across invocations, however they end.
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { ConfigError, defineDriver, drain, startDriver } from "./mod.ts";
import { readStream, type TestConveyor } from "./testing.ts";
import { transportConveyor } from "./test_util.ts";

const quiet = { configureLogging: false } as const;

function counter(name: string, ms = 0) {
  const runs = new Map<string, number>();
  const driver = defineDriver({
    name,
    resources: ["app"],
    async reconcile({ resource, signal }) {
      runs.set(resource.name, (runs.get(resource.name) ?? 0) + 1);
      if (ms) {
        await new Promise((r, j) => {
          const t = setTimeout(r, ms);
          signal.addEventListener("abort", () => (clearTimeout(t), j(signal.reason)));
        });
      }
      return { success: true, message: `done ${resource.name}` };
    },
  });
  return { driver, runs };
}

/** Creates the driver's consumer (an Interest stream keeps events only for existing ones). */
async function bind(conveyor: TestConveyor, driver: Parameters<typeof startDriver>[0]) {
  const running = await startDriver(driver, {
    servers: conveyor.url,
    handleSignals: false,
    ...quiet,
  });
  await running.stop();
}

async function emitMany(conveyor: TestConveyor, n: number): Promise<void> {
  for (let i = 0; i < n; i++) await conveyor.emit({ resource: "app", name: `r${i}` });
}

async function resultNames(conveyor: TestConveyor): Promise<string[]> {
  const stored = await readStream(conveyor.url, "pipeline-engine", "pipelines.driver.result");
  return stored.map((m) => (m.json as { resource: { name: string } }).resource.name).sort();
}

const names = (n: number) => Array.from({ length: n }, (_, i) => `r${i}`).sort();

describe("drain", () => {
  it("takes what is there, reports it, and ends when idle", async () => {
    await using conveyor = await transportConveyor();
    const { driver, runs } = counter("batch");
    await bind(conveyor, driver);
    await emitMany(conveyor, 10);
    const summary = await drain(driver, { servers: conveyor.url, idle: 300, ...quiet });
    assert.equal(summary.end, "idle");
    assert.equal(summary.succeeded, 10);
    assert.deepEqual(await resultNames(conveyor), names(10));
    assert.ok([...runs.values()].every((n) => n === 1));
  });

  it("stops at maxMessages and leaves the rest for the next invocation", async () => {
    await using conveyor = await transportConveyor();
    const { driver, runs } = counter("capped", 20);
    await bind(conveyor, driver);
    await emitMany(conveyor, 10);
    const first = await drain(driver, {
      servers: conveyor.url,
      maxMessages: 3,
      idle: 300,
      ...quiet,
    });
    assert.equal(first.end, "maxMessages");
    assert.ok(first.succeeded >= 3 && first.succeeded < 10, `first took ${first.succeeded}`);
    const second = await drain(driver, { servers: conveyor.url, idle: 300, ...quiet });
    assert.equal(first.succeeded + second.succeeded, 10);
    assert.deepEqual(await resultNames(conveyor), names(10));
    assert.ok([...runs.values()].every((n) => n === 1), "none reconciled twice");
  });

  it("cut short by maxWait: loses nothing, hands the rest back", async () => {
    await using conveyor = await transportConveyor();
    const { driver, runs } = counter("slow", 200);
    await bind(conveyor, driver);
    await emitMany(conveyor, 10);
    const first = await drain(driver, {
      servers: conveyor.url,
      concurrency: 2,
      maxWait: 300,
      ...quiet,
    });
    assert.equal(first.end, "maxWait");
    assert.ok(first.succeeded < 10, `first took ${first.succeeded}`);
    const second = await drain(driver, { servers: conveyor.url, idle: 500, ...quiet });
    assert.deepEqual(await resultNames(conveyor), names(10), "every event has its result");
    assert.equal(first.succeeded + second.succeeded, 10);
    assert.ok([...runs.values()].every((n) => n === 1), "none reconciled twice");
  });

  it("two overlapping invocations share the events: each once", async () => {
    await using conveyor = await transportConveyor();
    const { driver, runs } = counter("shared", 10);
    await bind(conveyor, driver);
    await emitMany(conveyor, 20);
    const [a, b] = await Promise.all([
      drain(driver, { servers: conveyor.url, idle: 400, ...quiet }),
      drain(driver, { servers: conveyor.url, idle: 400, ...quiet }),
    ]);
    assert.equal(a.succeeded + b.succeeded, 20);
    assert.deepEqual(await resultNames(conveyor), names(20));
    assert.ok([...runs.values()].every((n) => n === 1));
  });

  it("refuses unbounded or invalid batch bounds", async () => {
    const { driver } = counter("bounds");
    for (
      const o of [{ maxMessages: 0 }, { maxMessages: 1e9 }, { maxWait: Infinity }, { idle: -1 }]
    ) {
      await assert.rejects(drain(driver, { servers: "nats://127.0.0.1:1", ...o }), ConfigError);
    }
  });
});
