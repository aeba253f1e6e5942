/**
 * Plumbing shared by the benchmark's figures: the events and consumers every
 * run uses, a watch on the results as they are stored, repository paths,
 * runtime facts and the statistics the figures are reduced with.
 *
 * Only `node:` modules and npm packages: the same file runs on Deno, on Bun
 * and, compiled by scripts/build_npm.mjs, on Node.
 *
 * @module
 */
import process from "node:process";
import { spawn, spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { availableParallelism, cpus, loadavg, release, totalmem } from "node:os";
import { fileURLToPath } from "node:url";
import { nanos, type NatsConnection, type Subscription } from "@nats-io/transport-node";
import { AckPolicy, DeliverPolicy, jetstream, type JetStreamManager } from "@nats-io/jetstream";
import { filterSubjects, MESSAGES_STREAM, RESULT_SUBJECT } from "../mod.ts";

/** The resource type of every benchmark event (`resources.bench`). */
export const RESOURCE = "bench";
/** `ack_wait` of every benchmark consumer: long enough that no run sees a redelivery. */
export const ACK_WAIT_MS = 30_000;
/** `max_ack_pending` of the consumers whose client bounds its own work (the runtime's default). */
export const MAX_ACK_PENDING = 1_000;
/** The streams the Conveyor server creates; purged before every run. */
export const STREAMS: readonly string[] = [MESSAGES_STREAM, "pipeline-engine", "logs-engine"];
/** Events published together before waiting for their acknowledgements. */
const PUBLISH_WINDOW = 512;

/** The JavaScript runtime running this code. */
export type RuntimeName = "deno" | "bun" | "node";

/** Which runtime runs this code. */
export function currentRuntime(): RuntimeName {
  if ("Deno" in globalThis) return "deno";
  if ("Bun" in globalThis) return "bun";
  return "node";
}

/** Versions of the running runtime, as recorded in the results. */
export interface RuntimeVersions {
  /** `deno`, `bun` or `node`. */
  name: RuntimeName;
  /** Its own version. */
  version: string;
  /** The V8 or JavaScriptCore behind it, when known. */
  engine: string;
  /** `process.versions.node`: the Node API level it provides. */
  node_api: string;
}

/** The running runtime's versions. */
export function runtimeVersions(): RuntimeVersions {
  const name = currentRuntime();
  const versions = process.versions as Record<string, string | undefined>;
  const deno = (globalThis as { Deno?: { version: { deno: string; v8: string } } }).Deno;
  const version = deno ? deno.version.deno : name === "bun" ? versions.bun ?? "?" : versions.node;
  const engine = deno
    ? `v8 ${deno.version.v8}`
    : name === "bun"
    ? `jsc ${versions.webkit ?? "?"}`
    : `v8 ${versions.v8 ?? "?"}`;
  return { name, version: version ?? "?", engine, node_api: versions.node ?? "?" };
}

/** The machine, as recorded in the results. */
export interface MachineInfo {
  /** `os.availableParallelism()`. */
  cpus: number;
  /** The first CPU's model name. */
  cpu_model: string;
  /** `process.platform` and `os.release()`. */
  os: string;
  /** Total memory in bytes. */
  memory_bytes: number;
}

/** Facts about the machine the benchmark runs on. */
export function machineInfo(): MachineInfo {
  let model = "?";
  try {
    model = cpus()[0]?.model?.trim() || "?";
  } catch { /* not every runtime reports CPUs */ }
  return {
    cpus: availableParallelism(),
    cpu_model: model,
    os: `${process.platform} ${release()}`,
    memory_bytes: totalmem(),
  };
}

/** The 1, 5 and 15 minute load averages, rounded (other work on the machine skews every figure). */
export function loadAverage(): number[] {
  try {
    return loadavg().map((x) => round(x, 2));
  } catch {
    return [];
  }
}

/** The source measured: the repository's commit and the files changed since (`git status`). */
export interface SourceInfo {
  /** `git rev-parse HEAD`, or null outside a git checkout. */
  commit: string | null;
  /** Files changed or added since that commit. */
  changed: string[];
}

/** The commit and the uncommitted changes of the repository holding the benchmark. */
export function sourceInfo(): SourceInfo {
  const git = (args: string[]) => spawnSync("git", args, { cwd: paths().repo, encoding: "utf8" });
  const head = git(["rev-parse", "HEAD"]);
  if (head.status !== 0) return { commit: null, changed: [] };
  const status = git(["status", "--porcelain", "--untracked-files=all"]);
  return {
    commit: head.stdout.trim(),
    changed: status.stdout.split("\n").filter((l) => l.trim() !== "").map((l) => l.trim()),
  };
}

// ---------------------------------------------------------------- paths

/** Where the benchmark's files are, from source (bench/*.ts) or from the npm build (npm/bench/*.js). */
export interface Paths {
  /** The repository root. */
  repo: string;
  /** True when this code is the npm build's JavaScript. */
  compiled: boolean;
  /** bench/driver_program.ts, run by Deno and Bun. */
  programSource: string;
  /** npm/bench/driver_program.js, run by Node (exists after `node scripts/build_npm.mjs`). */
  programBuilt: string;
  /** Default directory of the JSON results: bench/results. */
  results: string;
}

/** The benchmark's paths, wherever this module runs from. */
export function paths(): Paths {
  const compiled = import.meta.url.endsWith(".js");
  // bench/harness.ts -> the repository; npm/bench/harness.js -> npm/ -> the repository.
  const repo = fileURLToPath(new URL(compiled ? "../../" : "../", import.meta.url));
  return {
    repo,
    compiled,
    programSource: `${repo}bench/driver_program.ts`,
    programBuilt: `${repo}npm/bench/driver_program.js`,
    results: `${repo}bench/results`,
  };
}

/** How to start `bench/driver_program` on a runtime, or why it cannot be. */
export interface ProgramCommand {
  /** The executable. */
  cmd: string;
  /** Its arguments, the program included. */
  args: string[];
  /** The runtime's version as it reports it (`--version`). */
  version: string;
}

/**
 * The command running bench/driver_program on `runtime`: the running
 * runtime's own executable for itself, node_modules/.bin for Deno and Bun,
 * `node` from PATH otherwise. `gc` exposes the garbage collector. Returns a
 * reason instead when the program or the runtime is missing.
 */
export function programCommand(runtime: RuntimeName, gc: boolean): ProgramCommand | string {
  const p = paths();
  const own = currentRuntime() === runtime;
  const bin = own
    ? process.execPath
    : runtime === "node"
    ? "node"
    : `${p.repo}node_modules/.bin/${runtime}`;
  if (runtime !== "node" && !own && !existsSync(bin)) return `${bin} not found (npm ci)`;
  let cmd: [string, string[]];
  if (runtime === "deno") {
    cmd = [bin, ["run", "-A", ...(gc ? ["--v8-flags=--expose-gc"] : []), p.programSource]];
  } else if (runtime === "bun") {
    cmd = [bin, ["run", p.programSource]];
  } else {
    if (!existsSync(p.programBuilt)) {
      return `${p.programBuilt} not found: run \`node scripts/build_npm.mjs\` first`;
    }
    cmd = [bin, [...(gc ? ["--expose-gc"] : []), p.programBuilt]];
  }
  const v = spawnSync(cmd[0], ["--version"], { encoding: "utf8" });
  if (v.status !== 0) return `${cmd[0]} --version failed: ${v.error?.message ?? v.stderr}`;
  // "deno 2.9.6 (stable, ...)", "1.4.5", "v20.20.2" -> "2.9.6", "1.4.5", "20.20.2".
  const version = /\d+\.\d+\.\d+\S*/.exec(v.stdout)?.[0] ?? v.stdout.trim();
  return { cmd: cmd[0], args: cmd[1], version };
}

// ---------------------------------------------------------------- streams and events

/** Empties the three Conveyor streams, so every run starts from nothing. */
export async function purgeStreams(jsm: JetStreamManager): Promise<void> {
  for (const s of STREAMS) await jsm.streams.purge(s);
}

/** Messages stored in a stream. */
export async function storedCount(jsm: JetStreamManager, stream: string): Promise<number> {
  return (await jsm.streams.info(stream)).state.messages;
}

/**
 * Creates the durable consumer `name` on `resources.bench`. With `runtime`,
 * exactly as `startDriver` would create it for a driver of that name (so it
 * finds the consumer current and changes nothing); else for a hand-written
 * loop, with the given `max_ack_pending`.
 */
export async function addConsumer(
  jsm: JetStreamManager,
  name: string,
  options: { runtime: true } | { runtime: false; maxAckPending: number },
): Promise<void> {
  await jsm.consumers.add(MESSAGES_STREAM, {
    name,
    durable_name: name,
    ack_policy: AckPolicy.Explicit,
    deliver_policy: DeliverPolicy.All,
    ack_wait: nanos(ACK_WAIT_MS),
    ...(options.runtime
      ? {
        filter_subjects: filterSubjects({ name, resources: [RESOURCE] }),
        max_ack_pending: MAX_ACK_PENDING,
        // The runtime's default maxAttempts (5) plus its margin of 3; every event name.
        max_deliver: 8,
        metadata: { "conveyor.events": "*" },
      }
      : { filter_subject: `resources.${RESOURCE}`, max_ack_pending: options.maxAckPending }),
  });
}

/** Deletes a consumer, if it exists. */
export async function deleteConsumer(jsm: JetStreamManager, name: string): Promise<void> {
  await jsm.consumers.delete(MESSAGES_STREAM, name).catch(() => {});
}

/**
 * Waits until consumer `name` has nothing pending or unacknowledged (plain
 * acks are not confirmed, so the last ones may still be on their way).
 */
export async function drained(jsm: JetStreamManager, name: string): Promise<void> {
  for (let i = 0;; i++) {
    const info = await jsm.consumers.info(MESSAGES_STREAM, name);
    if (info.num_pending === 0 && info.num_ack_pending === 0) return;
    if (i >= 250) {
      throw new Error(
        `consumer ${name}: ${info.num_pending} pending and ${info.num_ack_pending} ` +
          "unacknowledged at the end of the run",
      );
    }
    await sleep(20);
  }
}

/** One event in the server's wire format, and its run id. */
export interface BenchEvent {
  /** The run id (UUID), matched against the results. */
  runId: string;
  /** The DriverMessage as the server publishes it (`payload` a JSON string). */
  data: string;
}

/**
 * A `resources.bench` event as the Conveyor server publishes it
 * (`testing.ts`'s `publishEvent` format, built without a connection per event).
 */
export function makeEvent(tag: string, i: number): BenchEvent {
  const runId = crypto.randomUUID();
  const resource = {
    id: crypto.randomUUID(),
    name: `${tag}-${i}`,
    resource: RESOURCE,
    metadata: { version: "1" },
    spec: { i },
  };
  const message = {
    event: "create",
    id: crypto.randomUUID(),
    run_id: runId,
    payload: JSON.stringify(resource),
  };
  return { runId, data: JSON.stringify(message) };
}

/** Publishes `n` events to `resources.bench`, pipelined; returns their run ids. */
export async function publishEvents(
  nc: NatsConnection,
  n: number,
  tag: string,
): Promise<string[]> {
  const js = jetstream(nc);
  const runIds: string[] = [];
  for (let i = 0; i < n; i += PUBLISH_WINDOW) {
    const batch: Promise<unknown>[] = [];
    for (let j = i; j < Math.min(n, i + PUBLISH_WINDOW); j++) {
      const e = makeEvent(tag, j);
      runIds.push(e.runId);
      batch.push(js.publish(`resources.${RESOURCE}`, e.data));
    }
    await Promise.all(batch);
  }
  return runIds;
}

// ---------------------------------------------------------------- results

/**
 * Watches `pipelines.driver.result` on core NATS: counts results as the
 * server receives them (the same moment JetStream stores them) and, with
 * `track`, notes when each run id's first result arrived.
 */
export class ResultWatch {
  /** Results seen so far. */
  count = 0;
  /** Arrival time (`performance.now()`) of each run id's first result, when tracking. */
  readonly arrivals: Map<string, number> = new Map();
  /** Called after each result is counted (the latency figure's closed loop). */
  onResult?: () => void;
  #sub: Subscription;
  #waiters: { n: number; resolve: () => void }[] = [];
  #idWaiters: Map<string, (at: number) => void> = new Map();
  #nc: NatsConnection;

  /** Subscribes; `ready()` confirms the server has the subscription. */
  constructor(nc: NatsConnection, track: boolean) {
    this.#nc = nc;
    this.#sub = nc.subscribe(RESULT_SUBJECT, {
      callback: (err, msg) => {
        if (err) return;
        this.count++;
        if (track) {
          const now = performance.now();
          const runId = msg.json<{ run_id?: string }>().run_id;
          if (runId && !this.arrivals.has(runId)) {
            this.arrivals.set(runId, now);
            this.#idWaiters.get(runId)?.(now);
          }
        }
        this.onResult?.();
        if (this.#waiters.length === 0) return;
        this.#waiters = this.#waiters.filter((w) => {
          if (this.count < w.n) return true;
          w.resolve();
          return false;
        });
      },
    });
  }

  /** Resolves once the server has registered the subscription. */
  ready(): Promise<void> {
    return this.#nc.flush();
  }

  /** Resolves when `n` results have been seen; rejects after `timeout` ms. */
  until(n: number, timeout: number, what: () => string): Promise<void> {
    if (this.count >= n) return Promise.resolve();
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#waiters = this.#waiters.filter((w) => w !== waiter);
        reject(new Error(`${this.count}/${n} results after ${timeout} ms (${what()})`));
      }, timeout);
      const waiter = {
        n,
        resolve: () => {
          clearTimeout(timer);
          resolve();
        },
      };
      this.#waiters.push(waiter);
    });
  }

  /**
   * Resolves to the arrival time of `runId`'s first result (needs `track`);
   * rejects after `timeout` ms.
   */
  arrival(runId: string, timeout: number): Promise<number> {
    const seen = this.arrivals.get(runId);
    if (seen !== undefined) return Promise.resolve(seen);
    return new Promise<number>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#idWaiters.delete(runId);
        reject(new Error(`no result for run ${runId} after ${timeout} ms`));
      }, timeout);
      this.#idWaiters.set(runId, (at) => {
        clearTimeout(timer);
        this.#idWaiters.delete(runId);
        resolve(at);
      });
    });
  }

  /** Unsubscribes. */
  stop(): void {
    this.#sub.unsubscribe();
  }
}

