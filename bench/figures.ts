/**
 * The benchmark's figures, each measured against one nats-server: overhead
 * (runtime vs the best hand-written loop), slow work, logs, latency, memory
 * and cold start. Every run starts from purged streams and a fresh consumer
 * and is checked after it is timed (every result and log line stored, every
 * event acknowledged, no error); a run that fails a check fails the suite.
 *
 * @module
 */
import { readFileSync } from "node:fs";
import process from "node:process";
import { connect, headers, type NatsConnection } from "@nats-io/transport-node";
import { jetstream, type JetStreamManager } from "@nats-io/jetstream";
import { MESSAGES_STREAM } from "../mod.ts";
import type { ProgramEnv } from "./driver_program.ts";
import { NOOP, type Work } from "./drivers.ts";
import {
  type Child,
  currentRuntime,
  deleteConsumer,
  drained,
  makeEvent,
  median,
  paths,
  programCommand,
  publishEvents,
  purgeStreams,
  quantile,
  RESOURCE,
  ResultWatch,
  round,
  type RuntimeName,
  sleep,
  spawnChild,
  storedCount,
} from "./harness.ts";
import { type Running, RUNTIME, type Variant, variantByName } from "./variants.ts";

/** What every figure works with: the server, the harness's connection, limits, progress output. */
export interface Bench {
  /** The nats-server's URL. */
  url: string;
  /** Its WebSocket listener's URL (`ws://`), for the cold start over WebSocket. */
  wsUrl?: string;
  /** The harness's own connection (publishes events, watches results). */
  nc: NatsConnection;
  /** Its JetStream manager. */
  jsm: JetStreamManager;
  /** Limit of one run (or one memory checkpoint), in ms. */
  timeout: number;
  /** Prints a progress line. */
  progress(line: string): void;
  /** The nats-server's process id, to read its CPU time (Linux). */
  serverPid?: number;
}

/** CPU time (user + system) of a process in µs, from /proc (Linux); undefined elsewhere. */
function processCpuUs(pid: number | undefined): number | undefined {
  if (pid === undefined) return undefined;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // Fields after the command name, which is in parentheses and may hold spaces.
    const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    // utime and stime are fields 14 and 15 of the line, in clock ticks (100 per second on Linux).
    return (Number(f[11]) + Number(f[12])) * 10_000;
  } catch {
    return undefined;
  }
}

/** Consumer names are unique per run, so no run sees another's state. */
let runSeq = 0;
const consumerName = (what: string) => `bench-${++runSeq}-${what}`;

const linesOf = (work: Work) => work.kind === "logs" ? work.lines : 1;

/** Checks what a run stored: `results` results, `lines` log lines, no error, consumer drained. */
async function verify(
  b: Bench,
  name: string,
  results: number,
  lines: number,
  errors: number,
): Promise<void> {
  const stored = await storedCount(b.jsm, "pipeline-engine");
  const logs = await storedCount(b.jsm, "logs-engine");
  if (stored !== results || logs !== lines) {
    throw new Error(
      `${name}: stored ${stored} results and ${logs} log lines, expected ${results} and ${lines}`,
    );
  }
  if (errors > 0) throw new Error(`${name}: ${errors} events failed`);
  await drained(b.jsm, name);
}

// ---------------------------------------------------------------- throughput runs

/** One timed throughput run. */
export interface ThroughputRun {
  /** The variant's name. */
  variant: string;
  /** The round (1-based). */
  round: number;
  /** Events in the run. */
  events: number;
  /** From the variant's start (connecting included) to the last result stored. */
  seconds: number;
  /** Events per second. */
  eps: number;
  /** CPU time (user + system) of this process per event, in µs. */
  cpu_us_per_event: number;
  /**
   * CPU time of the nats-server per event, in µs (10 ms resolution; Linux
   * only, else absent): with this process's, what the run cost the machine.
   */
  server_cpu_us_per_event?: number;
}

/**
 * One run: N events published first, then the variant started; timed until N
 * results are stored, then stopped and checked.
 */
