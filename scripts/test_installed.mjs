#!/usr/bin/env node
// The Node end-to-end scenarios against the npm package as a user installs
// it, not the source tree: run after scripts/build_npm.mjs (the Node stage).
//
// 1. `npm pack` of npm/, installed with its dependencies into a temporary
//    project (and the test helpers' own dependencies, ajv, at the versions
//    package.json names);
// 2. the compiled end-to-end tests (E2E below), their helper test_util.js, the
//    programs they spawn (testdata/) and the SDD's schemas copied into it, with every import of
//    the package's modules ("./mod.js", "./testing.js", "../mod.js") rewritten
//    to "@conveyor/driver" and "@conveyor/driver/testing";
// 3. `node --test` there. Before it runs, the script checks that
//    "@conveyor/driver" resolves inside the project's node_modules.
//
//   node scripts/test_installed.mjs [--keep]   (--keep leaves the project, and prints where)
import { spawnSync } from "node:child_process";
import {
  cpSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const npmDir = join(root, "npm");
const npm = process.platform === "win32" ? "npm.cmd" : "npm";
const keep = process.argv.includes("--keep");

// The scenarios that drive the public API only: the runtime (serve,
// startDriver, drain, shutdown, health) against a real nats-server.
const E2E = ["drain_test", "health_test", "manager_test", "shutdown_test"];
// What the tests may import besides the package: their helpers, copied.
const HELPERS = ["test_util.js", "_nats.js"];
const PACKAGE = {
  "mod.js": "@conveyor/driver",
  "errors.js": "@conveyor/driver",
  "testing.js": "@conveyor/driver/testing",
};

function fail(message) {
  process.stderr.write(`test_installed: ${message}\n`);
  process.exit(1);
}

function sh(cmd, args, cwd) {
  const r = spawnSync(cmd, args, { cwd, encoding: "utf8" });
  if (r.status !== 0) fail(`${cmd} ${args.join(" ")} failed:\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
}

if (!existsSync(join(npmDir, "package.json"))) {
  fail("no npm build: run node scripts/build_npm.mjs first");
}
const built = JSON.parse(readFileSync(join(npmDir, "package.json"), "utf8"));
const pkg = JSON.parse(readFileSync(join(root, "package.json"), "utf8"));

/** Rewrites the relative imports of `text` (a file at `depth` below the project). */
function rewrite(text, file, depth) {
  const up = depth === 0 ? "./" : "../".repeat(depth);
  return text.replace(/(from\s+|import\s*\(\s*)"([^"]+)"/g, (all, head, spec) => {
    if (!spec.startsWith(".")) return all;
    const target = spec.startsWith(up) ? spec.slice(up.length) : undefined;
    if (target && PACKAGE[target]) return `${head}"${PACKAGE[target]}"`;
    // A helper beside the tests, or a sibling program in testdata/ (copied too).
    if (depth === 0 && target && HELPERS.includes(target)) return all;
    if (depth > 0 && spec.startsWith("./")) return all;
    fail(`${file} imports ${spec}, which is neither the package nor a helper`);
  });
}

/** Bare package names `text` imports (not node:, not the package itself). */
function bareImports(text) {
  const names = new Set();
  for (const [, spec] of text.matchAll(/(?:from\s+|import\s*\(\s*)"([^".][^"]*)"/g)) {
    if (spec.startsWith("node:") || spec.startsWith("@conveyor/driver")) continue;
    names.add(spec.startsWith("@") ? spec.split("/").slice(0, 2).join("/") : spec.split("/")[0]);
  }
  return names;
}

const dir = mkdtempSync(join(tmpdir(), "conveyor-installed-"));
try {
  // 1. The tarball, installed.
  const tgz = sh(npm, ["pack", "--silent", "--pack-destination", dir], npmDir).trim().split("\n")
    .at(-1);
  writeFileSync(join(dir, "package.json"), '{ "private": true, "type": "module" }\n');

  // 2. The tests and what they run, rewritten to import the package.
  const needs = new Set();
  const copy = (from, to, depth) => {
    const text = rewrite(readFileSync(from, "utf8"), to, depth);
    for (const n of bareImports(text)) needs.add(n);
    mkdirSync(dirname(join(dir, to)), { recursive: true });
    writeFileSync(join(dir, to), text);
  };
  for (const name of E2E) copy(join(npmDir, `${name}.js`), `${name}.js`, 0);
  for (const f of HELPERS) copy(join(npmDir, f), f, 0);
  for (const f of readdirSync(join(npmDir, "testdata")).filter((f) => f.endsWith(".js"))) {
    copy(join(npmDir, "testdata", f), `testdata/${f}`, 1);
  }
  // The SDD's JSON schemas, which test_util.js validates results against.
  cpSync(join(root, "schemas"), join(dir, "schemas"), { recursive: true });
  // What the helpers import beyond the package's dependencies (ajv): our
  // devDependencies' ranges.
  const extra = [...needs].filter((n) => !built.dependencies?.[n]).map((n) => {
    const range = pkg.devDependencies?.[n];
    if (!range) fail(`the tests import ${n}, which package.json does not list`);
    return `${n}@${range}`;
  });
  sh(npm, [
    "install",
    "--no-audit",
    "--no-fund",
    "--silent",
    "--prefer-offline",
    join(dir, tgz),
    ...extra,
  ], dir);

  // 3. It resolves to the install, then the tests run there.
  const resolved = sh(process.execPath, [
    "--input-type=module",
    "-e",
    'process.stdout.write(import.meta.resolve("@conveyor/driver"))',
  ], dir);
  const expected = `${join(dir, "node_modules", "@conveyor", "driver")}/`;
  if (!fileURLToPath(resolved).startsWith(expected)) {
    fail(`@conveyor/driver resolves to ${resolved}, not the install in ${expected}`);
  }
  process.stdout.write(
    `test_installed: ${tgz} (${built.version}) installed in ${dir}; ` +
      `@conveyor/driver is ${fileURLToPath(resolved)}\n`,
  );
  // The installed kit finds nats-server as a user's would: tell it where the set-up put it.
  const cached = join(root, ".cache", "nats-server", "usr", "sbin", "nats-server");
  const env = { ...process.env };
  if (!env.NATS_SERVER_BIN && existsSync(cached)) env.NATS_SERVER_BIN = cached;
  const r = spawnSync(process.execPath, [
    "--test",
    "--test-concurrency=1",
    "--test-timeout=120000",
    "--test-reporter=spec",
    ...E2E.map((n) => `${n}.js`),
  ], { cwd: dir, env, stdio: "inherit" });
  process.exitCode = r.status ?? 1;
} finally {
  if (keep) process.stdout.write(`test_installed: kept ${dir}\n`);
  else rmSync(dir, { recursive: true, force: true });
}
