/**
 * The benchmark suite's command: starts its own nats-server, runs every
 * figure, prints a table with the targets and writes the JSON report
 * to bench/results/<timestamp>-<runtime>.json. bench/README.md explains the
 * figures and how to read them.
 *
 *   deno run -A bench/main.ts [options]
 *   bun run bench/main.ts [options]
 *   node npm/bench/main.js [options]        (after `node scripts/build_npm.mjs`)
 *   node scripts/bench.mjs --runtime deno|bun|node|all [options]
 *
 * `--help` lists the options.
 *
 * @module
 */
import process from "node:process";
import { mkdirSync, realpathSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import type { NatsServer } from "../testing.ts";
import {
  currentRuntime,
  killChildren,
  machineInfo,
  type RuntimeName,
  runtimeVersions,
} from "./harness.ts";
import {
  allTargetsMet,
  defaultConfig,
  defaultResultsDir,
  type FigureName,
  FIGURES,
  fileStamp,
  formatTable,
  runSuite,
  smokeConfig,
  type SuiteConfig,
} from "./suite.ts";
import { BASELINES, DEFAULT_BASELINES, DIAGNOSTICS } from "./variants.ts";

const USAGE = `usage: bench/main.ts [options]

  --smoke                   every figure, tiny (the test's preset); other flags apply on top
  --only LIST               figures to run: ${FIGURES.join(",")}
  --skip LIST               figures to leave out
  -n, --events N            events per overhead run, most per slow-work run (20000)
  -c, --concurrency LIST    overhead and slow-work concurrencies (1,16,64)
  -r, --reps N              repetitions of overhead, slow work, logs, latency (3)
      --warmup N            untimed events per overhead variant first (500)
      --baseline LIST       overhead baseline candidates, the fastest wins; auto: all of
                            ${BASELINES.map((b) => b.name).join(", ")}
                            (${DEFAULT_BASELINES.join(",")})
      --diagnostics LIST    extra overhead variants: ${DIAGNOSTICS.map((d) => d.name).join(", ")}
      --sleep-ms N          the slow reconcile's sleep (5)
      --slow-seconds N      length of a slow-work run at the ideal rate (2)
      --log-events N        events per logs run (200)
      --log-lines N         lines logged per event, K (100)
      --log-concurrency N   (16)
      --latency-rate N      paced events/s (100)
      --latency-events N    events measured paced (500)
      --saturation-events N events measured at saturation (5000)
      --latency-concurrency N (16)
      --memory-events N     events through the memory figure's driver process (100000)
      --memory-step N       events between its readings (10000)
      --memory-concurrency N (64)
      --memory-reps N       driver processes (3)
      --cold-start LIST     runtimes to cold-start: deno,bun,node or all (the running one)
      --cold-reps N         timed starts per runtime (5)
  -t, --timeout MS          limit of one run (120000)
  -o, --out DIR             where the JSON goes (bench/results)
  -q, --quiet               no progress lines, only the table
      --strict              exit 1 when a target is missed
  -h, --help`;

class UsageError extends Error {}

/** The nats-server of the run in progress, for the signal handler. */
let activeServer: NatsServer | undefined;

function parseList(raw: string, allowed: readonly string[], what: string): string[] {
  const list = raw.split(",").map((x) => x.trim()).filter((x) => x !== "");
  const bad = list.filter((x) => !allowed.includes(x));
  if (bad.length || list.length === 0) {
    throw new UsageError(`unknown ${what}: ${bad.join(", ") || "(none)"}`);
  }
  return [...new Set(list)];
}

function parseNumber(raw: string, what: string, min: number, integer = true): number {
  const n = Number(raw);
  if (!Number.isFinite(n) || n < min || (integer && !Number.isInteger(n))) {
    throw new UsageError(`${what} must be ${integer ? "an integer" : "a number"} >= ${min}`);
  }
  return n;
}

/** Reads the command line into a suite config, the output directory and the output flags. */
export function parseCommandLine(
  argv: string[],
): { config: SuiteConfig; out: string; quiet: boolean; strict: boolean } | "help" {
  const { values } = parseArgs({
    args: argv,
    options: {
      smoke: { type: "boolean" },
      only: { type: "string" },
      skip: { type: "string" },
      events: { type: "string", short: "n" },
      concurrency: { type: "string", short: "c" },
      reps: { type: "string", short: "r" },
      warmup: { type: "string" },
      baseline: { type: "string" },
      diagnostics: { type: "string" },
      "sleep-ms": { type: "string" },
      "slow-seconds": { type: "string" },
      "log-events": { type: "string" },
      "log-lines": { type: "string" },
      "log-concurrency": { type: "string" },
      "latency-rate": { type: "string" },
      "latency-events": { type: "string" },
      "saturation-events": { type: "string" },
      "latency-concurrency": { type: "string" },
      "memory-events": { type: "string" },
      "memory-step": { type: "string" },
      "memory-concurrency": { type: "string" },
      "memory-reps": { type: "string" },
      "cold-start": { type: "string" },
      "cold-reps": { type: "string" },
      timeout: { type: "string", short: "t" },
      out: { type: "string", short: "o" },
      quiet: { type: "boolean", short: "q" },
      strict: { type: "boolean" },
      help: { type: "boolean", short: "h" },
    },
  });
  if (values.help) return "help";
  const c = values.smoke ? smokeConfig() : defaultConfig();
  const int = (key: keyof typeof values, min = 1) => {
    const raw = values[key];
    return typeof raw === "string" ? parseNumber(raw, `--${key}`, min) : undefined;
  };
  if (values.only) c.figures = parseList(values.only, FIGURES, "figure") as FigureName[];
  if (values.skip) {
    const skip = parseList(values.skip, FIGURES, "figure");
    c.figures = c.figures.filter((f) => !skip.includes(f));
  }
  c.events = int("events") ?? c.events;
  if (values.concurrency) {
    c.concurrencies = values.concurrency.split(",").map((x) =>
      parseNumber(x.trim(), "--concurrency", 1)
    );
  }
  c.reps = int("reps") ?? c.reps;
  c.warmup = int("warmup", 0) ?? c.warmup;
  if (values.baseline) {
    const names = BASELINES.map((b) => b.name);
    c.baselines = values.baseline === "auto"
      ? names
      : parseList(values.baseline, names, "baseline");
  }
  if (values.diagnostics) {
    c.diagnostics = parseList(values.diagnostics, DIAGNOSTICS.map((d) => d.name), "diagnostic");
  }
  c.sleepMs = int("sleep-ms") ?? c.sleepMs;
  if (values["slow-seconds"]) {
    c.slowSeconds = parseNumber(values["slow-seconds"], "--slow-seconds", 0.01, false);
  }
  c.logEvents = int("log-events") ?? c.logEvents;
  c.logLines = int("log-lines") ?? c.logLines;
  c.logConcurrency = int("log-concurrency") ?? c.logConcurrency;
  c.latencyRate = int("latency-rate") ?? c.latencyRate;
  c.latencyEvents = int("latency-events") ?? c.latencyEvents;
  c.saturationEvents = int("saturation-events") ?? c.saturationEvents;
  c.latencyConcurrency = int("latency-concurrency") ?? c.latencyConcurrency;
  c.memoryEvents = int("memory-events", 2) ?? c.memoryEvents;
  c.memoryStep = int("memory-step") ?? c.memoryStep;
  c.memoryConcurrency = int("memory-concurrency") ?? c.memoryConcurrency;
  c.memoryReps = int("memory-reps") ?? c.memoryReps;
  if (values["cold-start"]) {
    const runtimes = ["deno", "bun", "node"];
    c.coldStartRuntimes = (values["cold-start"] === "all"
      ? runtimes
      : parseList(values["cold-start"], runtimes, "runtime")) as RuntimeName[];
  }
  c.coldStartReps = int("cold-reps") ?? c.coldStartReps;
  c.timeout = int("timeout", 1_000) ?? c.timeout;
  if (c.memoryStep >= c.memoryEvents) {
    throw new UsageError("--memory-step must be below --memory-events (two readings at least)");
  }
  if (c.figures.length === 0) throw new UsageError("no figure left to run");
  return {
    config: c,
    out: values.out ?? defaultResultsDir(),
    quiet: values.quiet ?? false,
    strict: values.strict ?? false,
  };
}

/**
 * Runs the suite as the command line says; resolves to the exit code (0:
 * it ran; 1: a run failed, or with --strict a target was missed; 2: usage).
 * Writes the JSON report into the output directory.
 */
export async function main(argv: string[]): Promise<number> {
  let parsed: ReturnType<typeof parseCommandLine>;
  try {
    parsed = parseCommandLine(argv);
  } catch (err) {
    if (!(err instanceof UsageError) && !(err instanceof TypeError)) throw err;
    console.error(`${err.message}\n\n${USAGE}`);
    return 2;
  }
  if (parsed === "help") {
    console.log(USAGE);
    return 0;
  }
  const { config, out, quiet, strict } = parsed;
  const rt = runtimeVersions();
  const m = machineInfo();
  console.log(
    `bench: ${rt.name} ${rt.version} (${rt.engine}), ${m.cpus} CPUs (${m.cpu_model}); ` +
      `figures ${config.figures.join(", ")}`,
  );
  const t0 = performance.now();
  const report = await runSuite(config, {
    progress: quiet ? undefined : (line) => console.log(`  ${line}`),
    started: (server) => (activeServer = server),
  }).catch((err) => {
    console.error(`bench: ${err instanceof Error ? err.stack ?? err.message : err}`);
    return undefined;
  });
  if (!report) return 1;
  mkdirSync(out, { recursive: true });
  const file = join(out, `${fileStamp(report.started_at)}-${currentRuntime()}.json`);
  writeFileSync(file, JSON.stringify(report, null, 2) + "\n");
  console.log("");
  console.log(
    `${rt.name} ${rt.version}, nats-server ${report.nats_server}, ${m.cpus} CPUs, ` +
      `reps ${config.reps}, ${config.events} events/run`,
  );
  console.log(formatTable(report));
  console.log("");
  console.log(`${((performance.now() - t0) / 1000).toFixed(1)} s; results in ${file}`);
  return strict && !allTargetsMet(report) ? 1 : 0;
}

/** True when this module is the program being run (not imported, e.g. by bench_test.ts). */
function isEntry(): boolean {
  const meta = import.meta as ImportMeta & { main?: boolean };
  if (typeof meta.main === "boolean") return meta.main;
  // Node 20 has no import.meta.main.
  const argv1 = process.argv[1];
  if (!argv1) return false;
  try {
    return realpathSync(argv1) === realpathSync(fileURLToPath(import.meta.url));
  } catch {
    return false;
  }
}

if (isEntry()) {
  // Interrupted: take the nats-server and the driver processes down too.
  const onSignal = () => {
    killChildren();
    void (activeServer?.stop() ?? Promise.resolve()).finally(() => process.exit(130));
  };
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);
  process.exitCode = await main(process.argv.slice(2));
  process.off("SIGINT", onSignal);
  process.off("SIGTERM", onSignal);
}