async function runThroughput(
  b: Bench,
  variant: Variant,
  o: { concurrency: number; events: number; work: Work; round: number },
): Promise<ThroughputRun> {
  const name = consumerName(variant.name);
  await purgeStreams(b.jsm);
  await variant.prepare(b.jsm, name, o.concurrency);
  try {
    await publishEvents(b.nc, o.events, name);
    const pending = (await b.jsm.consumers.info(MESSAGES_STREAM, name)).num_pending;
    if (pending !== o.events) {
      throw new Error(`${name}: ${pending} events pending, not ${o.events}`);
    }
    const watch = new ResultWatch(b.nc, false);
    await watch.ready();
    let running: Running | undefined;
    let seconds = 0;
    let cpu = { user: 0, system: 0 };
    let serverCpu: number | undefined;
    const server0 = processCpuUs(b.serverPid);
    const cpu0 = process.cpuUsage();
    const t0 = performance.now();
    try {
      running = await variant.start(b.url, name, o.concurrency, o.work);
      await watch.until(o.events, b.timeout, () => `${name}: ${running?.errors()} errors`);
      seconds = (performance.now() - t0) / 1000;
      cpu = process.cpuUsage(cpu0);
      const server1 = processCpuUs(b.serverPid);
      if (server0 !== undefined && server1 !== undefined) serverCpu = server1 - server0;
    } finally {
      watch.stop();
      await running?.stop();
    }
    await verify(b, name, o.events, o.events * linesOf(o.work), running!.errors());
    return {
      variant: variant.name,
      round: o.round,
      events: o.events,
      seconds: round(seconds, 4),
      eps: round(o.events / seconds),
      cpu_us_per_event: round((cpu.user + cpu.system) / o.events),
      ...(serverCpu === undefined ? {} : { server_cpu_us_per_event: round(serverCpu / o.events) }),
    };
  } finally {
    await deleteConsumer(b.jsm, name);
  }
}

const fmt = (x: number) => Math.round(x).toLocaleString("en-US");

/** The median nats-server CPU per event of some runs, when every run has one. */
function serverMedian(runs: ThroughputRun[]): { server_cpu_us_per_event?: number } {
  const xs = runs.map((x) => x.server_cpu_us_per_event);
  if (xs.length === 0 || xs.some((x) => x === undefined)) return {};
  return { server_cpu_us_per_event: round(median(xs as number[])) };
}

// ---------------------------------------------------------------- overhead

/** Settings of the overhead figure. */
export interface OverheadOptions {
  /** Concurrencies to measure. */
  concurrencies: number[];
  /** Events per run. */
  events: number;
  /** Rounds (repetitions) per concurrency. */
  reps: number;
  /** Events of the untimed warm-up run of each variant (0: none). */
  warmup: number;
  /** The baseline candidates: each runs every round, the fastest (by median) is the baseline. */
  baselines: string[];
  /** Diagnostic variants measured alongside. */
  diagnostics: string[];
}

/** The overhead figure at one concurrency. */
export interface OverheadCase {
  /** Reconciles (or hand-written handlers) in flight. */
  concurrency: number;
  /** Events per run. */
  events: number;
  /** The baseline variant the ratio is against. */
  baseline: string;
  /** Median events/s of the baseline. */
  baseline_eps: number;
  /** Median events/s of the runtime. */
  runtime_eps: number;
  /** `runtime_eps / baseline_eps`: the headline. */
  ratio: number;
  /** The runtime's rate over the baseline's within each round (the noise). */
  same_round_ratios: number[];
  /** Median events/s and CPU µs/event of every variant run. */
  medians: Record<
    string,
    { eps: number; cpu_us_per_event: number; server_cpu_us_per_event?: number }
  >;
  /** Every timed run. */
  runs: ThroughputRun[];
}

/** The overhead figure. */
export interface OverheadFigure {
  /** The baseline candidates run (the fastest in each case is its baseline). */
  candidates: string[];
  /** One case per concurrency. */
  cases: OverheadCase[];
}

function mustVariant(name: string): Variant {
  const v = variantByName(name);
  if (!v) throw new Error(`unknown variant ${name}`);
  return v;
}

/**
 * Events/s of the runtime (no-op reconcile logging one line) against the
 * baseline, per concurrency; rounds alternate the order of the variants.
 */
