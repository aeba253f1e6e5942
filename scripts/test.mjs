#!/usr/bin/env node
// The whole test suite, as `npm test`, `deno task test` and `.ci/run` run it:
// static checks, then every *_test.ts and examples/*_test.ts on Deno and on
// Bun, the end-to-end ones again over WebSocket (ws), then the npm build's
// tests on Node and the end-to-end ones from the installed tarball. Each test file starts its own
// nats-server processes. Each stage's output streams through as it comes; the
// end names every failing test.
//
//   node scripts/test.mjs [--only static|deno|bun|ws|node] [--skip node]
//   node scripts/test.mjs --faults    the long fault runs (faults_test, cluster_test)
//                                     on Deno, Bun and Node: `npm run test:faults`
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";

const root = resolve(import.meta.dirname, "..");
const bin = (name) => join(root, "node_modules", ".bin", name);
const { values } = parseArgs({
  options: {
    only: { type: "string", multiple: true },
    skip: { type: "string", multiple: true },
    faults: { type: "boolean" },
  },
});
if (values.faults) values.skip = [...(values.skip ?? []), "static"];
const wanted = (stage) =>
  (!values.only || values.only.includes(stage)) && !(values.skip ?? []).includes(stage);

// No colour codes, so that a saved log reads clean: NO_COLOR=1 turns colour off
// on Deno, Bun and Node, but any FORCE_COLOR (even "0") turns Deno's back on and
// wins over NO_COLOR on Bun and Node, so none is passed on.
const env = { ...process.env, NO_COLOR: "1" };
delete env.FORCE_COLOR;
// The long versions of the fault tests (a soak of 100,000 events, more events
// through killed nodes), behind their own command; the default suite runs
// the short ones.
const FAULT_FILES = ["faults_test", "cluster_test"];
// The end-to-end files (drivers against a real nats-server), run a second time
// on Deno and Bun with every connection of the process over WebSocket
// (CONVEYOR_TEST_TRANSPORT=ws; Node 20 has no WebSocket): the "ws" stage.
const WS_FILES = [
  "consumer_test.ts",
  "drain_test.ts",
  "health_test.ts",
  "manager_test.ts",
  "run_test.ts",
  "shutdown_test.ts",
  "telemetry_test.ts",
];
if (values.faults) env.CONVEYOR_FAULTS = "long";

// The tests at the top level, then those of the examples (examples/*_test.ts).
const testFiles = ["", "examples"].flatMap((dir) =>
  readdirSync(join(root, dir)).filter((f) =>
    f.endsWith("_test.ts") && (!values.faults || FAULT_FILES.includes(f.slice(0, -3)))
  ).sort().map((f) => (dir ? `${dir}/${f}` : f))
);
const totals = { passed: 0, failed: 0 };
const failedStages = [];
/** For the final summary: one line per failing test, or per failing stage. */
const failures = [];

/**
 * Runs a command, writing its output through as it arrives and keeping a copy
 * for `parse`, which returns { passed, failed, tests: [{ file, name }] }.
 */
