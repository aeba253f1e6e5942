/**
 * A driver that runs a command for each `shell` resource and reports its exit
 * code: a typed spec (valibot, through `defineDriver`), a child process whose
 * output is streamed line by line to the run's log, and cancellation that
 * leaves no process behind.
 *
 *     NATS_URL=nats://127.0.0.1:4222 deno run -A examples/shell.ts
 *     NATS_URL=nats://127.0.0.1:4222 bun run examples/shell.ts
 *     node scripts/build_npm.mjs && NATS_URL=nats://127.0.0.1:4222 node npm/examples/shell.js
 *
 * A resource it runs:
 *
 *     { "name": "unit-tests", "resource": "shell",
 *       "spec": { "command": ["npm", "test"], "cwd": "/src/web", "env": { "CI": "1" },
 *                 "timeoutMs": 600000 } }
 *
 * - `command` is an argv: the program and its arguments, run without a shell
 *   (write `["sh", "-c", "…"]` for one).
 * - stdout lines are logged at info, stderr lines at warn, each labelled
 *   `stream: stdout|stderr`.
 * - The result: `success` when the exit code is 0, `data: { exitCode, signal }`
 *   (and `timedOut: true` when `timeoutMs` passed).
 * - The command runs in its own process group. On `timeoutMs`, on
 *   `ctx.signal` (the runtime's reconcile timeout, a shutdown) and when the
 *   command exits leaving processes behind, the whole group gets SIGTERM, then
 *   SIGKILL after half a second. An aborted reconcile rejects with the
 *   signal's reason, so the runtime retries the event or hands it back.
 * - The command inherits the driver's environment except the `NATS_*` and
 *   `CONVEYOR_*` variables (the driver's own credentials), plus `env`.
 *
 * @module
 */
import { type ChildProcess, spawn } from "node:child_process";
import process from "node:process";
import type { Readable } from "node:stream";
import * as v from "valibot";
import { defineDriver, type DriverLogger, PermanentError, serve } from "../mod.ts";
import { isMain } from "./_main.ts";

/** The spec of a `shell` resource. */
export const ShellSpec = v.object({
  command: v.pipe(
    v.array(v.string()),
    v.minLength(1, "command must name a program to run"),
    v.check((argv) => argv[0] !== "", "command must name a program to run"),
  ),
  cwd: v.optional(v.pipe(v.string(), v.minLength(1))),
  env: v.optional(v.record(v.string(), v.string())),
  timeoutMs: v.optional(v.pipe(v.number(), v.integer(), v.minValue(1))),
});

/** How long a process group gets between SIGTERM and SIGKILL. */
export const KILL_GRACE_MS = 500;
/** Longer output lines are logged in pieces of this many characters. */
const MAX_LINE = 16 * 1024;

export const shell = defineDriver({
  name: "shell",
  resources: ["shell"],
  spec: ShellSpec,
  async reconcile({ resource, logger, signal }) {
    const { command, cwd, env, timeoutMs } = resource.spec; // typed by ShellSpec
    signal.throwIfAborted();
    let child: ChildProcess;
    try {
      child = spawn(command[0], command.slice(1), {
        cwd,
        env: { ...inheritedEnv(), ...env },
        // Its own process group, so that killing -pid reaches its children too.
        detached: true,
        stdio: ["ignore", "pipe", "pipe"],
      });
    } catch (err) {
      throw cannotRun(command[0], err);
    }
    const exited = new Promise<{ code: number | null; signal: string | null }>(
      (resolve, reject) => {
        child.once("exit", (code, signal) => resolve({ code, signal }));
        child.once("error", reject);
      },
    );
    const output = Promise.all([
      forEachLine(child.stdout!, logger, "stdout"),
      forEachLine(child.stderr!, logger, "stderr"),
    ]);

    let stopped: "aborted" | "timedOut" | undefined;
    let stopping: Promise<void> | undefined;
    const stop = (why: "aborted" | "timedOut") => {
      stopped ??= why;
      if (child.pid !== undefined) stopping ??= stopGroup(child.pid);
    };
    const onAbort = () => stop("aborted");
    signal.addEventListener("abort", onAbort, { once: true });
    const timer = timeoutMs ? setTimeout(() => stop("timedOut"), timeoutMs) : undefined;
    let status: { code: number | null; signal: string | null };
    try {
      status = await exited;
      // Nothing outlives the command: what it left in its group is stopped too.
      if (child.pid !== undefined && groupAlive(child.pid)) stopping ??= stopGroup(child.pid);
      await stopping;
      await within(output, 1_000); // a process that left the group may hold the pipes
    } catch (err) {
      throw cannotRun(command[0], err);
    } finally {
      clearTimeout(timer);
      signal.removeEventListener("abort", onAbort);
      child.stdout!.destroy();
      child.stderr!.destroy();
    }

    if (stopped === "aborted") throw signal.reason;
    const data = { exitCode: status.code, signal: status.signal };
    if (stopped === "timedOut") {
      return {
        success: false,
        message: `timed out after ${timeoutMs} ms`,
        data: { ...data, timedOut: true },
      };
    }
    return {
      success: status.code === 0,
      message: status.code === null
        ? `killed by ${status.signal}`
        : `exited with code ${status.code}`,
      data,
    };
  },
});

