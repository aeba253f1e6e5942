// examples/shell.ts: a command's output in the run's log, its exit code in the
// result, a bad spec refused, and no process left behind after an abort.
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, readFileSync, realpathSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { InvalidSpecError, PermanentError, startDriver } from "../mod.ts";
import { type ReconcileDecision, reconcileOnce, startTestConveyor } from "../testing.ts";
import { consumerReady, spawnProgram } from "../test_util.ts";
import { KILL_GRACE_MS, shell } from "./shell.ts";

const quiet = { handleSignals: false, configureLogging: false } as const;

/** Whether process `pid` runs: exists and is not a zombie waiting to be reaped. */
function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2)[0] !== "Z";
  } catch {
    return true; // no /proc (macOS): kill(pid, 0) said it exists
  }
}

/** Waits until none of `pids` runs; fails after `timeout` ms naming those left. */
async function allGone(pids: number[], timeout = 5_000): Promise<void> {
  const end = Date.now() + timeout;
  while (pids.some(alive) && Date.now() < end) await new Promise((r) => setTimeout(r, 25));
  assert.deepEqual(pids.filter(alive), [], "processes left running");
}

async function until<T>(check: () => T | undefined, what: string, timeout = 10_000) {
  const end = Date.now() + timeout;
  for (;;) {
    const value = check();
    if (value !== undefined) return value;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe("examples/shell.ts", () => {
  it("logs stdout at info and stderr at warn, line by line in order, and succeeds on exit 0", async () => {
    const script = "echo one; echo two >&2; printf 'three\\r\\nfour\\n'; echo five >&2; printf six";
    const { result, logs, decision } = await reconcileOnce(shell, {
      name: "lines",
      spec: { command: ["sh", "-c", script] },
    });
    assert.deepEqual(decision, { action: "ack" });
    assert.deepEqual(result, {
      success: true,
      message: "exited with code 0",
      data: { exitCode: 0, signal: null },
    });
    const of = (stream: string) =>
      logs.filter((l) => l.labels.stream === stream).map((l) => [l.level, l.message]);
    assert.deepEqual(of("stdout"), [
      ["info", "one"],
      ["info", "three"],
      ["info", "four"],
      ["info", "six"],
    ]);
    assert.deepEqual(of("stderr"), [["warning", "two"], ["warning", "five"]]);
    assert.equal(logs.length, 6);
  });

  it("runs in cwd with env added to the driver's own, less its NATS and Conveyor variables", async () => {
    const dir = realpathSync(mkdtempSync(join(tmpdir(), "shell-example-")));
    process.env.CONVEYOR_EXAMPLE_SECRET = "do not pass on";
    try {
      const { result, logs } = await reconcileOnce(shell, {
        name: "env",
        spec: {
          command: [
            "sh",
            "-c",
            'pwd; echo "$GREETING"; echo "secret=${CONVEYOR_EXAMPLE_SECRET-unset}"; ' +
            'test -n "$PATH" && echo path',
          ],
          cwd: dir,
          env: { GREETING: "hello" },
        },
      });
      assert.equal(result?.success, true);
      assert.deepEqual(logs.map((l) => l.message), [dir, "hello", "secret=unset", "path"]);
    } finally {
      delete process.env.CONVEYOR_EXAMPLE_SECRET;
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("reports a failing exit code as a failure, with the code", async () => {
    const { result, logs, decision } = await reconcileOnce(shell, {
      name: "fails",
      spec: { command: ["sh", "-c", "echo broken >&2; exit 3"] },
    });
    assert.deepEqual(decision, { action: "ack" });
    assert.deepEqual(result, {
      success: false,
      message: "exited with code 3",
      data: { exitCode: 3, signal: null },
    });
    assert.deepEqual(logs.map((l) => [l.level, l.message]), [["warning", "broken"]]);
  });

  it("refuses a bad spec (an empty command) as a permanent failure, running nothing", async () => {
    for (const spec of [{ command: [] }, { command: [""] }, { command: "ls" }, {}]) {
      const { result, decision, logs } = await reconcileOnce(shell, { name: "bad", spec });
      assert.equal(decision.action, "terminate", JSON.stringify(spec));
      const error = (decision as Extract<ReconcileDecision, { action: "terminate" }>).error;
      assert.ok(error instanceof InvalidSpecError && error instanceof PermanentError);
      assert.equal(result?.success, false);
      assert.match(result!.message, /^resource spec does not fit the driver's schema: command: /);
      assert.deepEqual(logs, []);
    }
  });

  it("fails a program that does not exist at once, without retries", async () => {
    const { result, decision } = await reconcileOnce(shell, {
      name: "missing",
      spec: { command: ["./no-such-program-here"] },
    });
    assert.equal(decision.action, "terminate");
    assert.ok((decision as { error?: unknown }).error instanceof PermanentError);
    assert.match(result!.message, /^cannot run \.\/no-such-program-here: /);
  });

  it("stops the command and its children after timeoutMs, reporting a failure", async () => {
    const started = Date.now();
    const { result } = await reconcileOnce(shell, {
      name: "slow",
      spec: { command: ["sleep", "30"], timeoutMs: 100 },
    });
    assert.deepEqual(result, {
      success: false,
      message: "timed out after 100 ms",
      data: { exitCode: null, signal: "SIGTERM", timedOut: true },
    });
    assert.ok(Date.now() - started < 5_000);
  });

  it("on abort kills the whole process group, SIGKILL for what ignores SIGTERM, and rejects with the reason", async () => {
    const dir = mkdtempSync(join(tmpdir(), "shell-example-"));
    const pidFile = join(dir, "pids");
    const ac = new AbortController();
    try {
      // The shell and its two children ignore SIGTERM (the trap is inherited).
      const pending = reconcileOnce(shell, {
        name: "stubborn",
        spec: {
          command: [
            "sh",
            "-c",
            `trap '' TERM; sleep 30 & echo $! >> ${pidFile}; sleep 30 & echo $! >> ${pidFile}; ` +
            `echo $$ >> ${pidFile}; wait`,
          ],
        },
      }, { signal: ac.signal });
      const pids = await until(() => {
        const lines = existsSync(pidFile) ? readFileSync(pidFile, "utf8").trim().split("\n") : [];
        return lines.length === 3 ? lines.map(Number) : undefined;
      }, "the command's pids");
      assert.ok(pids.every(alive));
      const reason = new Error("shutting down");
      const aborted = Date.now();
      ac.abort(reason);
      const { result, decision } = await pending;
      const took = Date.now() - aborted;
      assert.equal(result, undefined);
      assert.equal(decision.action, "handBack");
      assert.equal((decision as { error?: unknown }).error, reason);
      assert.ok(took >= KILL_GRACE_MS - 50 && took < 3_000, `returned after ${took} ms`);
      await allGone(pids);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("runs under the real runtime: lines and result through NATS, children gone after a shutdown aborts it", async () => {
    await using conveyor = await startTestConveyor();
    const running = await startDriver(shell, {
      ...quiet,
      servers: conveyor.url,
      shutdownTimeout: 200,
    });
    try {
      const ok = await conveyor.emit({
        resource: "shell",
        name: "hello",
        spec: { command: ["sh", "-c", "echo hello; echo world"] },
      });
      const { driverresult } = await conveyor.waitForResult(ok.message.run_id);
      assert.deepEqual(
        { ...driverresult },
        {
          success: true,
          message: "exited with code 0",
          data: { exitCode: 0, signal: null },
          driver: "shell",
        },
      );
      const lines: string[] = [];
      for await (const line of conveyor.logs(ok.message.run_id)) {
        if (lines.push(line.message) === 2) break;
      }
      assert.deepEqual(lines, ["hello", "world"]);

      // A job still running when the driver shuts down: ctx.signal aborts.
      const long = await conveyor.emit({
        resource: "shell",
        name: "long",
        spec: { command: ["sh", "-c", "sleep 30 & echo $!; sleep 30 & echo $!; wait"] },
      });
      const pids: number[] = [];
      for await (const line of conveyor.logs(long.message.run_id)) {
        if (pids.push(Number(line.message)) === 2) break;
      }
      assert.ok(pids.every(alive));
      await running.stop();
      await allGone(pids);
      assert.equal(running.stats().requeued, 1, "the event handed back, unfinished");
    } finally {
      await running.stop();
    }
  });

  it("serves the driver when run as a program, from NATS_URL", async () => {
    await using conveyor = await startTestConveyor();
    await using program = spawnProgram("examples/shell", { NATS_URL: conveyor.url }, {
      stderr: "capture",
    });
    await consumerReady(conveyor.url, "shell");
    const e = await conveyor.emit({
      resource: "shell",
      name: "program",
      spec: { command: ["sh", "-c", "exit 7"] },
    });
    const { driverresult } = await conveyor.waitForResult(e.message.run_id, { timeout: 30_000 });
    assert.equal(driverresult.message, "exited with code 7", program.err);
  });
});
