#!/usr/bin/env node
// The whole test suite, as `npm test`, `deno task test` and `.ci/run` run it:
// static checks, then every *_test.ts on Deno and on Bun, then the npm build's
// tests on Node. Each test file starts its own nats-server processes.
//
//   node scripts/test.mjs [--only deno|bun|node|static] [--skip node]
import { spawnSync } from "node:child_process";
import { readdirSync } from "node:fs";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";

const root = resolve(import.meta.dirname, "..");
const bin = (name) => join(root, "node_modules", ".bin", name);
const { values } = parseArgs({
  options: { only: { type: "string", multiple: true }, skip: { type: "string", multiple: true } },
});
const wanted = (stage) =>
  (!values.only || values.only.includes(stage)) && !(values.skip ?? []).includes(stage);

const testFiles = readdirSync(root).filter((f) => f.endsWith("_test.ts")).sort();
const totals = { passed: 0, failed: 0 };
const failedStages = [];

/** Runs a command with inherited output captured for counting; returns its status. */
function run(stage, cmd, args, count) {
  process.stdout.write(`\n== ${stage}: ${[cmd.replace(root + "/", ""), ...args].join(" ")}\n`);
  const started = Date.now();
  const r = spawnSync(cmd, args, {
    cwd: root,
    encoding: "utf8",
    maxBuffer: 256 * 1024 * 1024,
    env: { ...process.env, NO_COLOR: "1", FORCE_COLOR: "0" },
  });
  const output = (r.stdout ?? "") + (r.stderr ?? "");
  process.stdout.write(output);
  if (count) {
    const c = count(output);
    totals.passed += c.passed;
    totals.failed += c.failed;
  }
  const ok = r.status === 0;
  if (!ok) failedStages.push(stage);
  process.stdout.write(
    `== ${stage}: ${ok ? "ok" : `FAILED (status ${r.status ?? r.signal})`} in ${
      ((Date.now() - started) / 1000).toFixed(1)
    } s\n`,
  );
  return ok;
}

const num = (re, text) => [...text.matchAll(re)].reduce((n, m) => n + Number(m[1]), 0);

if (wanted("static")) {
  const deno = bin("deno");
  run("fmt", deno, ["fmt", "--check"]);
  run("lint", deno, ["lint"]);
  const ts = (dir) =>
    readdirSync(join(root, dir)).filter((f) => f.endsWith(".ts")).map((f) => join(dir, f));
  run("check", deno, ["check", ...ts("."), ...ts("examples"), ...ts("bench"), ...ts("testdata")]);
  run("doc", deno, ["doc", "--lint", "mod.ts"]);
  // JSR's checks, slow types among them; a dry run needs no network.
  run("publish", deno, ["publish", "--dry-run", "--allow-dirty", "--quiet"]);
}
if (wanted("deno")) {
  run("deno", bin("deno"), ["test", "-A", ...testFiles], (out) => {
    // "ok | 6 passed (19 steps) | 0 failed (2 steps)": count the steps (the `it`s).
    const line = out.split("\n").reverse().find((l) => /\d+ passed/.test(l)) ?? "";
    const passed = /passed \((\d+) steps?\)/.exec(line)?.[1] ?? 0;
    const failed = /failed \((\d+) steps?\)/.exec(line)?.[1] ?? 0;
    return { passed: Number(passed), failed: Number(failed) };
  });
}
if (wanted("bun")) {
  run(
    "bun",
    bin("bun"),
    ["test", "--timeout", "120000", ...testFiles.map((f) => `./${f}`)],
    (out) => ({
      passed: num(/^\s*(\d+) pass$/gm, out),
      failed: num(/^\s*(\d+) fail$/gm, out),
    }),
  );
}
if (wanted("node")) {
  run("node", process.execPath, [join(root, "scripts", "build_npm.mjs"), "--test"], (out) => ({
    passed: num(/^(?:#|ℹ) pass (\d+)$/gm, out),
    failed: num(/^(?:#|ℹ) fail (\d+)$/gm, out),
  }));
}

process.stdout.write(
  `\n${failedStages.length ? `failed stages: ${failedStages.join(", ")}` : "all stages passed"}\n`,
);
process.stdout.write(`${totals.passed} passed, ${totals.failed} failed\n`);
process.exit(failedStages.length ? 1 : 0);
