#!/usr/bin/env node
// The benchmark suite (bench/main.ts) on one runtime or on each in turn: Deno
// and Bun run the TypeScript sources, Node runs the npm build, built first by
// scripts/build_npm.mjs. Every other argument goes to the suite
// (`--help` lists them; bench/README.md explains the figures).
//
//   node scripts/bench.mjs [--runtime deno|bun|node|all] [--no-build] [suite options]
//   npm run bench -- --runtime all
//   deno task bench --runtime bun --only overhead -n 5000
//
// Each run prints its table and writes bench/results/<timestamp>-<runtime>.json;
// the end lists each runtime's status and time. Exit status 1 when a run failed.
import { spawn } from "node:child_process";
import { join, resolve } from "node:path";
import process from "node:process";

const root = resolve(import.meta.dirname, "..");
const bin = (name) => join(root, "node_modules", ".bin", name);
const RUNTIMES = ["deno", "bun", "node"];

const USAGE =
  `usage: node scripts/bench.mjs [--runtime deno|bun|node|all] [--no-build] [suite options]
  --runtime LIST   runtimes to run the suite on, one after the other (default deno)
  --no-build       Node: use the existing npm/ build instead of rebuilding it
  suite options: see \`node scripts/bench.mjs -- --help\``;

function parse(argv) {
  let runtimes = ["deno"];
  let build = true;
  const rest = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--runtime" || a.startsWith("--runtime=")) {
      const v = a.includes("=") ? a.slice(a.indexOf("=") + 1) : argv[++i];
      const list = v === "all" ? RUNTIMES : (v ?? "").split(",").filter(Boolean);
      const bad = list.filter((r) => !RUNTIMES.includes(r));
      if (!list.length || bad.length) {
        process.stderr.write(`bench: unknown runtime ${bad.join(", ") || "(none)"}\n${USAGE}\n`);
        process.exit(2);
      }
      runtimes = [...new Set(list)];
    } else if (a === "--no-build") build = false;
    else if (a === "--") rest.push(...argv.slice(i + 1)), i = argv.length;
    else if (a === "-h" || a === "--help") {
      process.stdout.write(`${USAGE}\n`);
      process.exit(0);
    } else rest.push(a);
  }
  return { runtimes, build, rest };
}

/** Set by SIGINT or SIGTERM: the running suite gets the signal, no further one starts. */
let interrupted = false;

/** Runs a command with inherited output; resolves to its exit code. */
function run(cmd, args) {
  const child = spawn(cmd, args, { cwd: root, stdio: "inherit" });
  const forward = (sig) => {
    interrupted = true;
    child.kill(sig);
  };
  process.on("SIGINT", forward);
  process.on("SIGTERM", forward);
  return new Promise((res) => {
    const done = (code) => {
      process.off("SIGINT", forward);
      process.off("SIGTERM", forward);
      res(code);
    };
    child.on("error", (err) => {
      process.stderr.write(`bench: cannot run ${cmd}: ${err.message}\n`);
      done(1);
    });
    child.on("exit", (code, signal) => done(code ?? (signal ? 128 : 1)));
  });
}

const { runtimes, build, rest } = parse(process.argv.slice(2));
// Node runs the npm build; so does a cold start on Node from another runtime.
const coldOnNode = rest.some((a, i) =>
  (a === "--cold-start" && /\b(node|all)\b/.test(rest[i + 1] ?? "")) ||
  /^--cold-start=.*\b(node|all)\b/.test(a)
);
if (build && (runtimes.includes("node") || coldOnNode)) {
  process.stdout.write("bench: building the npm package (scripts/build_npm.mjs)\n");
  const code = await run(process.execPath, [join(root, "scripts", "build_npm.mjs")]);
  if (code !== 0 || interrupted) {
    process.stderr.write("bench: the npm build failed\n");
    process.exit(1);
  }
}

const summary = [];
for (const rt of runtimes) {
  if (interrupted) break;
  const [cmd, args] = rt === "deno"
    ? [bin("deno"), ["run", "-A", "bench/main.ts", ...rest]]
    : rt === "bun"
    ? [bin("bun"), ["run", "bench/main.ts", ...rest]]
    : [process.execPath, ["npm/bench/main.js", ...rest]];
  process.stdout.write(
    `\n== bench on ${rt}: ${[cmd.replace(root + "/", ""), ...args].join(" ")}\n`,
  );
  const started = Date.now();
  const code = await run(cmd, args);
  const seconds = ((Date.now() - started) / 1000).toFixed(1);
  summary.push(`${rt.padEnd(5)} ${code === 0 ? "ok" : `FAILED (status ${code})`} in ${seconds} s`);
}
process.stdout.write(`\n${summary.join("\n")}\n`);
process.exit(summary.some((s) => s.includes("FAILED")) ? 1 : 0);