export async function overhead(b: Bench, o: OverheadOptions): Promise<OverheadFigure> {
  const candidates = o.baselines.map(mustVariant);
  const variants = [...candidates, RUNTIME, ...o.diagnostics.map(mustVariant)];
  if (o.warmup > 0) {
    const c = o.concurrencies[Math.floor(o.concurrencies.length / 2)];
    for (const v of variants) {
      await runThroughput(b, v, { concurrency: c, events: o.warmup, work: NOOP, round: 0 });
    }
  }
  const cases: OverheadCase[] = [];
  for (const c of o.concurrencies) {
    const runs: ThroughputRun[] = [];
    for (let r = 1; r <= o.reps; r++) {
      // Alternate the order, so that drift (JIT, disk, caches) favours no variant.
      const order = r % 2 ? variants : [...variants].reverse();
      for (const v of order) {
        const run = await runThroughput(b, v, {
          concurrency: c,
          events: o.events,
          work: NOOP,
          round: r,
        });
        runs.push(run);
        b.progress(
          `overhead c=${c} round ${r} ${v.name}: ${fmt(run.eps)} events/s ` +
            `(${run.seconds.toFixed(2)} s, ${run.cpu_us_per_event} µs CPU/event)`,
        );
      }
    }
    const of = (name: string) => runs.filter((x) => x.variant === name);
    const medians = Object.fromEntries(variants.map((v) => [v.name, {
      eps: round(median(of(v.name).map((x) => x.eps))),
      cpu_us_per_event: round(median(of(v.name).map((x) => x.cpu_us_per_event))),
      ...serverMedian(of(v.name)),
    }]));
    const best = candidates.reduce((a, v) => medians[v.name].eps > medians[a.name].eps ? v : a);
    const same = of(RUNTIME.name).map((x) =>
      round(x.eps / of(best.name).find((y) => y.round === x.round)!.eps, 4)
    );
    cases.push({
      concurrency: c,
      events: o.events,
      baseline: best.name,
      baseline_eps: medians[best.name].eps,
      runtime_eps: medians[RUNTIME.name].eps,
      ratio: round(medians[RUNTIME.name].eps / medians[best.name].eps, 4),
      same_round_ratios: same,
      medians,
      runs,
    });
  }
  return { candidates: candidates.map((v) => v.name), cases };
}

// ---------------------------------------------------------------- slow work

/** Settings of the slow-work figure. */
export interface SlowOptions {
  /** Concurrencies to measure. */
  concurrencies: number[];
  /** The most events per run. */
  events: number;
  /** Runs per concurrency. */
  reps: number;
  /** How long each reconcile sleeps, in ms. */
  sleepMs: number;
  /** Each run takes about this long at the ideal rate (events = ideal × seconds, within [min(200, events), events]). */
  seconds: number;
}

/** The slow-work figure at one concurrency. */
export interface SlowCase {
  /** Reconciles in flight. */
  concurrency: number;
  /** Events per run. */
  events: number;
  /** How long each reconcile sleeps, in ms. */
  sleep_ms: number;
  /** The runtime's no-op events/s at this concurrency. */
  noop_eps: number;
  /** Where `noop_eps` comes from: the overhead figure of this run, or measured here. */
  noop_source: "overhead" | "measured";
  /** min(concurrency / sleep, noop_eps). */
  ideal_eps: number;
  /** Median events/s of the runtime with the sleeping reconcile. */
  runtime_eps: number;
  /** `runtime_eps / ideal_eps`. */
  ratio: number;
  /**
   * How long the sleep of `sleep_ms` really takes in this runtime, idle
   * (mean of 100 in a row): Deno's timers fire about a millisecond late.
   */
  timer_ms: number;
  /** `runtime_eps / min(concurrency / timer_ms, noop_eps)`: the ratio against what the timers allow. */
  timer_ratio: number;
  /** Every timed run (no-op runs too when measured here). */
  runs: ThroughputRun[];
}

/** Mean duration of `n` sleeps of `ms` in a row, in ms. */
async function timerMs(ms: number, n = 100): Promise<number> {
  const t0 = performance.now();
  for (let i = 0; i < n; i++) await new Promise((r) => setTimeout(r, ms));
  return (performance.now() - t0) / n;
}

/** The slow-work figure. */
export interface SlowFigure {
  /** One case per concurrency. */
  cases: SlowCase[];
}

/**
 * Events/s of the runtime when each reconcile sleeps, against the ideal:
 * `concurrency` sleeps at a time, unless the no-op rate is lower.
 */
export async function slowWork(
  b: Bench,
  o: SlowOptions,
  noopEps: ReadonlyMap<number, number>,
): Promise<SlowFigure> {
  const cases: SlowCase[] = [];
  const timer = await timerMs(o.sleepMs);
  for (const c of o.concurrencies) {
    const runs: ThroughputRun[] = [];
    let noop = noopEps.get(c);
    const source = noop === undefined ? "measured" : "overhead";
    if (noop === undefined) {
      for (let r = 1; r <= o.reps; r++) {
        const run = await runThroughput(b, RUNTIME, {
          concurrency: c,
          events: o.events,
          work: NOOP,
          round: r,
        });
        runs.push({ ...run, variant: "runtime-noop" });
        b.progress(`slow c=${c} round ${r} no-op: ${fmt(run.eps)} events/s`);
      }
      noop = median(runs.map((x) => x.eps));
    }
    const ideal = Math.min((c * 1000) / o.sleepMs, noop);
    const floor = Math.min(200, o.events);
    const events = Math.max(floor, Math.min(o.events, Math.round(ideal * o.seconds)));
    const slow: ThroughputRun[] = [];
    for (let r = 1; r <= o.reps; r++) {
      const run = await runThroughput(b, RUNTIME, {
        concurrency: c,
        events,
        work: { kind: "sleep", ms: o.sleepMs },
        round: r,
      });
      slow.push(run);
      b.progress(
        `slow c=${c} round ${r}: ${fmt(run.eps)} events/s (ideal ${fmt(ideal)}, ` +
          `${(run.eps / ideal).toFixed(3)})`,
      );
    }
    const eps = median(slow.map((x) => x.eps));
    cases.push({
      concurrency: c,
      events,
      sleep_ms: o.sleepMs,
      noop_eps: round(noop),
      noop_source: source,
      ideal_eps: round(ideal),
      runtime_eps: round(eps),
      ratio: round(eps / ideal, 4),
      timer_ms: round(timer, 3),
      timer_ratio: round(eps / Math.min((c * 1000) / timer, noop), 4),
      runs: [...runs, ...slow],
    });
  }
  return { cases };
}

