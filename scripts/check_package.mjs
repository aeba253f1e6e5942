// Checks the npm package as a user gets it (run after scripts/build_npm.mjs);
// besides the two checks below, publint and @arethetypeswrong/cli must be
// clean, and the packed and unpacked sizes are printed:
// 1. engines: every runtime dependency, transitively, as package-lock.json
//    installs it (nested copies included), declares an `engines.node` that
//    admits every Node version the package claims (`engines.node` in
//    package.json, a ">=X.Y.Z" range); and so does every one a user
//    installing the packed package today gets (npm resolves it from the
//    registry into a lock file; skipped, saying so, when it cannot be reached);
// 2. types: a consumer project in a temporary directory, laid out as npm
//    installs the package (the published files of npm/ and copies of the
//    runtime dependencies as locked, so that none of our devDependencies,
//    @types/node among them, can be found), with the minimal tsconfig (module
//    and moduleResolution nodenext, strict, noEmit: no "lib", no "types", no
//    skipLibCheck), a second one importing the main entry point alone, and a
//    third with @types/node, type-checks with TypeScript 5 (our
//    devDependency) and TypeScript 7 (installed into .cache/ts7 on first
//    use; skipped, saying so, when the npm registry cannot be reached).
// Exits 1 with the reasons when a check fails.
//
//   node scripts/check_package.mjs             every check
//   node scripts/check_package.mjs --engines   the engines check alone (no build needed)
//
// CONVEYOR_TS7_DIR=DIR installs and takes TypeScript 7 from DIR instead of .cache/ts7.
import { spawnSync } from "node:child_process";
import {
  cpSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const problems = [];
const say = (line) => process.stdout.write(line + "\n");
const enginesOnly = process.argv.includes("--engines");
const npm = process.platform === "win32" ? "npm.cmd" : "npm";
/** A path as the messages show it: relative to the repository when inside it. */
const shown = (path) => (relative(root, path).startsWith("..") ? path : relative(root, path));

// --- engines ---------------------------------------------------------------

const pkg = JSON.parse(readFileSync(join(root, "package.json"), "utf8"));
const lock = JSON.parse(readFileSync(join(root, "package-lock.json"), "utf8"));
const claimed = minimum(pkg.engines?.node ?? "");
if (!claimed) {
  problems.push(
    `package.json engines.node ${JSON.stringify(pkg.engines?.node)} is not ">=X[.Y[.Z]]"`,
  );
}
const lockedDeps = lock.packages[""]?.dependencies ?? {};
for (const name of new Set([...Object.keys(pkg.dependencies ?? {}), ...Object.keys(lockedDeps)])) {
  if (pkg.dependencies?.[name] !== lockedDeps[name]) {
    problems.push(
      `package-lock.json is out of date: dependency ${name} is ${
        JSON.stringify(pkg.dependencies?.[name])
      } in package.json, ${JSON.stringify(lockedDeps[name])} in the lock file (run npm install)`,
    );
  }
}
/** Lock-file keys of the runtime dependencies, transitively ("node_modules/a/node_modules/b"). */
const runtime = checkEngines(lock, "", "package-lock.json");

/**
 * Checks the engines.node of every runtime dependency of the package at
 * `top` ("" for ours) in `lockFile`, printing each one unless `quiet`;
 * returns their lock-file keys.
 */
function checkEngines(lockFile, top, what, quiet = false) {
  const closure = runtimeClosure(lockFile, top, what);
  const sorted = [...closure].map((key) => [key, label(lockFile, key)]).sort((a, b) =>
    a[1].localeCompare(b[1])
  );
  const width = Math.max(...sorted.map(([, l]) => l.length));
  for (const [key, name] of sorted) {
    const range = lockFile.packages[key].engines?.node;
    if (!quiet) say(`engines: ${name.padEnd(width)}  node ${range ?? "(any: no engines.node)"}`);
    if (range === undefined || !claimed) continue;
    const needs = minimum(range);
    if (!needs) problems.push(`${name} (${what}): engines.node "${range}" is not understood`);
    else if (compare(needs, claimed) > 0) {
      problems.push(
        `${name} (${what}) needs Node ${range}, but the package claims ${pkg.engines.node}`,
      );
    }
  }
  say(
    `engines: ${closure.size} runtime dependencies (${what}) checked against node ${pkg.engines?.node}`,
  );
  return closure;
}

/**
 * The runtime dependencies of the package at `top` as the lock file installs
 * them: its dependencies, each package's dependencies, optional dependencies
 * (when installed) and peer dependencies (but optional ones, which npm does
 * not install), found as Node finds them (the nearest node_modules first).
 */
function runtimeClosure(lockFile, top, what) {
  const seen = new Set();
  const queue = Object.keys(lockFile.packages[top]?.dependencies ?? {}).map((name) => [
    top,
    name,
    "required",
  ]);
  while (queue.length > 0) {
    const [from, name, how] = queue.shift();
    const key = locate(lockFile, from, name);
    if (!key) {
      if (how === "required") {
        problems.push(`${name} (needed by ${from || "the package"}) is not in ${what}`);
      }
      continue;
    }
    if (seen.has(key)) continue;
    seen.add(key);
    const entry = lockFile.packages[key];
    if (entry.link) problems.push(`${key} is a link (${entry.resolved}): not a published package`);
    for (const dep of Object.keys(entry.dependencies ?? {})) queue.push([key, dep, "required"]);
    for (const dep of Object.keys(entry.optionalDependencies ?? {})) {
      queue.push([key, dep, "optional"]);
    }
    // npm installs a peer dependency unless it is optional (valibot's typescript).
    for (const dep of Object.keys(entry.peerDependencies ?? {})) {
      if (!entry.peerDependenciesMeta?.[dep]?.optional) queue.push([key, dep, "required"]);
    }
  }
  return seen;
}

/** The lock-file key that `require(name)` from the package at `from` ("" for the root) finds. */
function locate(lockFile, from, name) {
  for (let dir = from;;) {
    const key = `${dir === "" ? "" : `${dir}/`}node_modules/${name}`;
    if (lockFile.packages[key]) return key;
    if (dir === "") return undefined;
    const up = dir.lastIndexOf("/node_modules/");
    dir = up < 0 ? "" : dir.slice(0, up);
  }
}

/** "name@version", with the packages it is nested under for a nested copy. */
function label(lockFile, key) {
  const names = key.split(/(?:^|\/)node_modules\//).filter(Boolean);
  const nested = names.length > 1 ? ` (under ${names.slice(0, -1).join(" > ")})` : "";
  return `${names.at(-1)}@${lockFile.packages[key].version}${nested}`;
}

/** [major, minor, patch] of a ">=X", ">= X.x", ">=X.Y.Z" range; undefined otherwise. */
function minimum(range) {
  const m = /^\s*>=\s*v?(\d+)(?:\.(\d+|x))?(?:\.(\d+|x))?\s*$/.exec(range);
  if (!m) return undefined;
  return [m[1], m[2], m[3]].map((p) => (p === undefined || p === "x" ? 0 : Number(p)));
}

function compare(a, b) {
  for (let i = 0; i < 3; i++) if (a[i] !== b[i]) return a[i] - b[i];
  return 0;
}

// --- types -----------------------------------------------------------------

const npmDir = join(root, "npm");
if (enginesOnly) {
  // The rest needs the build.
} else if (!existsSync(join(npmDir, "package.json"))) {
  problems.push("npm/ is not built: run node scripts/build_npm.mjs first");
} else {
  inTempDir("conveyor-dts-", checkTypes);
}

/** Runs `fn` with a new temporary directory, removed afterwards. */
function inTempDir(prefix, fn) {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  try {
    fn(dir);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Lays out a consumer project in `dir` and type-checks it with TypeScript 5 and 7. */
function checkTypes(dir) {
  // The package as npm installs it: its published files, its dependencies as
  // locked (each package's own directory: nested copies have keys of their own).
  const built = JSON.parse(readFileSync(join(npmDir, "package.json"), "utf8"));
  const installed = join(dir, "node_modules", "@conveyor", "driver");
  for (const file of ["package.json", ...built.files]) {
    cpSync(join(npmDir, file), join(installed, file), { recursive: true });
  }
  const copy = (key) =>
    cpSync(join(root, key), join(dir, key), {
      recursive: true,
      filter: (src) => !src.slice(join(root, key).length).includes("/node_modules"),
    });
  for (const key of runtime) copy(key);
  // @types/node for the third project, in a folder of its own so that the
  // first two cannot see it (TypeScript 5 would include it by default).
  const typesNode = join(dir, "with-node");
  for (const key of ["node_modules/@types/node", "node_modules/undici-types"]) {
    if (!lock.packages[key]) continue;
    cpSync(join(root, key), join(typesNode, key), { recursive: true });
  }
  writeFileSync(join(dir, "package.json"), '{ "private": true, "type": "module" }\n');
  const minimal = { module: "nodenext", moduleResolution: "nodenext", strict: true, noEmit: true };
  const projects = [
    // Every entry point, and `await using` on what they return.
    ["tsconfig.json", { compilerOptions: minimal, files: ["main.ts"] }],
    // The main entry point alone: it must bring in what its declarations need.
    ["tsconfig.mod.json", { compilerOptions: minimal, files: ["only_mod.ts"] }],
    // The client entry in a Web project, as an edge bundler sees it: the DOM
    // library, no Node types at all.
    [
      "tsconfig.client.json",
      {
        compilerOptions: {
          module: "esnext",
          moduleResolution: "bundler",
          target: "es2022",
          lib: ["es2022", "dom", "dom.iterable"],
          types: [],
          strict: true,
          noEmit: true,
        },
        files: ["only_client.ts"],
      },
    ],
    // A Node project with @types/node, whose declarations of the disposable
    // symbols must agree with the package's.
    [
      "tsconfig.node.json",
      {
        compilerOptions: {
          ...minimal,
          types: ["node"],
          typeRoots: ["./with-node/node_modules/@types"],
        },
        files: ["main.ts", "node.ts"],
      },
    ],
  ];
  for (const [name, config] of projects) {
    writeFileSync(join(dir, name), JSON.stringify(config, null, 2) + "\n");
  }
  writeFileSync(
    join(dir, "main.ts"),
    `import * as v from "valibot";
import {
  Client,
  defineDriver,
  type Driver,
  InvalidSpecError,
  type RunningDriver,
  serve,
  startDriver,
} from "@conveyor/driver";
import { reconcileOnce, startTestConveyor } from "@conveyor/driver/testing";
import { startDev } from "@conveyor/driver/dev";

const typed = defineDriver({
  name: "typed",
  resources: ["app"],
  spec: v.object({ image: v.string() }),
  reconcile: ({ resource }) => ({ success: true, message: resource.spec.image.toUpperCase() }),
});
const plain: Driver = { name: "plain", resources: ["app"], reconcile() {} };

export async function main(): Promise<void> {
  await using conveyor = await startTestConveyor();
  await using running = await startDriver(typed, { servers: conveyor.url, handleSignals: false });
  const { decision } = await reconcileOnce(plain, { name: "web" });
  const failed: boolean = decision.action === "terminate" &&
    decision.error instanceof InvalidSpecError;
  console.log(failed, running.stats().received, await new Client().health());
  await using dev = await startDev({ port: 4222 });
  console.log(dev.url);
  const disposable: AsyncDisposable = running;
  const dispose: () => PromiseLike<void> = running[Symbol.asyncDispose];
  console.log(disposable, dispose);
  await serve(plain);
}

export const stopLater = (r: RunningDriver): Promise<void> => r.stop();
`,
  );
  writeFileSync(
    join(dir, "only_mod.ts"),
    `import { type Driver, startDriver } from "@conveyor/driver";
const d: Driver = { name: "d", resources: ["app"], reconcile() {} };
export const stop = async (): Promise<void> => await (await startDriver(d)).stop();
`,
  );
  writeFileSync(
    join(dir, "only_client.ts"),
    `import { Client, ConveyorApiError, createIdentity } from "@conveyor/driver/client";
export async function handle(request: Request, pem: { cert: string; key: string }): Promise<Response> {
  const api = new Client({ baseUrl: "https://conveyor.example", auth: await createIdentity(pem) });
  try {
    const { runid } = await api.createResource({ name: "web", resource: "app", spec: {} });
    for await (const line of api.streamPipelineLogs({ runId: runid, signal: request.signal })) {
      console.log(line.message);
    }
    return Response.json({ runid });
  } catch (err) {
    if (err instanceof ConveyorApiError) return new Response(err.message, { status: 502 });
    throw err;
  }
}
`,
  );
  writeFileSync(
    join(dir, "node.ts"),
    `import { setTimeout as sleep } from "node:timers/promises";
export const later: Promise<void> = sleep(1);
`,
  );
  typecheck("TypeScript 5", join(root, "node_modules", ".bin", "tsc"), dir, projects);
  const ts7 = ensureTs7();
  if (ts7) typecheck("TypeScript 7", ts7, dir, projects);
}

function typecheck(what, tsc, dir, projects) {
  const version = spawnSync(tsc, ["--version"], { encoding: "utf8" }).stdout.trim();
  for (const [config] of projects) {
    const r = spawnSync(tsc, ["-p", join(dir, config)], { encoding: "utf8", cwd: dir });
    if (r.status === 0) {
      say(`types: ${what} (${version}) accepts the declarations (${config}, no skipLibCheck)`);
    } else {
      problems.push(
        `${what} (${version}, ${config}) rejects the declarations:\n${r.stdout}${r.stderr}${
          r.error ? r.error.message : ""
        }`,
      );
    }
  }
}

/**
 * The tsc of TypeScript 7, installed into .cache/ts7 on first use; undefined,
 * saying so, when the npm registry cannot be reached. Any other failure to
 * install it is a problem.
 */
function ensureTs7() {
  const dir = process.env.CONVEYOR_TS7_DIR || join(root, ".cache", "ts7");
  const tsc = join(dir, "node_modules", ".bin", "tsc");
  const major = () =>
    /Version (\d+)/.exec(spawnSync(tsc, ["--version"], { encoding: "utf8" }).stdout ?? "")?.[1];
  if (existsSync(tsc) && major() === "7") return tsc;
  say(`types: installing typescript@7 into ${shown(dir)}`);
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, "package.json"), '{ "private": true }\n');
  const r = spawnSync(npm, [
    "install",
    "--no-audit",
    "--no-fund",
    "--loglevel=error",
    "--fetch-retries=1",
    "--fetch-timeout=60000",
    "typescript@7",
  ], { cwd: dir, encoding: "utf8" });
  if (r.status === 0 && existsSync(tsc) && major() === "7") return tsc;
  const output = `${r.stdout ?? ""}${r.stderr ?? ""}${r.error?.message ?? ""}`.trim();
  if (unreachable(output)) {
    say(
      `types: TypeScript 7 SKIPPED: the npm registry cannot be reached to install typescript@7 (${
        unreachable(output)
      })`,
    );
    return undefined;
  }
  problems.push(
    `cannot install typescript@7 into ${shown(dir)} (npm exit ${r.status}):\n${output}`,
  );
  return undefined;
}

/** npm's line saying that the registry cannot be reached, if `output` has one. */
function unreachable(output) {
  const code =
    /\b(?:ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ENETUNREACH|EHOSTUNREACH)\b/;
  return output.split("\n").find((line) => code.test(line));
}

// --- engines of a fresh install ----------------------------------------------

// The lock file holds the versions we test; a user installing the package
// today gets the newest ones in its ranges. npm resolves them from the registry
// for the packed package (a lock file only: nothing is downloaded but metadata),
// and the same engines check runs on that. Skipped, saying so, when the
// registry cannot be reached.
if (!enginesOnly && existsSync(join(npmDir, "package.json"))) {
  inTempDir("conveyor-fresh-", checkFreshInstall);
}

function checkFreshInstall(dir) {
  const packed = spawnSync(npm, ["pack", "--json", "--pack-destination", dir], {
    cwd: npmDir,
    encoding: "utf8",
  });
  let tarball;
  try {
    tarball = JSON.parse(packed.stdout)[0].filename;
  } catch {
    problems.push(`npm pack failed:\n${packed.stdout}${packed.stderr}`);
    return;
  }
  writeFileSync(join(dir, "package.json"), '{ "private": true }\n');
  const r = spawnSync(npm, [
    "install",
    "--package-lock-only",
    "--ignore-scripts",
    "--no-audit",
    "--no-fund",
    "--loglevel=error",
    "--fetch-retries=1",
    "--fetch-timeout=60000",
    `./${tarball}`,
  ], { cwd: dir, encoding: "utf8" });
  const output = `${r.stdout ?? ""}${r.stderr ?? ""}${r.error?.message ?? ""}`.trim();
  if (r.status !== 0) {
    if (unreachable(output)) {
      say(
        `engines: fresh install SKIPPED: the npm registry cannot be reached (${
          unreachable(output)
        })`,
      );
    } else problems.push(`npm could not resolve a fresh install of the package:\n${output}`);
    return;
  }
  const fresh = JSON.parse(readFileSync(join(dir, "package-lock.json"), "utf8"));
  const top = "node_modules/@conveyor/driver";
  const keys = checkEngines(fresh, top, "a fresh install from the registry", true);
  const locked = new Map(
    [...runtime].map((k) => [k.split(/(?:^|\/)node_modules\//).at(-1), lock.packages[k].version]),
  );
  const changed = [...keys].filter((k) =>
    locked.get(k.split(/(?:^|\/)node_modules\//).at(-1)) !== fresh.packages[k].version
  ).map((k) => label(fresh, k));
  say(
    `engines: a fresh install resolves ${
      changed.length
        ? `versions other than package-lock.json's: ${changed.join(", ")}`
        : "the versions of package-lock.json"
    }`,
  );
}

// --- lint and size ---------------------------------------------------------

if (!enginesOnly && existsSync(join(npmDir, "package.json"))) {
  const bin = (name) => join(root, "node_modules", ".bin", name);
  // publint: package.json fields, exports and files as npm and bundlers read them.
  const lint = spawnSync(bin("publint"), ["--strict", npmDir], { encoding: "utf8", cwd: npmDir });
  if (lint.status === 0) say("publint: clean (strict)");
  else problems.push(`publint reports problems:\n${lint.stdout}${lint.stderr}`);
  // Are the types wrong: every entry point resolves to its types under node16
  // (ESM) and bundlers. The package is ESM only, so CJS resolution is ignored.
  const attw = spawnSync(bin("attw"), [
    "--pack",
    npmDir,
    "--profile",
    "esm-only",
    "--format",
    "table-flipped",
  ], {
    encoding: "utf8",
    cwd: npmDir,
  });
  if (attw.status === 0) say("attw: no problems (profile esm-only)");
  else problems.push(`@arethetypeswrong/cli reports problems:\n${attw.stdout}${attw.stderr}`);
  const pack = spawnSync(npm, [
    "pack",
    "--dry-run",
    "--json",
  ], {
    encoding: "utf8",
    cwd: npmDir,
  });
  try {
    const [info] = JSON.parse(pack.stdout);
    say(
      `size: ${info.filename} packs to ${info.size} bytes, ${info.unpackedSize} unpacked, ` +
        `${info.entryCount} files`,
    );
  } catch {
    problems.push(`npm pack --dry-run failed:\n${pack.stderr}`);
  }
}

if (problems.length > 0) {
  for (const p of problems) process.stderr.write(`check_package: ${p}\n`);
  process.exit(1);
}
say("check_package: ok");
