// Every rule of the README's "what reconcile does decides what is reported"
// table, and of admission, as a pure function: no NATS needed.
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { admit, decide, type Delivery, fitResult, type ResultFrame } from "./decide.ts";
import { PermanentError, ReconcileTimeoutError } from "./errors.ts";
import { ResultEnvelopeSchema } from "./types.ts";
import * as v from "valibot";

const policy = { maxAttempts: 3, retryDelay: 1_000, retryMaxDelay: 60_000 };
const noJitter = () => 0.5; // backoff's jitter is (random * 2 - 1): 0 here

describe("decide: what reconcile does decides what is reported", () => {
  it("returns { success, message, data? }: that result, acknowledged", () => {
    const result = { success: false, message: "tests failed", data: { failed: 3 } };
    assert.deepEqual(decide({ kind: "returned", value: result }, 1, policy), {
      action: "report",
      result,
      then: "ack",
    });
  });

  it("returns nothing: success with an empty message, acknowledged", () => {
    for (const value of [undefined, null]) {
      assert.deepEqual(decide({ kind: "returned", value }, 1, policy), {
        action: "report",
        result: { success: true, message: "" },
        then: "ack",
      });
    }
  });

  it("throws with attempts left: no result, retried after a delay that doubles", () => {
    const error = new Error("registry down");
    const first = decide({ kind: "threw", error }, 1, policy, noJitter);
    const second = decide({ kind: "threw", error }, 2, policy, noJitter);
    assert.deepEqual(first, { action: "retry", delay: 1_000, reason: "registry down", error });
    assert.equal(second.action === "retry" && second.delay, 2_000);
  });

  it("throws on the last attempt: a failure with the error's message, terminated", () => {
    const error = new TypeError("bad");
    const d = decide({ kind: "threw", error }, 3, policy);
    assert.deepEqual(d, {
      action: "report",
      then: "term",
      result: { success: false, message: "bad", data: { error: "TypeError", attempts: 3 } },
      error,
    });
  });

  it("throws PermanentError: a failure at once, terminated", () => {
    const d = decide(
      { kind: "threw", error: new PermanentError("spec.image is required") },
      1,
      policy,
    );
    assert.equal(d.action, "report");
    assert.equal(d.action === "report" && d.then, "term");
    assert.equal(d.action === "report" && d.result.message, "spec.image is required");
  });

  it("returns something that is not a DriverResult: a failure naming what is wrong, terminated", () => {
    const d = decide({ kind: "returned", value: { ok: true } }, 1, policy);
    assert.equal(d.action === "report" && d.then, "term");
    assert.match(
      d.action === "report" ? d.result.message : "",
      /invalid DriverResult: success: .*; message: /,
    );
  });

  it("exceeds reconcileTimeout: a failed attempt, retried, then terminated", () => {
    const error = new ReconcileTimeoutError(300);
    assert.equal(decide({ kind: "timedOut", error }, 1, policy).action, "retry");
    const last = decide({ kind: "timedOut", error }, 3, policy);
    assert.equal(
      last.action === "report" && last.result.message,
      "reconcile did not finish within 300 ms",
    );
  });

  it("is stopped by a shutdown: no result, handed back at once", () => {
    assert.deepEqual(decide({ kind: "abandoned" }, 3, policy), {
      action: "handBack",
      reason: "the driver is shutting down",
    });
  });

  it("throws a value that is no Error, even one whose String() throws: a message all the same", () => {
    const d = decide({ kind: "threw", error: Object.create(null) }, 3, policy);
    assert.equal(d.action, "report");
    assert.match(d.action === "report" ? d.result.message : "", /^non-Error thrown: /);
    const s = decide({ kind: "threw", error: "plain text" }, 3, policy);
    assert.equal(s.action === "report" && s.result.message, "plain text");
  });
});