// ---------------------------------------------------------------- logs

/** Settings of the logs figure. */
export interface LogsOptions {
  /** Events per run. */
  events: number;
  /** Lines each reconcile logs (K). */
  lines: number;
  /** Reconciles (or raw publishers) in flight. */
  concurrency: number;
  /** Rounds. */
  reps: number;
}

/** One timed run of the logs figure. */
export interface LogsRun {
  /** `runtime` or `raw`. */
  variant: "runtime" | "raw";
  /** The round (1-based). */
  round: number;
  /** Lines in the run. */
  lines: number;
  /** Seconds, connecting included. */
  seconds: number;
  /** Lines stored per second. */
  lines_per_s: number;
}

/** The logs figure. */
export interface LogsFigure {
  /** Reconciles (or raw publishers) in flight. */
  concurrency: number;
  /** Events per run. */
  events: number;
  /** Lines per event (K). */
  lines_per_event: number;
  /** Median lines/s through ctx.logger. */
  runtime_lines_per_s: number;
  /** Median lines/s of raw JetStream publishes of the same lines. */
  raw_lines_per_s: number;
  /** `runtime_lines_per_s / raw_lines_per_s`. */
  ratio: number;
  /** Per round. */
  same_round_ratios: number[];
  /** Every timed run. */
  runs: LogsRun[];
}

const encoder = new TextEncoder();

/**
 * The raw side of the logs figure: `events` groups of `lines` Log Entries,
 * each line published to JetStream `logs.{run}` (with a `Nats-Msg-Id`) and
 * core `live.logs.{run}.{driver}` as the runtime does, a group's lines
 * pipelined and awaited together, `concurrency` groups at a time.
 */
async function runRawLogs(b: Bench, o: LogsOptions, r: number): Promise<LogsRun> {
  await purgeStreams(b.jsm);
  const driver = "raw-logs";
  const t0 = performance.now();
  // As the runtime connects: no stack trace captured per request.
  const nc = await connect({ servers: b.url, name: "bench:raw-logs", noAsyncTraces: true });
  let seconds = 0;
  try {
    const js = jetstream(nc);
    let next = 0;
    const worker = async () => {
      while (next < o.events) {
        const e = next++;
        const runId = crypto.randomUUID();
        const nonce = crypto.randomUUID();
        const sent: Promise<unknown>[] = [];
        for (let i = 1; i <= o.lines; i++) {
          const entry = {
            runid: runId,
            driver,
            timestamp: new Date().toISOString(),
            message: `line ${i} of ${driver}-${e}`,
          };
          const data = encoder.encode(JSON.stringify(entry));
          const h = headers();
          h.set("Conveyor-Log-Level", "info");
          nc.publish(`live.logs.${runId}.${driver}`, data, { headers: h });
          sent.push(js.publish(`logs.${runId}`, data, { headers: h, msgID: `${nonce}.${i}` }));
        }
        await Promise.all(sent);
      }
    };
    await Promise.all(Array.from({ length: o.concurrency }, worker));
    seconds = (performance.now() - t0) / 1000;
  } finally {
    await nc.close();
  }
  const lines = o.events * o.lines;
  const stored = await storedCount(b.jsm, "logs-engine");
  if (stored !== lines) throw new Error(`raw logs: ${stored} lines stored, expected ${lines}`);
  return {
    variant: "raw",
    round: r,
    lines,
    seconds: round(seconds, 4),
    lines_per_s: round(lines / seconds),
  };
}