async function run(stage, cmd, args, parse, extraEnv = {}) {
  const shownEnv = Object.entries(extraEnv).map(([k, v]) => `${k}=${v} `).join("");
  process.stdout.write(
    `\n== ${stage}: ${shownEnv}${[cmd.replace(root + "/", ""), ...args].join(" ")}\n`,
  );
  const started = Date.now();
  const child = spawn(cmd, args, {
    cwd: root,
    env: { ...env, ...extraEnv },
    stdio: ["ignore", "pipe", "pipe"],
  });
  // One copy per stream: chunks of the two may interleave mid-line.
  const copy = { stdout: "", stderr: "" };
  for (const name of ["stdout", "stderr"]) {
    child[name].setEncoding("utf8");
    child[name].on("data", (chunk) => {
      process.stdout.write(chunk);
      copy[name] += chunk;
    });
  }
  const status = await new Promise((res) => {
    child.on("error", (err) => {
      process.stdout.write(`cannot run ${cmd}: ${err.message}\n`);
      res("error");
    });
    child.on("close", (code, signal) => res(code ?? signal));
    // A process a test left behind may hold the pipes open after the stage
    // exited: take the exit, with a moment for the last output, and go on.
    child.on("exit", (code, signal) =>
      setTimeout(() => {
        if (child.stdout.readableEnded && child.stderr.readableEnded) return;
        process.stdout.write(
          `\n${stage}: exited, but a process it started still holds its output; not waiting\n`,
        );
        child.stdout.destroy();
        child.stderr.destroy();
        res(code ?? signal);
      }, 2_000).unref());
  });
  const ok = status === 0;
  const found = parse?.(`${copy.stdout}\n${copy.stderr}`);
  if (found) {
    totals.passed += found.passed;
    totals.failed += found.failed;
    for (const t of found.tests) failures.push(`${stage.padEnd(5)} ${t.file}  ${t.name}`);
  }
  if (!ok) {
    failedStages.push(stage);
    if (!found?.tests.length) {
      failures.push(
        `${stage.padEnd(5)} (stage failed with status ${status}${
          parse ? "; no failing test named in its output" : ""
        })`,
      );
    }
  }
  process.stdout.write(
    `== ${stage}: ${ok ? "ok" : `FAILED (status ${status})`} in ${
      ((Date.now() - started) / 1000).toFixed(1)
    } s\n`,
  );
  return ok;
}

const num = (re, text) => [...text.matchAll(re)].reduce((n, m) => n + Number(m[1]), 0);

/**
 * Deno: its FAILURES list names each failing test ("suite ... test => where"),
 * but where is inside Deno for node:test's `it`s; the progress lines before it
 * ("running 3 tests from ./a_test.ts", then one line per test, indented by
 * depth) tell the file.
 */
