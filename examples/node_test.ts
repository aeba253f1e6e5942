// examples/node/driver.mjs, the plain-JavaScript driver, run with `node`
// against the npm package: the build (npm/) packed with `npm pack` and
// installed, with its dependencies, into a temporary project. Runs
// in the Node stage (`node scripts/build_npm.mjs --test`), which builds npm/
// first; on Deno and Bun it is skipped.
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import {
  copyFileSync,
  existsSync,
  lstatSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { startTestConveyor } from "../testing.ts";
import { consumerReady } from "../test_util.ts";

/** npm/ when this runs as npm/examples/node_test.js. */
const npmDir = fileURLToPath(new URL("../", import.meta.url));
const source = fileURLToPath(new URL("../../examples/node/driver.mjs", import.meta.url));

function whySkip(): string | false {
  if ("Deno" in globalThis || "Bun" in globalThis) {
    return "runs on Node only, against the npm build (the Node stage)";
  }
  const pkg = join(npmDir, "package.json");
  if (!existsSync(pkg) || JSON.parse(readFileSync(pkg, "utf8")).name !== "@conveyor/driver") {
    return `no npm build at ${npmDir}: run it with node scripts/build_npm.mjs --test`;
  }
  if (!existsSync(source)) return `${source} not found`;
  return false;
}
const skip = whySkip();
// Deno and Bun do not print a skip reason (Node does): say it once here.
if (skip) console.warn(`node_test: skipping examples/node/driver.mjs: ${skip}`);

describe("examples/node/driver.mjs", () => {
  it("runs with plain node on the npm package: results, a failure, SIGTERM", { skip }, async () => {
    await using conveyor = await startTestConveyor();
    const dir = mkdtempSync(join(tmpdir(), "conveyor-node-example-"));
    // The package as users get it: the `npm pack` tarball, installed with its
    // dependencies into a project of its own (not the build directory linked).
    const npm = process.platform === "win32" ? "npm.cmd" : "npm";
    const packed = spawnSync(npm, ["pack", "--silent", "--pack-destination", dir], {
      cwd: npmDir,
      encoding: "utf8",
    });
    assert.equal(packed.status, 0, `npm pack failed: ${packed.stderr}`);
    const tarball = join(dir, packed.stdout.trim().split("\n").at(-1)!);
    writeFileSync(join(dir, "package.json"), '{ "private": true, "type": "module" }\n');
    const installed = spawnSync(
      npm,
      ["install", "--no-audit", "--no-fund", "--silent", "--prefer-offline", tarball],
      { cwd: dir, encoding: "utf8" },
    );
    assert.equal(installed.status, 0, `npm install of ${tarball} failed: ${installed.stderr}`);
    assert.ok(
      !lstatSync(join(dir, "node_modules", "@conveyor", "driver")).isSymbolicLink(),
      "installed from the tarball, not linked",
    );
    const program = join(dir, "driver.mjs");
    copyFileSync(source, program);
    const child = spawn(process.execPath, [program], {
      cwd: dir,
      env: { ...process.env, NATS_URL: conveyor.url },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let output = "";
    child.stdout!.on("data", (c) => (output += c));
    child.stderr!.on("data", (c) => (output += c));
    const exited = new Promise<[number | null, string | null]>((r) =>
      child.on("exit", (code, signal) => r([code, signal]))
    );
    try {
      const early = exited.then(([code]) => {
        throw new Error(`node driver.mjs exited (${code}) before consuming: ${output}`);
      });
      early.catch(() => {}); // it exits at the end, on purpose
      await Promise.race([consumerReady(conveyor.url, "node-greeter"), early]);
      const hello = await conveyor.emit({
        resource: "greeting",
        name: "hi",
        spec: { who: "node", shout: true },
      });
      const bad = await conveyor.emit({ resource: "greeting", name: "bad", spec: {} });
      const ok = await conveyor.waitForResult(hello.message.run_id, { timeout: 30_000 });
      assert.deepEqual({ ...ok.driverresult }, {
        success: true,
        message: "HELLO NODE",
        data: { node: process.version },
        driver: "node-greeter",
      }, output);
      const lines = [];
      for await (const line of conveyor.logs(hello.message.run_id)) {
        lines.push(line.message);
        break;
      }
      assert.deepEqual(lines, ["greeting node (attempt 1)"]);
      const failed = await conveyor.waitForResult(bad.message.run_id, { timeout: 30_000 });
      assert.equal(failed.driverresult.success, false);
      assert.equal(failed.driverresult.message, "spec.who must be a non-empty string");

      child.kill("SIGTERM");
      assert.deepEqual(await exited, [0, null], output);
      assert.match(output, /driver node-greeter stopped/);
    } finally {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill("SIGKILL");
        await exited;
      }
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