/** Lines/s through ctx.logger against raw JetStream publishes of the same lines. */
export async function logs(b: Bench, o: LogsOptions): Promise<LogsFigure> {
  const runs: LogsRun[] = [];
  const work: Work = { kind: "logs", lines: o.lines };
  for (let r = 1; r <= o.reps; r++) {
    const order = r % 2 ? ["raw", "runtime"] : ["runtime", "raw"];
    for (const v of order) {
      let run: LogsRun;
      if (v === "raw") run = await runRawLogs(b, o, r);
      else {
        const t = await runThroughput(b, RUNTIME, {
          concurrency: o.concurrency,
          events: o.events,
          work,
          round: r,
        });
        const lines = o.events * o.lines;
        run = {
          variant: "runtime",
          round: r,
          lines,
          seconds: t.seconds,
          lines_per_s: round(lines / t.seconds),
        };
      }
      runs.push(run);
      b.progress(`logs round ${r} ${v}: ${fmt(run.lines_per_s)} lines/s`);
    }
  }
  const of = (v: string) => runs.filter((x) => x.variant === v);
  const rt = median(of("runtime").map((x) => x.lines_per_s));
  const raw = median(of("raw").map((x) => x.lines_per_s));
  return {
    concurrency: o.concurrency,
    events: o.events,
    lines_per_event: o.lines,
    runtime_lines_per_s: round(rt),
    raw_lines_per_s: round(raw),
    ratio: round(rt / raw, 4),
    same_round_ratios: of("runtime").map((x) =>
      round(x.lines_per_s / of("raw").find((y) => y.round === x.round)!.lines_per_s, 4)
    ),
    runs,
  };
}

// ---------------------------------------------------------------- latency

/** Settings of the latency figure. */
export interface LatencyOptions {
  /** The driver's concurrency. */
  concurrency: number;
  /** Events per second of the paced mode. */
  rate: number;
  /** Events measured in the paced mode. */
  pacedEvents: number;
  /** Events measured in the saturation mode. */
  saturationEvents: number;
  /** Rounds. */
  reps: number;
  /** The hand-written loop measured alongside, for reference. */
  baseline: string;
}

/** One latency run. */
export interface LatencyRun {
  /** The variant's name. */
  variant: string;
  /** `paced` or `saturation`. */
  mode: "paced" | "saturation";
  /** The round (1-based). */
  round: number;
  /** Events measured. */
  events: number;
  /** Median, in ms. */
  p50_ms: number;
  /** 99th percentile, in ms. */
  p99_ms: number;
  /** Largest, in ms. */
  max_ms: number;
  /** Events/s achieved while measuring. */
  eps: number;
}

/** The latency of one variant in one mode: medians over the rounds. */
export interface LatencySummary {
  /** Median of the rounds' medians, in ms. */
  p50_ms: number;
  /** Median of the rounds' 99th percentiles, in ms. */
  p99_ms: number;
  /** Median of the rounds' maxima, in ms. */
  max_ms: number;
  /** Median events/s achieved. */
  eps: number;
}

/** The latency figure. */
export interface LatencyFigure {
  /** The driver's concurrency. */
  concurrency: number;
  /** The paced mode's rate, events/s. */
  rate: number;
  /** Events kept outstanding in the saturation mode (2 × concurrency). */
  window: number;
  /** The hand-written loop measured for reference. */
  baseline: string;
  /** Paced: runtime and baseline. */
  paced: { events: number; runtime: LatencySummary; baseline: LatencySummary };
  /** Saturation: runtime and baseline. */
  saturation: { events: number; runtime: LatencySummary; baseline: LatencySummary };
  /** Every run. */
  runs: LatencyRun[];
}

/**
 * One latency run: the variant consuming, a warm-up burst, then `events`
 * events published paced (`rate`/s) or in a closed loop (`window`
 * outstanding); each event's latency runs from just before its publish to
 * its result's arrival on core NATS.
 */
async function runLatency(
  b: Bench,
  variant: Variant,
  o: {
    concurrency: number;
    mode: "paced" | "saturation";
    events: number;
    rate: number;
    window: number;
    round: number;
  },
): Promise<LatencyRun> {
  const name = consumerName(`${variant.name}-latency`);
  await purgeStreams(b.jsm);
  await variant.prepare(b.jsm, name, o.concurrency);
  const js = jetstream(b.nc);
  const warm = Math.min(100, o.events);
  const watch = new ResultWatch(b.nc, true);
  let running: Running | undefined;
  let lat: number[] = [];
  let seconds = 0;
  let errors = 0;
  try {
    await watch.ready();
    running = await variant.start(b.url, name, o.concurrency, NOOP);
    await publishEvents(b.nc, warm, `${name}-warm`);
    await watch.until(warm, b.timeout, () => `${name} warm-up`);
    const sent = new Map<string, number>();
    const acks: Promise<unknown>[] = [];
    const publish = (i: number) => {
      const e = makeEvent(name, i);
      sent.set(e.runId, performance.now());
      acks.push(js.publish(`resources.${RESOURCE}`, e.data));
    };
    const t0 = performance.now();
    if (o.mode === "paced") {
      const interval = 1000 / o.rate;
      for (let i = 0; i < o.events; i++) {
        const wait = t0 + i * interval - performance.now();
        if (wait > 0) await sleep(wait);
        publish(i);
      }
    } else {
      let next = 0;
      const fill = () => {
        while (next < o.events && next - (watch.count - warm) < o.window) publish(next++);
      };
      watch.onResult = fill;
      fill();
    }
    await watch.until(warm + o.events, b.timeout, () => `${name}: ${running?.errors()} errors`);
    seconds = (performance.now() - t0) / 1000;
    watch.onResult = undefined;
    await Promise.all(acks);
    lat = [...sent].map(([id, at]) => watch.arrivals.get(id)! - at);
  } finally {
    watch.stop();
    errors = running?.errors() ?? 0;
    await running?.stop();
  }
  try {
    await verify(b, name, warm + o.events, warm + o.events, errors);
  } finally {
    await deleteConsumer(b.jsm, name);
  }
  return {
    variant: variant.name,
    mode: o.mode,
    round: o.round,
    events: o.events,
    p50_ms: round(quantile(lat, 0.5), 3),
    p99_ms: round(quantile(lat, 0.99), 3),
    max_ms: round(Math.max(...lat), 3),
    eps: round(o.events / seconds),
  };
}

