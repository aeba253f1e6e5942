#!/usr/bin/env node
// Idempotent set-up for a fresh clone: npm dependencies (deno and bun among
// them) and a nats-server >= 2.10. Quiet when there is nothing to do.
// Plain Node on purpose: it runs before anything else is installed.
import { execFileSync, spawnSync } from "node:child_process";
import { existsSync, mkdirSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";

const root = resolve(import.meta.dirname, "..");
const cache = join(root, ".cache");
const MIN = [2, 10];

function log(msg) {
  process.stderr.write(`setup: ${msg}\n`);
}

function ensureNpmDeps() {
  const bins = ["deno", "bun", "tsc"].map((b) => join(root, "node_modules", ".bin", b));
  if (bins.every((b) => existsSync(b))) return;
  log("installing npm dependencies");
  const args = existsSync(join(root, "package-lock.json")) ? ["ci"] : ["install"];
  const r = spawnSync("npm", [
    ...args,
    "--no-audit",
    "--no-fund",
    "--loglevel=error",
  ], {
    cwd: root,
    stdio: ["ignore", "inherit", "inherit"],
  });
  if (r.status !== 0) {
    throw new Error(`npm ${args[0]} failed with status ${r.status}`);
  }
}

/** Returns the version of a nats-server binary as [major, minor, patch], or null. */
function versionOf(bin) {
  const r = spawnSync(bin, ["--version"], { encoding: "utf8" });
  if (r.status !== 0) return null;
  const m = /v?(\d+)\.(\d+)\.(\d+)/.exec(r.stdout + r.stderr);
  return m ? m.slice(1).map(Number) : null;
}

function recentEnough(v) {
  return v !== null && (v[0] > MIN[0] || (v[0] === MIN[0] && v[1] >= MIN[1]));
}

export function cachedNatsServer() {
  return join(cache, "nats-server", "usr", "sbin", "nats-server");
}

function onPath() {
  const r = spawnSync("sh", ["-c", "command -v nats-server"], {
    encoding: "utf8",
  });
  return r.status === 0 ? r.stdout.trim() : null;
}

/**
 * Fetches nats-server from a newer Debian suite with a private apt
 * configuration, so the machine's own apt state is left alone.
 */
function fetchFromDebian() {
  const work = join(cache, "apt");
  const out = join(cache, "nats-server");
  rmSync(work, { recursive: true, force: true });
  for (const d of ["lists/partial", "cache/archives/partial", "dl"]) {
    mkdirSync(join(work, d), { recursive: true });
  }
  const keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
  const uri = "http://deb.debian.org/debian";
  for (const suite of ["trixie", "sid"]) {
    const sources = join(work, "sources.list");
    writeFileSync(sources, `deb [signed-by=${keyring}] ${uri} ${suite} main\n`);
    const opts = [
      `-oDir::Etc::SourceList=${sources}`,
      "-oDir::Etc::SourceParts=/dev/null",
      `-oDir::State::Lists=${join(work, "lists")}`,
      `-oDir::Cache=${join(work, "cache")}`,
      "-oDir::State::Status=/dev/null",
      "-oDebug::NoLocking=1",
      "-oAPT::Sandbox::User=root",
      "-qq",
    ];
    log(`fetching nats-server from Debian ${suite}`);
    const up = spawnSync("apt-get", [...opts, "update"], { stdio: "ignore" });
    if (up.status !== 0) continue;
    const dl = spawnSync("apt-get", [...opts, "download", "nats-server"], {
      cwd: join(work, "dl"),
      stdio: "ignore",
    });
    if (dl.status !== 0) continue;
    const deb = readdirSync(join(work, "dl")).find((f) => f.endsWith(".deb"));
    if (!deb) continue;
    rmSync(out, { recursive: true, force: true });
    execFileSync("dpkg", ["-x", join(work, "dl", deb), out]);
    rmSync(work, { recursive: true, force: true });
    if (recentEnough(versionOf(cachedNatsServer()))) return cachedNatsServer();
  }
  throw new Error(
    "no nats-server >= 2.10 found: put one on PATH or set NATS_SERVER_BIN",
  );
}

export function ensureNatsServer() {
  const env = process.env.NATS_SERVER_BIN;
  if (env) {
    if (recentEnough(versionOf(env))) return env;
    throw new Error(`NATS_SERVER_BIN=${env} is not a nats-server >= 2.10`);
  }
  const path = onPath();
  if (path && recentEnough(versionOf(path))) return path;
  if (
    existsSync(cachedNatsServer()) &&
    recentEnough(versionOf(cachedNatsServer()))
  ) {
    return cachedNatsServer();
  }
  return fetchFromDebian();
}

if (import.meta.url === `file://${process.argv[1]}`) {
  try {
    ensureNpmDeps();
    ensureNatsServer();
  } catch (err) {
    log(err instanceof Error ? err.message : String(err));
    process.exit(1);
  }
}