// ---------------------------------------------------------------- small things

/** Resolves after `ms` milliseconds. */
export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** The median of `xs` (NaN when empty). */
export function median(xs: readonly number[]): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
}

/** The `q` quantile (0..1) of `xs` by the nearest-rank method (NaN when empty). */
export function quantile(xs: readonly number[], q: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))];
}

/** Rounds to `digits` decimals (for the JSON). */
export function round(x: number, digits = 0): number {
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}

/** A simple counting semaphore (the nats.js README's consume + limiter pattern). */
export class Semaphore {
  #free: number;
  #queue: (() => void)[] = [];

  /** A semaphore with `permits` permits. */
  constructor(permits: number) {
    this.#free = permits;
  }

  /** Takes a permit, waiting for one when none is free. */
  acquire(): Promise<void> | undefined {
    if (this.#free > 0) {
      this.#free--;
      return undefined;
    }
    return new Promise<void>((r) => this.#queue.push(r));
  }

  /** Gives a permit back (to the longest waiter, if any). */
  release(): void {
    const next = this.#queue.shift();
    if (next) next();
    else this.#free++;
  }
}

// ---------------------------------------------------------------- child processes

/** A program running in its own process; see {@link spawnChild}. */
export interface Child {
  /** Everything it printed on stdout so far. */
  readonly out: string;
  /** Its exit code (null when a signal ended it). */
  readonly exited: Promise<number | null>;
  /** Resolves when its stdout matches `re`; rejects after `timeout` ms or if it exits first. */
  waitFor(re: RegExp, timeout: number, what: string): Promise<RegExpMatchArray>;
  /** SIGTERM, then SIGKILL after `grace` ms; resolves to the exit code. */
  stop(grace?: number): Promise<number | null>;
}

/** Children still running: stopped by {@link killChildren} when the benchmark is interrupted. */
const children = new Set<ReturnType<typeof spawn>>();

/** Kills (SIGKILL) every child the benchmark started that still runs. */
export function killChildren(): void {
  for (const c of children) c.kill("SIGKILL");
}

/** Starts `cmd args` in `cwd` with extra environment variables; stderr passes through. */
export function spawnChild(
  cmd: string,
  args: string[],
  vars: Record<string, string>,
  cwd: string,
): Child {
  const child = spawn(cmd, args, {
    cwd,
    env: { ...process.env, ...vars },
    stdio: ["ignore", "pipe", "inherit"],
  });
  children.add(child);
  let out = "";
  let ended = false;
  const exited = new Promise<number | null>((resolve) => {
    child.on("exit", (code) => {
      ended = true;
      children.delete(child);
      resolve(code);
    });
    child.on("error", () => {
      ended = true;
      children.delete(child);
      resolve(null);
    });
  });
  const decoder = new TextDecoder();
  child.stdout!.on("data", (c: Uint8Array) => (out += decoder.decode(c, { stream: true })));
  return {
    get out() {
      return out;
    },
    exited,
    async waitFor(re, timeout, what) {
      const end = performance.now() + timeout;
      for (;;) {
        const m = re.exec(out);
        if (m) return m;
        if (ended) {
          throw new Error(`${what}: the program exited first (stdout: ${out.slice(-300)})`);
        }
        if (performance.now() > end) {
          throw new Error(`${what}: not after ${timeout} ms (stdout: ${out.slice(-300)})`);
        }
        await sleep(10);
      }
    },
    async stop(grace = 15_000) {
      if (ended) return exited;
      // process.kill, not child.kill: Deno's ChildProcess reports a child it
      // was asked to kill as ended by that signal, whatever its exit code.
      if (child.pid !== undefined) {
        try {
          process.kill(child.pid, "SIGTERM");
        } catch { /* already gone */ }
      }
      const timer = setTimeout(() => child.kill("SIGKILL"), grace);
      const code = await exited;
      clearTimeout(timer);
      return code;
    },
  };
}