/** p50 and p99 from publish to stored result, paced and at saturation. */
export async function latency(b: Bench, o: LatencyOptions): Promise<LatencyFigure> {
  const base = mustVariant(o.baseline);
  const window = 2 * o.concurrency;
  const runs: LatencyRun[] = [];
  for (const mode of ["paced", "saturation"] as const) {
    const events = mode === "paced" ? o.pacedEvents : o.saturationEvents;
    for (let r = 1; r <= o.reps; r++) {
      const order = r % 2 ? [base, RUNTIME] : [RUNTIME, base];
      for (const v of order) {
        const run = await runLatency(b, v, {
          concurrency: o.concurrency,
          mode,
          events,
          rate: o.rate,
          window,
          round: r,
        });
        runs.push(run);
        b.progress(
          `latency ${mode} round ${r} ${v.name}: p50 ${run.p50_ms.toFixed(2)} ms, ` +
            `p99 ${run.p99_ms.toFixed(2)} ms (${fmt(run.eps)} events/s)`,
        );
      }
    }
  }
  const summary = (variant: string, mode: string): LatencySummary => {
    const of = runs.filter((x) => x.variant === variant && x.mode === mode);
    return {
      p50_ms: round(median(of.map((x) => x.p50_ms)), 3),
      p99_ms: round(median(of.map((x) => x.p99_ms)), 3),
      max_ms: round(median(of.map((x) => x.max_ms)), 3),
      eps: round(median(of.map((x) => x.eps))),
    };
  };
  return {
    concurrency: o.concurrency,
    rate: o.rate,
    window,
    baseline: base.name,
    paced: {
      events: o.pacedEvents,
      runtime: summary(RUNTIME.name, "paced"),
      baseline: summary(base.name, "paced"),
    },
    saturation: {
      events: o.saturationEvents,
      runtime: summary(RUNTIME.name, "saturation"),
      baseline: summary(base.name, "saturation"),
    },
    runs,
  };
}

// ---------------------------------------------------------------- memory

/** Settings of the memory figure. */
export interface MemoryOptions {
  /** Events through the driver process. */
  events: number;
  /** A reading every `step` events. */
  step: number;
  /** The driver's concurrency. */
  concurrency: number;
  /** Driver processes, one after the other. */
  reps: number;
}

/** One reading of the driver process, at rest after garbage collection. */
export interface MemoryReading {
  /** Results so far. */
  events: number;
  /** Resident set size, bytes. */
  rss_bytes: number;
  /** Heap used, bytes. */
  heap_bytes: number;
}

/** One driver process. */
export interface MemoryRun {
  /** The round (1-based). */
  round: number;
  /** Every reading. */
  readings: MemoryReading[];
  /** RSS after all events. */
  rss_bytes: number;
  /** RSS at half of them (the reading nearest to half). */
  half_rss_bytes: number;
  /** The events of that reading. */
  half_events: number;
  /** `rss_bytes / half_rss_bytes`. */
  flat_ratio: number;
  /** Least-squares slope of RSS over the second half, per `step` events. */
  growth_per_step_bytes: number;
  /** The same for the heap. */
  heap_growth_per_step_bytes: number;
  /** The process's exit code after SIGTERM (0: it ended by itself). */
  exit_code: number | null;
  /** Seconds the run took. */
  seconds: number;
}