/** The driver's environment without its own NATS and Conveyor settings. */
function inheritedEnv(): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [k, value] of Object.entries(process.env)) {
    if (value !== undefined && !/^(NATS|CONVEYOR)_/.test(k)) env[k] = value;
  }
  return env;
}

/** A program that is not there or not executable: no retry helps. */
function cannotRun(program: string, err: unknown): Error {
  const code = (err as { code?: unknown })?.code;
  const text = `cannot run ${program}: ${err instanceof Error ? err.message : String(err)}`;
  return code === "ENOENT" || code === "EACCES" ? new PermanentError(text) : new Error(text);
}

/** Logs each line of `stream`; resolves when it closes. */
function forEachLine(
  stream: Readable,
  logger: DriverLogger,
  name: "stdout" | "stderr",
): Promise<void> {
  const log = name === "stdout"
    ? (line: string) => logger.info(line, { stream: name })
    : (line: string) => logger.warn(line, { stream: name });
  const emit = (line: string) => log(line.endsWith("\r") ? line.slice(0, -1) : line);
  const decoder = new TextDecoder();
  let rest = "";
  return new Promise((resolve) => {
    let done = false;
    const end = () => {
      if (done) return;
      done = true;
      rest += decoder.decode();
      if (rest) emit(rest);
      resolve();
    };
    stream.on("data", (chunk: Uint8Array) => {
      const lines = (rest + decoder.decode(chunk, { stream: true })).split("\n");
      rest = lines.pop()!;
      lines.forEach(emit);
      while (rest.length > MAX_LINE) {
        emit(rest.slice(0, MAX_LINE));
        rest = rest.slice(MAX_LINE);
      }
    });
    stream.once("end", end);
    stream.once("close", end);
    stream.once("error", end);
  });
}

/** Sends `signal` to process group `pgid`; false when none of it is left. */
function signalGroup(pgid: number, signal: string | 0): boolean {
  try {
    process.kill(-pgid, signal);
    return true;
  } catch {
    return false; // ESRCH: the group is gone
  }
}

const groupAlive = (pgid: number) => signalGroup(pgid, 0);

/** SIGTERM to the group; SIGKILL to what is left of it after {@link KILL_GRACE_MS}. */
async function stopGroup(pgid: number): Promise<void> {
  if (!signalGroup(pgid, "SIGTERM")) return;
  const end = Date.now() + KILL_GRACE_MS;
  while (Date.now() < end && groupAlive(pgid)) await sleep(25);
  signalGroup(pgid, "SIGKILL");
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Waits for `p`, at most `ms` milliseconds. */
async function within(p: Promise<unknown>, ms: number): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  await Promise.race([p, new Promise<void>((r) => (timer = setTimeout(r, ms)))]);
  clearTimeout(timer);
}

if (isMain(import.meta)) await serve(shell);