function parseDeno(out) {
  const files = new Map(); // "suite ... test" -> files it failed in, in order
  let file = "?";
  let stack = [];
  let inOutput = false; // a test's own output, which could look like anything
  const [progress, list = ""] = out.split(/^ ?FAILURES ?$/m);
  for (const line of progress.split("\n")) {
    if (/^-+ (?:[a-z-]+ )?output -+$/.test(line)) inOutput = true; // "post-test output", ...
    else if (/^-+ (?:[a-z-]+ )?output end -+$/.test(line)) inOutput = false;
    if (inOutput) continue;
    const running = /^running \d+ tests? from (\S+)$/.exec(line);
    if (running) [file, stack] = [running[1].replace(/^\.\//, ""), []];
    const t = /^( *)(.+?) \.\.\.(?: (FAILED|ok|ignored)\b.*)?$/.exec(line);
    if (!t || running) continue;
    stack = [...stack.slice(0, t[1].length / 2), t[2]];
    if (t[3] === "FAILED") {
      const key = stack.join(" ... ");
      files.set(key, [...(files.get(key) ?? []), file]);
    }
  }
  const tests = [];
  for (const line of list.split("\n")) {
    if (/^(?:FAILED|ok) \|/.test(line)) break;
    if (!line.trim()) continue;
    const uncaught = /^\.\/(\S+) (\(uncaught error\))$/.exec(line);
    if (uncaught) {
      tests.push({ file: uncaught[1], name: uncaught[2] });
      continue;
    }
    const arrow = line.lastIndexOf(" => ");
    const name = arrow < 0 ? line : line.slice(0, arrow);
    const at = /^\.\/(.+?):\d+:\d+$/.exec(line.slice(arrow + 4))?.[1];
    tests.push({
      file: at ?? files.get(name)?.shift() ?? "?",
      name: name.split(" ... ").join(" > "),
    });
  }
  // "ok | 6 passed (19 steps) | 0 failed (2 steps)": count the steps (the `it`s).
  const line = out.split("\n").reverse().find((l) => /\d+ passed/.test(l)) ?? "";
  const passed = /passed \((\d+) steps?\)/.exec(line)?.[1] ?? 0;
  const failed = /failed \((\d+) steps?\)/.exec(line)?.[1] ?? 0;
  return { passed: Number(passed), failed: Number(failed), tests };
}

/** Bun: "a_test.ts:" heads each file's "(fail) suite > test [1.00ms]" lines. */
function parseBun(out) {
  const tests = [];
  let file = "?";
  for (const line of out.split("\n")) {
    // The recap at the end ("3 tests failed:") repeats them without files.
    if (/^\d+ tests? failed:$/.test(line)) break;
    const head = /^(\S+\.[cm]?[jt]sx?):$/.exec(line);
    if (head) file = head[1];
    const fail = /^\(fail\) (.+?)(?: \[[\d.]+m?s\])?$/.exec(line);
    if (fail) tests.push({ file, name: fail[1] });
  }
  return {
    passed: num(/^\s*(\d+) pass$/gm, out),
    failed: num(/^\s*(\d+) fail$/gm, out),
    tests,
  };
}

/**
 * Node's spec reporter: the list after "✖ failing tests:" gives each failing
 * test's file ("test at npm/a_test.js:12:3") and name ("✖ test (1.2ms)"); the
 * report above it, indented by depth, gives its suites, found by name and time.
 */
function parseNode(out) {
  const paths = new Map(); // "test (1.2ms)" -> "suite > test"
  let stack = [];
  const [report, list = ""] = out.split(/^✖ failing tests:$/m);
  for (const line of report.split("\n")) {
    const t = /^( *)([▶✔✖﹣]) (.+?)( \([\d.]+ms\))?(?: # .*)?$/.exec(line);
    if (!t) continue;
    stack = [...stack.slice(0, t[1].length / 2), t[3]];
    if (t[2] === "✖" && t[4]) paths.set(t[3] + t[4], stack.join(" > "));
  }
  const tests = [];
  let file = "?";
  for (const line of list.split("\n")) {
    const at = /^test at (.+?)(?::\d+:\d+)?$/.exec(line);
    if (at) file = at[1];
    const fail = /^✖ (.+?)( \([\d.]+ms\))?$/.exec(line);
    if (fail) tests.push({ file, name: paths.get(fail[1] + (fail[2] ?? "")) ?? fail[1] });
  }
  return {
    passed: num(/^(?:#|ℹ) pass (\d+)$/gm, out),
    failed: num(/^(?:#|ℹ) fail (\d+)$/gm, out),
    tests,
  };
}

if (wanted("static")) {
  const deno = bin("deno");
  await run("fmt", deno, ["fmt", "--check"]);
  await run("lint", deno, ["lint"]);
  const ts = (dir) =>
    readdirSync(join(root, dir)).filter((f) => f.endsWith(".ts")).map((f) => join(dir, f));
  await run("check", deno, [
    "check",
    ...ts("."),
    ...ts("examples"),
    ...ts("bench"),
    ...ts("testdata"),
  ]);
  // Every entry point of deno.json's "exports", as JSR documents them.
  const entries = Object.values(
    JSON.parse(readFileSync(join(root, "deno.json"), "utf8")).exports,
  );
  await run("doc", deno, ["doc", "--lint", ...entries]);
  // Every JSDoc @example and every ```ts block of README.md type-checks, importing
  // "@conveyor/driver" as a user would (deno.json's name and exports resolve it).
  // `--doc` checks the examples of the files given only, so every module is
  // given: all but the tests and their helpers (test_*.ts).
  const modules = ts(".").filter((f) => !f.endsWith("_test.ts") && !f.startsWith("test_"));
  await run("doc-examples", deno, ["check", "--doc", ...modules, ...ts("examples")]);
  // README.md's ```ts blocks are type-checked from files: a block whose first
  // line is `// name.ts` is written under that name (so the test block of
  // "Testing your driver" imports the driver block), the others as
  // readme_<line>.ts, in .cache/readme/ (inside the repository, so that
  // "@conveyor/driver" resolves as for a user). The *_test.ts blocks then run
  // on Deno and Bun: that section is executable as written.
  const readmeDir = join(root, ".cache", "readme");
  rmSync(readmeDir, { recursive: true, force: true });
  mkdirSync(readmeDir, { recursive: true });
  const readmeFiles = [];
  const readmeLines = readFileSync(join(root, "README.md"), "utf8").split("\n");
  for (let i = 0; i < readmeLines.length; i++) {
    if (!/^```(?:ts|typescript)\s*$/.test(readmeLines[i])) continue;
    const close = readmeLines.findIndex((l, k) => k > i && /^```\s*$/.test(l));
    const body = readmeLines.slice(i + 1, close);
    const named = /^\/\/ ([\w.-]+\.ts)(?::|$)/.exec(body[0] ?? "");
    const file = join(readmeDir, named ? named[1] : `readme_${i + 1}.ts`);
    writeFileSync(file, body.join("\n") + "\n");
    readmeFiles.push(file);
    i = close;
  }
  await run("readme-examples", deno, ["check", ...readmeFiles]);
  const readmeTests = readmeFiles.filter((f) => f.endsWith("_test.ts"));
  if (readmeTests.length > 0) {
    await run("readme-tests-deno", deno, ["test", "-A", ...readmeTests]);
    await run("readme-tests-bun", bin("bun"), ["test", "--timeout", "120000", ...readmeTests]);
  }
  // The README's first snippet, the one people copy, also lints clean: it is
  // linted from a temporary file, after as many blank lines as precede it in
  // README.md, so that the reported line numbers are README.md's.
  const readme = readFileSync(join(root, "README.md"), "utf8").split("\n");
  const start = readme.findIndex((l) => /^```(?:ts|typescript)\s*$/.test(l));
  const end = readme.findIndex((l, i) => i > start && /^```\s*$/.test(l));
  const dir = mkdtempSync(join(tmpdir(), "conveyor-readme-"));
  const snippet = join(dir, "README.md-first-snippet.ts");
  if (start >= 0 && end > start) {
    writeFileSync(snippet, "\n".repeat(start + 1) + readme.slice(start + 1, end).join("\n") + "\n");
  } else {
    // deno lint then fails on the missing file, after this says why.
    process.stdout.write("\nreadme-lint: README.md has no ```ts block\n");
  }
  await run("readme-lint", deno, ["lint", snippet]);
  rmSync(dir, { recursive: true, force: true });
  // One version: deno.json, package.json and CHANGELOG.md agree.
  await run("version", process.execPath, [join(root, "scripts", "version.mjs")]);
  // JSR's checks, slow types among them; a dry run needs no network.
  await run("publish", deno, ["publish", "--dry-run", "--allow-dirty", "--quiet"]);
  // The npm package as a user gets it (scripts/check_package.mjs): built into
  // npm/, then its dependencies' engines, its declarations under TypeScript 5
  // and 7, publint, @arethetypeswrong/cli and its packed and unpacked sizes.
  if (await run("build", process.execPath, [join(root, "scripts", "build_npm.mjs")])) {
    await run("package", process.execPath, [join(root, "scripts", "check_package.mjs")]);
  }
}
if (wanted("deno")) await run("deno", bin("deno"), ["test", "-A", ...testFiles], parseDeno);
if (wanted("bun")) {
  const files = testFiles.map((f) => `./${f}`);
  await run("bun", bin("bun"), ["test", "--timeout", "120000", ...files], parseBun);
}
if (wanted("ws") && !values.faults) {
  const ws = { CONVEYOR_TEST_TRANSPORT: "ws" };
  await run("deno-ws", bin("deno"), ["test", "-A", ...WS_FILES], parseDeno, ws);
  const files = WS_FILES.map((f) => `./${f}`);
  await run("bun-ws", bin("bun"), ["test", "--timeout", "120000", ...files], parseBun, ws);
}
if (wanted("node")) {
  await run(
    "node",
    process.execPath,
    [
      join(root, "scripts", "build_npm.mjs"),
      "--test",
      ...(values.faults ? [`--files=${FAULT_FILES.join(",")}`] : []),
    ],
    parseNode,
  );
  // The end-to-end scenarios again, against the packed tarball installed
  // into a project of its own rather than the build directory.
  if (!values.faults) {
    await run(
      "installed",
      process.execPath,
      [join(root, "scripts", "test_installed.mjs")],
      parseNode,
    );
  }
}

if (failures.length) {
  process.stdout.write(`\nfailing:\n${failures.map((f) => `  ${f}\n`).join("")}`);
}
process.stdout.write(
  `\n${failedStages.length ? `failed stages: ${failedStages.join(", ")}` : "all stages passed"}\n`,
);
process.stdout.write(`${totals.passed} passed, ${totals.failed} failed\n`);
process.exit(failedStages.length ? 1 : 0);
