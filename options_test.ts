import { afterEach, describe, it } from "node:test";
import assert from "node:assert/strict";
import process from "node:process";
import { ConfigError } from "./errors.ts";
import { ENV, parseDuration, resolveOptions } from "./options.ts";
import { backoff as retryDelayFor } from "./_util.ts";

const saved = { ...process.env };
afterEach(() => {
  for (const k of Object.values(ENV)) {
    if (saved[k] === undefined) delete process.env[k];
    else process.env[k] = saved[k];
  }
});

describe("resolveOptions", () => {
  it("has documented defaults", () => {
    for (const k of Object.values(ENV)) delete process.env[k];
    const o = resolveOptions();
    assert.deepEqual(o.servers, ["nats://127.0.0.1:4222"]);
    assert.equal(o.concurrency, 16);
    assert.equal(o.shutdownTimeout, 30_000);
    assert.equal(o.reconcileTimeout, 0);
    assert.equal(o.settleTimeout, 60_000);
    assert.equal(o.maxAttempts, 5);
    assert.equal(o.retryDelay, 1_000);
    assert.equal(o.retryMaxDelay, 60_000);
    assert.equal(o.ackWait, 30_000);
    assert.equal(o.maxAckPending, 1_000);
    assert.equal(o.connectTimeout, 10_000);
    assert.equal(o.handleSignals, true);
    assert.equal(o.logLevel, "info");
  });

  it("reads every deployment setting from the environment", () => {
    process.env.NATS_URL = "nats://a:4222, nats://b:4222";
    process.env.CONVEYOR_CONCURRENCY = "4";
    process.env.CONVEYOR_SHUTDOWN_TIMEOUT = "2m";
    process.env.CONVEYOR_RECONCILE_TIMEOUT = "90s";
    process.env.CONVEYOR_MAX_ATTEMPTS = "3";
    process.env.CONVEYOR_RETRY_DELAY = "250ms";
    process.env.CONVEYOR_RETRY_MAX_DELAY = "10s";
    process.env.CONVEYOR_ACK_WAIT = "45s";
    process.env.CONVEYOR_MAX_ACK_PENDING = "64";
    process.env.CONVEYOR_CONNECT_TIMEOUT = "1500";
    process.env.CONVEYOR_LOG_LEVEL = "DEBUG";
    const o = resolveOptions();
    assert.deepEqual(o.servers, ["nats://a:4222", "nats://b:4222"]);
    assert.equal(o.concurrency, 4);
    assert.equal(o.shutdownTimeout, 120_000);
    assert.equal(o.reconcileTimeout, 90_000);
    assert.equal(o.maxAttempts, 3);
    assert.equal(o.retryDelay, 250);
    assert.equal(o.retryMaxDelay, 10_000);
    assert.equal(o.ackWait, 45_000);
    assert.equal(o.maxAckPending, 64);
    assert.equal(o.connectTimeout, 1_500);
    assert.equal(o.logLevel, "debug");
  });

  it("lets explicit options win over the environment", () => {
    process.env.CONVEYOR_CONCURRENCY = "4";
    process.env.NATS_URL = "nats://env:4222";
    const o = resolveOptions({ concurrency: 2, servers: "nats://given:4222" });
    assert.equal(o.concurrency, 2);
    assert.deepEqual(o.servers, ["nats://given:4222"]);
  });

  it("rejects bad values with a ConfigError naming the source", () => {
    process.env.CONVEYOR_CONCURRENCY = "lots";
    assert.throws(
      () => resolveOptions(),
      (e) =>
        e instanceof ConfigError && e.field === "concurrency" &&
        /CONVEYOR_CONCURRENCY=lots/.test(e.message),
    );
    delete process.env.CONVEYOR_CONCURRENCY;
    assert.throws(() => resolveOptions({ concurrency: 0 }), ConfigError);
    assert.throws(() => resolveOptions({ concurrency: 1.5 }), ConfigError);
    assert.throws(() => resolveOptions({ ackWait: 10 }), /ackWait/);
    process.env.CONVEYOR_ACK_WAIT = "soon";
    assert.throws(() => resolveOptions(), /duration/);
    delete process.env.CONVEYOR_ACK_WAIT;
    process.env.CONVEYOR_LOG_LEVEL = "loud";
    assert.throws(() => resolveOptions(), /CONVEYOR_LOG_LEVEL/);
  });

  it("refuses durations a timer cannot hold, and takes Infinity as no limit where allowed", () => {
    // "720h" once meant "fire after 1 ms" on every runtime.
    process.env.CONVEYOR_RECONCILE_TIMEOUT = "720h";
    assert.throws(
      () => resolveOptions(),
      (e) =>
        e instanceof ConfigError && e.field === "reconcileTimeout" &&
        /CONVEYOR_RECONCILE_TIMEOUT=720h.*24\.8 days.*Infinity/.test(e.message),
    );
    process.env.CONVEYOR_RECONCILE_TIMEOUT = "Infinity";
    assert.equal(resolveOptions().reconcileTimeout, Infinity);
    delete process.env.CONVEYOR_RECONCILE_TIMEOUT;
    assert.equal(resolveOptions({ shutdownTimeout: Infinity }).shutdownTimeout, Infinity);
    assert.equal(resolveOptions({ connectTimeout: Infinity }).connectTimeout, Infinity);
    assert.throws(() => resolveOptions({ shutdownTimeout: 2 ** 31 }), /shutdownTimeout/);
    assert.throws(() => resolveOptions({ ackWait: Infinity }), /ackWait/);
    assert.throws(() => resolveOptions({ retryMaxDelay: 2 ** 31 }), /retryMaxDelay/);
    assert.throws(() => resolveOptions({ maxAttempts: Infinity }), /maxAttempts/);
  });

  it("reads the consumer policy and exit behaviour", () => {
    assert.equal(resolveOptions().consumerPolicy, "widen");
    process.env.CONVEYOR_CONSUMER_POLICY = "replace";
    assert.equal(resolveOptions().consumerPolicy, "replace");
    process.env.CONVEYOR_CONSUMER_POLICY = "narrow";
    assert.throws(() => resolveOptions(), /CONVEYOR_CONSUMER_POLICY=narrow.*"widen" or "replace"/);
    delete process.env.CONVEYOR_CONSUMER_POLICY;
    assert.equal(resolveOptions().exitProcess, true);
    assert.equal(resolveOptions({ handleSignals: false }).exitProcess, false);
    assert.equal(resolveOptions({ exitProcess: false }).exitProcess, false);
  });

  it("does not install signal handlers when a signal is given", () => {
    assert.equal(resolveOptions({ signal: new AbortController().signal }).handleSignals, false);
    assert.equal(resolveOptions({ handleSignals: false }).handleSignals, false);
  });
});

describe("parseDuration and retryDelayFor", () => {
  it("parses plain milliseconds and units", () => {
    assert.equal(parseDuration("1500"), 1500);
    assert.equal(parseDuration("30s"), 30_000);
    assert.equal(parseDuration("2.5m"), 150_000);
    assert.equal(parseDuration("1h"), 3_600_000);
    assert.equal(parseDuration("fast"), undefined);
    assert.equal(parseDuration("-1s"), undefined);
  });

  it("doubles the retry delay per attempt within ±20%, capped", () => {
    const o = { retryDelay: 1_000, retryMaxDelay: 5_000 };
    for (let i = 0; i < 50; i++) {
      const d1 = retryDelayFor(1, o);
      const d2 = retryDelayFor(2, o);
      assert.ok(d1 >= 800 && d1 <= 1_200, `attempt 1: ${d1}`);
      assert.ok(d2 >= 1_600 && d2 <= 2_400, `attempt 2: ${d2}`);
      assert.ok(retryDelayFor(10, o) <= 5_000);
    }
  });
});
