// The benchmark suite (bench/) runs end to end: a smoke run of every figure,
// tiny, that checks the JSON report is well formed. It measures nothing and
// asserts no timing; `npm run bench` measures.
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { main } from "./bench/main.ts";
import { FIGURES, validateReport } from "./bench/suite.ts";

describe("bench", () => {
  it("a smoke run of every figure writes a well-formed report", async () => {
    const dir = await mkdtemp(join(tmpdir(), "conveyor-bench-"));
    try {
      assert.equal(await main(["--smoke", "--quiet", "--out", dir]), 0);
      const files = await readdir(dir);
      assert.equal(files.length, 1, `one report: ${files.join(", ")}`);
      assert.match(files[0], /^\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ-(deno|bun|node)\.json$/);
      const report = JSON.parse(await readFile(join(dir, files[0]), "utf8"));
      assert.deepEqual(validateReport(report), []);
      assert.deepEqual(Object.keys(report.figures), [...FIGURES]);
      assert.ok(files[0].endsWith(`-${report.runtime.name}.json`));
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("a report missing a figure is not well formed", () => {
    assert.deepEqual(validateReport(null), ["not an object"]);
    const problems = validateReport({
      format: "conveyor-driver-bench/1",
      config: { figures: ["logs"], concurrencies: [], coldStartRuntimes: [] },
      figures: {},
      targets: [],
    });
    assert.ok(problems.includes("logs"), problems.join("; "));
    assert.ok(problems.includes("targets"), problems.join("; "));
  });
});