describe("admit: before reconcile runs", () => {
  const delivery = (d: Partial<Delivery>): Delivery => ({
    attempt: 1,
    type: "app",
    handlesType: true,
    event: "create",
    eventHandler: "this",
    runningHere: false,
    ...d,
  });

  it("runs what this instance handles", () => {
    assert.deepEqual(admit(delivery({}), policy), { action: "run" });
  });

  it("reports an event delivered more than maxAttempts times without running it again", () => {
    const a = admit(delivery({ attempt: 4 }), policy);
    assert.equal(a.action, "fail");
    assert.deepEqual(a.action === "fail" && a.result.data, {
      error: "AttemptsExhaustedError",
      attempts: 3,
    });
  });

  it("skips, without a result, an event name no version of the driver handles", () => {
    assert.equal(admit(delivery({ eventHandler: "none", attempt: 9 }), policy).action, "skip");
  });

  it("hands back what only another version handles, and reports it on the last attempt", () => {
    for (const d of [{ handlesType: false, type: "b" }, { eventHandler: "other" as const }]) {
      const early = admit(delivery({ ...d, attempt: 1 }), policy, noJitter);
      assert.deepEqual(early.action === "handBack" && early.delay, 1_000);
      const last = admit(delivery({ ...d, attempt: 3 }), policy);
      assert.equal(last.action, "fail");
      assert.equal(
        last.action === "fail" && (last.result.data as { error: string }).error,
        "NotHandledError",
      );
    }
  });

  it("hands back a delivery whose earlier attempt still runs here", () => {
    const a = admit(delivery({ runningHere: true, attempt: 2 }), policy, noJitter);
    assert.deepEqual(a, {
      action: "handBack",
      delay: 2_000,
      reason: "an earlier attempt is still in progress here",
    });
  });
});

describe("fitResult: the result as published", () => {
  const frame: ResultFrame = {
    driver: "echo",
    runId: "0b7e1c1e-8d4e-4f7a-9a52-4a3b2c1d0e9f",
    resourceJson: '{"id":"1","name":"web","resource":"app","metadata":{},"spec":{"x":[1,2]}}',
    maxPayload: 64 * 1024,
    attempt: 1,
  };
  // deno-lint-ignore no-explicit-any
  const decodeBody = (body: Uint8Array | string): any =>
    JSON.parse(typeof body === "string" ? body : new TextDecoder().decode(body));

  it("encodes the server's envelope with the resource spliced in as received", () => {
    const f = fitResult({ success: true, message: "ok" }, frame);
    assert.ok(f.ok);
    const env = decodeBody(f.body);
    assert.equal(v.safeParse(ResultEnvelopeSchema, env).success, true);
    assert.deepEqual(env.resource, JSON.parse(frame.resourceJson));
    assert.deepEqual(env.driverresult, {
      success: true,
      message: "ok",
      data: null,
      driver: "echo",
    });
  });

  it("turns data that cannot be JSON into a failure, and never throws", () => {
    const cycle: Record<string, unknown> = {};
    cycle.self = cycle;
    const hostile = {
      toJSON() {
        throw new Error("nope");
      },
    };
    for (const data of [1n, cycle, hostile]) {
      const f = fitResult({ success: true, message: "ok", data }, frame);
      assert.ok(f.ok && f.replaced);
      const env = decodeBody(f.body);
      assert.equal(env.driverresult.success, false);
      assert.equal(env.driverresult.data.error, "ResultEncodingError");
    }
  });

  it("turns a result larger than max_payload into a failure that says so", () => {
    const f = fitResult({ success: true, message: "m".repeat(100 * 1024) }, frame);
    assert.ok(f.ok && f.replaced);
    const env = decodeBody(f.body);
    assert.match(env.driverresult.message, /more than the server's max_payload of 65536 bytes/);
    assert.equal(env.driverresult.data.error, "ResultTooLargeError");
  });

  it("gives up with a reason when not even a failure fits", () => {
    const f = fitResult({ success: true, message: "ok" }, {
      ...frame,
      resourceJson: JSON.stringify({ spec: "s".repeat(70 * 1024) }),
    });
    assert.equal(f.ok, false);
  });
});
