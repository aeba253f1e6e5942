import { describe, it } from "node:test";
import assert from "node:assert/strict";
import * as v from "valibot";
import {
  DriverMessageSchema,
  DriverResultSchema,
  LogEntrySchema,
  nameProblem,
  ResultEnvelopeSchema,
} from "./types.ts";
import { sddValidators } from "./test_util.ts";

const resource = {
  id: "6f1c",
  name: "web",
  resource: "pipeline",
  metadata: { version: "1" },
  spec: { image: "node:20" },
};
const runId = "0b7e1c1e-8d4e-4f7a-9a52-4a3b2c1d0e9f";

describe("DriverMessageSchema", () => {
  it("decodes the server's form: payload as a JSON string", () => {
    const wire = { event: "create", id: "m1", run_id: runId, payload: JSON.stringify(resource) };
    const out = v.parse(DriverMessageSchema, wire);
    assert.deepEqual(out.payload, resource);
    assert.equal(out.run_id, runId);
  });

  it("decodes the SDD's form: payload as an object, valid against the SDD schema", () => {
    const wire = { event: "process", id: "m1", run_id: runId, payload: resource };
    assert.equal(sddValidators()["driver-message"](wire), undefined);
    assert.deepEqual(v.parse(DriverMessageSchema, wire).payload, resource);
  });

  it("accepts any JSON spec and non-string metadata values, and keeps unknown fields", () => {
    for (const spec of [null, 3, "text", [1, 2], { deep: { x: [true] } }]) {
      const r = { ...resource, spec, metadata: { version: "2", replicas: 3 }, extra: 1 };
      const out = v.parse(DriverMessageSchema, {
        event: "create",
        id: "m",
        run_id: runId,
        payload: r,
      });
      assert.deepEqual(out.payload.spec, spec);
      assert.equal(out.payload.metadata.replicas, 3);
    }
  });

  it("names every problem with its path", () => {
    const cases: [unknown, RegExp][] = [
      [{ id: "m", run_id: runId, payload: resource }, /event/],
      [{ event: "", id: "m", run_id: runId, payload: resource }, /event/],
      [
        { event: "create", id: "m", run_id: "not-a-uuid", payload: resource },
        /run_id must be a UUID/,
      ],
      [{ event: "create", id: "m", run_id: runId, payload: "{broken" }, /not valid JSON/],
      [{ event: "create", id: "m", run_id: runId, payload: { ...resource, name: "" } }, /name/],
      [
        { event: "create", id: "m", run_id: runId, payload: { ...resource, metadata: "x" } },
        /metadata/,
      ],
      [[1, 2], /"event"/],
    ];
    for (const [input, pattern] of cases) {
      const r = v.safeParse(DriverMessageSchema, input);
      assert.equal(r.success, false, JSON.stringify(input));
      const text = r.issues!.map((i) => `${v.getDotPath(i) ?? ""} ${i.message}`).join("; ");
      assert.match(text, pattern, JSON.stringify(input));
    }
  });
});

describe("emitted shapes", () => {
  it("LogEntrySchema accepts exactly what the SDD Log schema accepts", () => {
    const sdd = sddValidators();
    const good = { runid: runId, driver: "d", timestamp: new Date().toISOString(), message: "m" };
    const samples = [
      good,
      { ...good, pipeline: "ci" },
      { ...good, extra: "label" },
      { ...good, runid: "x" },
      { ...good, timestamp: "yesterday" },
      { ...good, pipeline: "" },
      { runid: runId, driver: "d", message: "m" },
    ];
    for (const s of samples) {
      assert.equal(v.is(LogEntrySchema, s), sdd.log(s) === undefined, JSON.stringify(s));
    }
  });

  it("ResultEnvelopeSchema matches the server envelope with an SDD DriverResultEvent", () => {
    const sdd = sddValidators();
    const e = {
      event: "driver.result",
      run_id: runId,
      resource,
      driverresult: { success: true, message: "ok", data: null, driver: "d" },
    };
    assert.ok(v.is(ResultEnvelopeSchema, e));
    assert.equal(sdd["driver-result-event"](e.driverresult), undefined);
    assert.ok(!v.is(ResultEnvelopeSchema, { ...e, driverresult: { ...e.driverresult, extra: 1 } }));
  });

  it("DriverResultSchema needs success and message; data is optional", () => {
    assert.ok(v.is(DriverResultSchema, { success: false, message: "no" }));
    assert.ok(v.is(DriverResultSchema, { success: true, message: "", data: [1] }));
    assert.ok(!v.is(DriverResultSchema, { success: "yes", message: "" }));
    assert.ok(!v.is(DriverResultSchema, { ok: true }));
  });
});

describe("nameProblem", () => {
  it("accepts names that fit in subjects and explains those that do not", () => {
    for (const ok of ["echo", "docker-build", "k8s_deploy", "Pipeline2"]) {
      assert.equal(nameProblem(ok, "driver name"), undefined);
    }
    for (const bad of ["a.b", "a b", "a*", "a>", "a/b", "a\\b", "tab\there", ""]) {
      assert.match(nameProblem(bad, "driver name") ?? "", /driver name/);
    }
    assert.match(nameProblem(42, "resource type") ?? "", /non-empty string/);
  });
});