/** The memory figure: medians over the driver processes. */
export interface MemoryFigure {
  /** The runtime of the driver process. */
  runtime: RuntimeName;
  /** Its command line. */
  command: string;
  /** Events through each process. */
  events: number;
  /** Events between readings. */
  step: number;
  /** The driver's concurrency. */
  concurrency: number;
  /** Median RSS after all events. */
  rss_bytes: number;
  /** Median RSS at half of them. */
  half_rss_bytes: number;
  /** The events of the half-way reading. */
  half_events: number;
  /** Median `rss / half_rss`. */
  flat_ratio: number;
  /** Median RSS growth per `step` events over the second half. */
  growth_per_step_bytes: number;
  /** Median heap after all events. */
  heap_bytes: number;
  /** Every process. */
  runs: MemoryRun[];
}

/** Least-squares slope of y over x. */
function slope(points: { x: number; y: number }[]): number {
  if (points.length < 2) return 0;
  const mx = points.reduce((s, p) => s + p.x, 0) / points.length;
  const my = points.reduce((s, p) => s + p.y, 0) / points.length;
  const num = points.reduce((s, p) => s + (p.x - mx) * (p.y - my), 0);
  const den = points.reduce((s, p) => s + (p.x - mx) ** 2, 0);
  return den === 0 ? 0 : num / den;
}

async function runMemory(b: Bench, o: MemoryOptions, r: number): Promise<MemoryRun> {
  const command = programCommand(currentRuntime(), true);
  if (typeof command === "string") throw new Error(`memory: ${command}`);
  await purgeStreams(b.jsm);
  const name = consumerName("memory");
  const checkpoints: number[] = [];
  for (let n = o.step; n < o.events; n += o.step) checkpoints.push(n);
  checkpoints.push(o.events);
  const t0 = performance.now();
  let child: Child | undefined;
  const readings: MemoryReading[] = [];
  let exitCode: number | null = null;
  try {
    const vars = {
      NATS_URL: b.url,
      DRIVER_NAME: name,
      CONCURRENCY: String(o.concurrency),
      CHECKPOINTS: checkpoints.join(","),
    } satisfies ProgramEnv;
    child = spawnChild(command.cmd, command.args, vars, paths().repo);
    await child.waitFor(/^ready \d+$/m, 60_000, "memory: the driver process ready");
    let published = 0;
    for (const cp of checkpoints) {
      // Both the events and the reading: the reading is taken at rest.
      await publishEvents(b.nc, cp - published, `${name}-${cp}`);
      published = cp;
      const m = await child.waitFor(
        new RegExp(`^rss ${cp} (\\d+) (\\d+)$`, "m"),
        b.timeout,
        `memory: the reading after ${cp} events`,
      );
      readings.push({ events: cp, rss_bytes: Number(m[1]), heap_bytes: Number(m[2]) });
      b.progress(`memory round ${r}: ${(Number(m[1]) / 2 ** 20).toFixed(1)} MiB after ${cp}`);
    }
    exitCode = await child.stop();
    if (!/^closed$/m.test(child.out)) throw new Error("memory: the driver did not shut down");
  } finally {
    await child?.stop(2_000);
  }
  const stored = await storedCount(b.jsm, "pipeline-engine");
  if (stored !== o.events) throw new Error(`memory: ${stored} results, expected ${o.events}`);
  await deleteConsumer(b.jsm, name);
  const last = readings[readings.length - 1];
  const half = readings.reduce((a, x) =>
    Math.abs(x.events - o.events / 2) < Math.abs(a.events - o.events / 2) ? x : a
  );
  const second = readings.filter((x) => x.events >= half.events);
  return {
    round: r,
    readings,
    rss_bytes: last.rss_bytes,
    half_rss_bytes: half.rss_bytes,
    half_events: half.events,
    flat_ratio: round(last.rss_bytes / half.rss_bytes, 4),
    growth_per_step_bytes: round(
      slope(second.map((x) => ({ x: x.events, y: x.rss_bytes }))) * o.step,
    ),
    heap_growth_per_step_bytes: round(
      slope(second.map((x) => ({ x: x.events, y: x.heap_bytes }))) * o.step,
    ),
    exit_code: exitCode,
    seconds: round((performance.now() - t0) / 1000, 2),
  };
}

/** Resident memory of a driver process after many events, and its growth. */
export async function memory(b: Bench, o: MemoryOptions): Promise<MemoryFigure> {
  const command = programCommand(currentRuntime(), true);
  if (typeof command === "string") throw new Error(`memory: ${command}`);
  const runs: MemoryRun[] = [];
  for (let r = 1; r <= o.reps; r++) runs.push(await runMemory(b, o, r));
  const med = (f: (x: MemoryRun) => number) => round(median(runs.map(f)));
  return {
    runtime: currentRuntime(),
    command: [command.cmd, ...command.args].join(" "),
    events: o.events,
    step: o.step,
    concurrency: o.concurrency,
    rss_bytes: med((x) => x.rss_bytes),
    half_rss_bytes: med((x) => x.half_rss_bytes),
    half_events: runs[0].half_events,
    flat_ratio: round(median(runs.map((x) => x.flat_ratio)), 4),
    growth_per_step_bytes: med((x) => x.growth_per_step_bytes),
    heap_bytes: med((x) => x.readings[x.readings.length - 1].heap_bytes),
    runs,
  };
}

