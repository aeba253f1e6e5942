// Checks the npm package as a user gets it (run after scripts/build_npm.mjs);
// besides the two checks below, publint and @arethetypeswrong/cli must be
// clean, and the packed and unpacked sizes are printed:
// 1. engines: every runtime dependency, transitively, supports the Node
//    versions the package claims (`engines.node` in package.json);
// 2. types: a consumer project with a minimal tsconfig (module and
//    moduleResolution nodenext, strict, no "lib", no skipLibCheck) that
//    imports every entry point type-checks with TypeScript 5 (our
//    devDependency) and TypeScript 7 (installed into .cache/ts7 on first use;
//    skipped, saying so, when the npm registry cannot be reached).
// Exits 1 with the reasons when a check fails.
import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const problems = [];
const say = (line) => process.stdout.write(line + "\n");

// --- engines ---------------------------------------------------------------

const pkg = JSON.parse(readFileSync(join(root, "package.json"), "utf8"));
const lock = JSON.parse(readFileSync(join(root, "package-lock.json"), "utf8"));
const claimed = minimum(pkg.engines?.node ?? "");
if (!claimed) {
  problems.push(
    `package.json engines.node ${JSON.stringify(pkg.engines?.node)} is not ">=X[.Y[.Z]]"`,
  );
}
const seen = new Set();
const queue = Object.keys(pkg.dependencies ?? {});
while (queue.length > 0) {
  const name = queue.shift();
  if (seen.has(name)) continue;
  seen.add(name);
  const entry = lock.packages[`node_modules/${name}`];
  if (!entry) {
    problems.push(`${name} is not in package-lock.json`);
    continue;
  }
  queue.push(...Object.keys(entry.dependencies ?? {}));
  const range = entry.engines?.node;
  if (range === undefined || !claimed) continue;
  const needs = minimum(range);
  if (!needs) problems.push(`${name}@${entry.version}: engines.node "${range}" is not understood`);
  else if (compare(needs, claimed) > 0) {
    problems.push(
      `${name}@${entry.version} needs Node ${range}, but the package claims ${pkg.engines.node}`,
    );
  }
}
say(`engines: ${seen.size} runtime dependencies checked against node ${pkg.engines?.node}`);

/** [major, minor, patch] of a ">=X", ">= X.x", ">=X.Y.Z" range; undefined otherwise. */
function minimum(range) {
  const m = /^\s*>=\s*(\d+)(?:\.(\d+|x))?(?:\.(\d+|x))?\s*$/.exec(range);
  if (!m) return undefined;
  return [m[1], m[2], m[3]].map((p) => (p === undefined || p === "x" ? 0 : Number(p)));
}

function compare(a, b) {
  for (let i = 0; i < 3; i++) if (a[i] !== b[i]) return a[i] - b[i];
  return 0;
}

// --- types -----------------------------------------------------------------

const npmDir = join(root, "npm");
if (!existsSync(join(npmDir, "package.json"))) {
  problems.push("npm/ is not built: run node scripts/build_npm.mjs first");
} else {
  const consumer = join(root, ".cache", "dts-consumer");
  rmSync(consumer, { recursive: true, force: true });
  mkdirSync(join(consumer, "node_modules", "@conveyor"), { recursive: true });
  symlinkSync(npmDir, join(consumer, "node_modules", "@conveyor", "driver"), "dir");
  writeFileSync(join(consumer, "package.json"), '{ "private": true, "type": "module" }\n');
  // Two projects: every entry point together, and the main one alone (each
  // entry point must bring in what its declarations need by itself).
  for (
    const [config, file] of [["tsconfig.json", "main.ts"], ["tsconfig.mod.json", "only_mod.ts"]]
  ) {
    writeFileSync(
      join(consumer, config),
      JSON.stringify({
        compilerOptions: {
          module: "nodenext",
          moduleResolution: "nodenext",
          strict: true,
          noEmit: true,
          types: [],
        },
        files: [file],
      }),
    );
  }
  // What a user writes, touching each entry point; `await using` needs the
  // disposable lib, which the package's declarations bring in.
  writeFileSync(
    join(consumer, "main.ts"),
    `import * as v from "valibot";
import { Client, defineDriver, type Driver, InvalidSpecError, serve, startDriver } from "@conveyor/driver";
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
  await serve(plain);
}
`,
  );
  writeFileSync(
    join(consumer, "only_mod.ts"),
    `import { type Driver, startDriver } from "@conveyor/driver";
const d: Driver = { name: "d", resources: ["app"], reconcile() {} };
export const stop = async (): Promise<void> => await (await startDriver(d)).stop();
`,
  );
  typecheck("TypeScript 5", join(root, "node_modules", ".bin", "tsc"), consumer);
  const ts7 = ensureTs7();
  if (ts7) typecheck("TypeScript 7", ts7, consumer);
}

function typecheck(what, tsc, dir) {
  const version = spawnSync(tsc, ["--version"], { encoding: "utf8" }).stdout.trim();
  for (const config of ["tsconfig.json", "tsconfig.mod.json"]) {
    const r = spawnSync(tsc, ["-p", join(dir, config)], { encoding: "utf8", cwd: dir });
    if (r.status === 0) {
      say(`types: ${version} accepts the declarations (${config}, no skipLibCheck)`);
    } else {problems.push(
        `${what} (${version}, ${config}) rejects the declarations:\n${r.stdout}${r.stderr}`,
      );}
  }
}

/** The tsc of TypeScript 7, installed into .cache/ts7 on first use; undefined when it cannot be. */
function ensureTs7() {
  const dir = join(root, ".cache", "ts7");
  const tsc = join(dir, "node_modules", ".bin", "tsc");
  const major = () =>
    /Version (\d+)/.exec(spawnSync(tsc, ["--version"], { encoding: "utf8" }).stdout ?? "")?.[1];
  if (existsSync(tsc) && major() === "7") return tsc;
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, "package.json"), '{ "private": true }\n');
  const npm = process.platform === "win32" ? "npm.cmd" : "npm";
  const r = spawnSync(npm, ["install", "--no-audit", "--no-fund", "--silent", "typescript@7"], {
    cwd: dir,
    encoding: "utf8",
  });
  if (r.status === 0 && existsSync(tsc) && major() === "7") return tsc;
  say(
    `types: TypeScript 7 skipped: cannot install typescript@7 from the npm registry (${
      (r.stderr || r.error?.message || "").trim().split("\n")[0]
    })`,
  );
  return undefined;
}

// --- lint and size ---------------------------------------------------------

if (existsSync(join(npmDir, "package.json"))) {
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
  const pack = spawnSync(process.platform === "win32" ? "npm.cmd" : "npm", [
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
