import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { configure, getConfig, type LogRecord, reset } from "@logtape/logtape";
import { jetstream } from "@nats-io/jetstream";
import { createRunLog, ensureLogging } from "./logger.ts";
import { startDriver } from "./mod.ts";
import { publishEvent, readStream } from "./testing.ts";
import { conveyorEnv, sddValidators, waitFor } from "./test_util.ts";

describe("DriverLogger", () => {
  it("publishes each line as an SDD Log Entry to logs.{runid} and live.logs.{runid}.{driver}, in order", async () => {
    await using env = await conveyorEnv();
    const sdd = sddValidators();
    const runId = crypto.randomUUID();
    const live: { subject: string; json: unknown; level?: string }[] = [];
    const sub = env.nc.subscribe(`live.logs.${runId}.*`, {
      callback: (_err, m) => {
        live.push({
          subject: m.subject,
          json: m.json(),
          level: m.headers?.get("Conveyor-Log-Level"),
        });
      },
    });
    const run = createRunLog({
      nc: env.nc,
      js: jetstream(env.nc),
      driver: "builder",
      runId,
      pipeline: "ci",
    });
    const lines = Array.from({ length: 50 }, (_, i) => `line ${i}`);
    for (const [i, l] of lines.entries()) {
      if (i % 4 === 0) run.logger.warn(l);
      else run.logger.info(l);
    }
    await run.flush();
    await waitFor(() => live.length === 50, "50 live lines");
    sub.unsubscribe();

    const stored = await readStream(env.nc, "logs-engine");
    assert.deepEqual(stored.map((m) => (m.json as { message: string }).message), lines);
    for (const m of stored) {
      assert.equal(m.subject, `logs.${runId}`);
      assert.equal(sdd.log(m.json), undefined, "valid against the SDD Log schema");
      const entry = m.json as Record<string, string>;
      assert.equal(entry.runid, runId);
      assert.equal(entry.driver, "builder");
      assert.equal(entry.pipeline, "ci");
      assert.ok(!Number.isNaN(Date.parse(entry.timestamp)));
    }
    assert.deepEqual(live.map((l) => (l.json as { message: string }).message), lines);
    assert.ok(live.every((l) => l.subject === `live.logs.${runId}.builder`));
    assert.equal(live[0].level, "warning");
    assert.equal(live[1].level, "info");
    assert.equal(run.count, 50);
  });

  it("carries labels in NATS headers and LogTape properties, never in the Log Entry", async () => {
    await using env = await conveyorEnv();
    const records: LogRecord[] = [];
    await configure({
      sinks: { mem: (r: LogRecord) => records.push(r) },
      loggers: [
        { category: ["conveyor", "driver", "labels"], lowestLevel: "debug", sinks: ["mem"] },
        { category: ["logtape", "meta"], lowestLevel: "warning", sinks: [] },
      ],
      reset: true,
    });
    try {
      const runId = crypto.randomUUID();
      const run = createRunLog({ nc: env.nc, js: jetstream(env.nc), driver: "labels", runId });
      run.logger.with({ step: "compile" }).error("cache miss", { attempt: 2, "odd key!": true });
      await run.flush();
      const [m] = await readStream(env.nc, "logs-engine");
      assert.deepEqual(Object.keys(m.json as object).sort(), [
        "driver",
        "message",
        "runid",
        "timestamp",
      ]);
      assert.equal(m.headers["Conveyor-Label-step"], "compile");
      assert.equal(m.headers["Conveyor-Label-attempt"], "2");
      assert.equal(m.headers["Conveyor-Label-odd_key_"], "true");
      assert.equal(m.headers["Conveyor-Log-Level"], "error");
      const rec = records.find((r) => r.category.join(".") === "conveyor.driver.labels")!;
      assert.equal(rec.level, "error");
      assert.equal(rec.message.join(""), "cache miss");
      assert.equal(rec.properties.message, "cache miss");
      assert.equal(rec.properties.step, "compile");
      assert.equal(rec.properties.attempt, 2);
      assert.equal(rec.properties.runId, runId);
    } finally {
      await reset();
    }
  });

  it("stores every line of a run before the run's result is published", async () => {
    await using env = await conveyorEnv();
    await using _d = await startDriver({
      name: "chatty",
      resources: ["pipeline"],
      reconcile({ logger }) {
        for (let i = 0; i < 200; i++) logger.info(`step ${i}`);
        return { success: true, message: "ok" };
      },
    }, { servers: env.url, handleSignals: false, configureLogging: false });
    const e = await publishEvent(env.nc, { resource: "pipeline", name: "web" });
    // Watch the result subject live, and count stored logs the moment it shows.
    const counts = await new Promise<number>((resolve) => {
      const sub = env.nc.subscribe("pipelines.driver.result", {
        callback: () => {
          sub.unsubscribe();
          readStream(env.nc, "logs-engine", `logs.${e.message.run_id}`)
            .then((logs) => resolve(logs.length));
        },
      });
    });
    assert.equal(counts, 200);
  });

  it("flush() rejects with a PublishError when lines cannot be stored", async () => {
    await using env = await conveyorEnv();
    const { jetstreamManager } = await import("@nats-io/jetstream");
    await (await jetstreamManager(env.nc)).streams.delete("logs-engine");
    const run = createRunLog({
      nc: env.nc,
      js: jetstream(env.nc, { timeout: 200 }),
      driver: "lost",
      runId: crypto.randomUUID(),
      attempts: 2,
    });
    run.logger.info("nowhere to go");
    await assert.rejects(
      run.flush(),
      (err: Error) =>
        err.name === "PublishError" && /logs\./.test(err.message) && err.cause !== undefined,
    );
  });

  it("escapes CR and LF in label values instead of throwing and losing the line", async () => {
    await using env = await conveyorEnv();
    const runId = crypto.randomUUID();
    const run = createRunLog({ nc: env.nc, js: jetstream(env.nc), driver: "crlf", runId });
    assert.doesNotThrow(() =>
      run.logger.info("kept", { branch: "main\r\nX-Injected: yes", tab: "a\tb" })
    );
    await run.flush();
    const [m] = await readStream(env.nc, "logs-engine");
    assert.equal((m.json as { message: string }).message, "kept");
    assert.equal(m.headers["Conveyor-Label-branch"], "main\\r\\nX-Injected: yes");
    assert.equal(m.headers["Conveyor-Label-tab"], "a\tb");
    assert.equal(m.headers["X-Injected"], undefined);
  });

  it("sets up the default sink once for drivers starting together", async () => {
    await reset();
    try {
      const o = { configureLogging: true, logLevel: "warning" } as const;
      // LogTape refuses a configure() while another is under way.
      await Promise.all([ensureLogging(o), ensureLogging(o), ensureLogging(o)]);
      assert.deepEqual(Object.keys(getConfig()?.sinks ?? {}), ["stderr"]);
      await ensureLogging(o); // configured already: left as it is
    } finally {
      await reset();
    }
  });

  it("mirrors the text to LogTape as a property, never as a template", async () => {
    const records: LogRecord[] = [];
    await configure({
      sinks: { mem: (r: LogRecord) => records.push(r) },
      loggers: [
        { category: ["conveyor", "driver", "tpl"], lowestLevel: "debug", sinks: ["mem"] },
        { category: ["logtape", "meta"], lowestLevel: "warning", sinks: [] },
      ],
      reset: true,
    });
    try {
      await using env = await conveyorEnv();
      const run = createRunLog({
        nc: env.nc,
        js: jetstream(env.nc),
        driver: "tpl",
        runId: crypto.randomUUID(),
      });
      const text = 'token={token} json={"a": 1} {}';
      run.logger.info(text, { token: "s3cret" });
      await run.flush();
      const [rec] = records;
      assert.equal(rec.message.join(""), text);
      assert.equal(rec.properties.token, "s3cret", "labels stay properties");
    } finally {
      await reset();
    }
  });
});