// ---------------------------------------------------------------- cold start

/** Settings of the cold-start figure. */
export interface ColdStartOptions {
  /** Runtimes to start the driver program on. */
  runtimes: RuntimeName[];
  /** Timed starts per runtime (after one untimed). */
  reps: number;
}

/** Cold start on one runtime. */
export interface ColdStartCase {
  /** The runtime. */
  runtime: RuntimeName;
  /** How the driver reached NATS: `tcp` (nats://) or `ws` (ws://, as on an edge runtime). */
  transport: "tcp" | "ws";
  /** Its version (`--version`), when it ran. */
  version: string | null;
  /** The command line, when it ran. */
  command: string | null;
  /** Milliseconds from spawn to the first result, per start. */
  runs_ms: number[];
  /** Their median; null when skipped. */
  median_ms: number | null;
  /** Why it was not measured. */
  skipped?: string;
}

/** The cold-start figure. */
export interface ColdStartFigure {
  /** Timed starts per runtime. */
  reps: number;
  /** One case per runtime. */
  cases: ColdStartCase[];
}

async function coldStartOn(
  b: Bench,
  runtime: RuntimeName,
  transport: "tcp" | "ws",
  reps: number,
  watch: ResultWatch,
): Promise<ColdStartCase> {
  let command = programCommand(runtime, false);
  const url = transport === "ws" ? b.wsUrl : b.url;
  if (typeof command !== "string" && url === undefined) command = "no WebSocket listener";
  if (
    typeof command !== "string" && transport === "ws" && runtime === "node" &&
    Number(command.version.split(".")[0]) < 22
  ) {
    command = `Node ${command.version} has no global WebSocket`;
  }
  const label = `${runtime}${transport === "ws" ? " over WebSocket" : ""}`;
  if (typeof command === "string") {
    b.progress(`cold start ${label}: skipped (${command})`);
    return {
      runtime,
      transport,
      version: null,
      command: null,
      runs_ms: [],
      median_ms: null,
      skipped: command,
    };
  }
  const name = `bench-cold-${runtime}-${transport}`;
  const vars = { NATS_URL: url!, DRIVER_NAME: name, CONCURRENCY: "16" } satisfies ProgramEnv;
  const start = () => spawnChild(command.cmd, command.args, vars, paths().repo);
  const runs: number[] = [];
  try {
    // Untimed: creates the consumer the way the runtime wants it (an event
    // must find it, the stream keeps events only for existing consumers)
    // and fills the caches (Deno's transpiled modules, the OS's files).
    const first = start();
    try {
      await first.waitFor(/^ready \d+$/m, 60_000, `cold start ${label}: ready`);
      const [runId] = await publishEvents(b.nc, 1, `${name}-warm`);
      await watch.arrival(runId, b.timeout);
    } finally {
      await first.stop();
    }
    for (let r = 1; r <= reps; r++) {
      const [runId] = await publishEvents(b.nc, 1, `${name}-${r}`);
      const t0 = performance.now();
      const child = start();
      try {
        const at = await watch.arrival(runId, b.timeout);
        runs.push(round(at - t0, 1));
        b.progress(`cold start ${label} #${r}: ${(at - t0).toFixed(0)} ms`);
      } finally {
        const code = await child.stop();
        if (code !== 0) b.progress(`cold start ${label}: the program exited with ${code}`);
      }
    }
  } finally {
    await deleteConsumer(b.jsm, name);
  }
  return {
    runtime,
    transport,
    version: command.version,
    command: [command.cmd, ...command.args].join(" "),
    runs_ms: runs,
    median_ms: round(median(runs), 1),
  };
}

/**
 * Milliseconds from spawning a driver process to its first result, per
 * runtime, over TCP and then over WebSocket.
 */
export async function coldStart(b: Bench, o: ColdStartOptions): Promise<ColdStartFigure> {
  await purgeStreams(b.jsm);
  const watch = new ResultWatch(b.nc, true);
  await watch.ready();
  const cases: ColdStartCase[] = [];
  try {
    for (const transport of ["tcp", "ws"] as const) {
      for (const rt of o.runtimes) cases.push(await coldStartOn(b, rt, transport, o.reps, watch));
    }
  } finally {
    watch.stop();
  }
  return { reps: o.reps, cases };
}
