/**
 * Throughput of the driver runtime, as a ratio against a hand-written nats.js
 * loop run in the same process against the same nats-server.
 *
 *   deno run -A bench/throughput.ts [--events 2000] [--concurrency 16] [--rounds 5]
 *   bun run bench/throughput.ts [same flags]
 *
 * Env `BENCH_EVENTS`, `BENCH_CONCURRENCY`, `BENCH_ROUNDS`, `BENCH_WARMUP`,
 * `BENCH_TIMEOUT` and `BENCH_VARIANTS` set the same values; a flag wins over
 * its variable (`--help` lists them). See bench/README.md for how to read the
 * output and for the opt-in diagnostic variants.
 *
 * Both variants do the same wire work per event: take a `resources.bench`
 * event from a durable pull consumer on `messages`, decode it, publish one log
 * line to `logs.{run_id}` (JetStream, awaited) and `live.logs.{run_id}.{driver}`
 * (core), publish the result to `pipelines.driver.result` with a
 * `Nats-Msg-Id` (awaited), then acknowledge. A run is timed from the variant's
 * start (connect included) until all N results are stored.
 *
 * @module
 */
import process from "node:process";
import { availableParallelism } from "node:os";
import { parseArgs } from "node:util";
import { connect, headers, nanos, type NatsConnection } from "@nats-io/transport-node";
import {
  AckPolicy,
  DeliverPolicy,
  jetstream,
  type JetStreamClient,
  type JetStreamManager,
  jetstreamManager,
  type JsMsg,
} from "@nats-io/jetstream";
import {
  type Driver,
  filterSubjects,
  MESSAGES_STREAM,
  RESULT_SUBJECT,
  resultMsgId,
  type ServeOptions,
  startDriver,
} from "../mod.ts";
import { createConveyorStreams, publishEvent, startNatsServer } from "../testing.ts";

const RESOURCE = "bench";
const ACK_WAIT_MS = 30_000;
const POLL_MS = 1;
const PUBLISH_WINDOW = 256;

// ---------------------------------------------------------------- options

/** The variants `--variants` accepts; `baseline` and `runtime` are the default pair. */
const VARIANT_NAMES = [
  "baseline",
  "runtime",
  "fetch",
  "fetch-ackack",
  "runtime-notraces",
] as const;
type Variant = typeof VARIANT_NAMES[number];

interface Config {
  events: number;
  concurrency: number;
  rounds: number;
  warmup: number;
  timeout: number;
  variants: Variant[];
}

const USAGE = `usage: bench/throughput.ts [events] [options]
  -n, --events N        events per run (env BENCH_EVENTS, default 2000, max 100000)
  -c, --concurrency N   reconciles in flight, both variants (env BENCH_CONCURRENCY, default 16)
  -r, --rounds N        timed rounds per variant (env BENCH_ROUNDS, default 5, max 20)
  -w, --warmup N        untimed events per variant first (env BENCH_WARMUP, default min(200, events))
  -t, --timeout MS      limit of one run (env BENCH_TIMEOUT, default 120000)
      --variants LIST   comma-separated, from ${VARIANT_NAMES.join(", ")}
                        (env BENCH_VARIANTS, default baseline,runtime)
  -h, --help`;

function parseConfig(argv: string[]): Config {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      events: { type: "string", short: "n" },
      concurrency: { type: "string", short: "c" },
      rounds: { type: "string", short: "r" },
      warmup: { type: "string", short: "w" },
      timeout: { type: "string", short: "t" },
      variants: { type: "string" },
      help: { type: "boolean", short: "h" },
    },
  });
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  const int = (
    name: string,
    flag: string | undefined,
    env: string,
    fallback: number,
    min: number,
    max: number,
  ): number => {
    const raw = flag ?? process.env[env];
    if (raw === undefined || raw.trim() === "") return fallback;
    const n = Number(raw);
    if (!Number.isInteger(n) || n < min || n > max) {
      console.error(`${name} must be an integer in [${min}, ${max}], got ${JSON.stringify(raw)}`);
      console.error(USAGE);
      process.exit(2);
    }
    return n;
  };
  const variants = (values.variants ?? process.env.BENCH_VARIANTS ?? "baseline,runtime")
    .split(",").map((v) => v.trim()).filter((v) => v !== "");
  const unknown = variants.filter((v) => !(VARIANT_NAMES as readonly string[]).includes(v));
  if (unknown.length > 0 || variants.length === 0) {
    console.error(`unknown variant(s): ${unknown.join(", ") || "(none given)"}`);
    console.error(USAGE);
    process.exit(2);
  }
  const events = int("events", values.events ?? positionals[0], "BENCH_EVENTS", 2000, 1, 100_000);
  return {
    events,
    concurrency: int("concurrency", values.concurrency, "BENCH_CONCURRENCY", 16, 1, 1024),
    rounds: int("rounds", values.rounds, "BENCH_ROUNDS", 5, 1, 20),
    warmup: int("warmup", values.warmup, "BENCH_WARMUP", Math.min(200, events), 0, 100_000),
    timeout: int("timeout", values.timeout, "BENCH_TIMEOUT", 120_000, 1_000, 600_000),
    variants: [...new Set(variants)] as Variant[],
  };
}

function jsRuntime(): string {
  const g = globalThis as { Deno?: { version: { deno: string; v8: string } } };
  if (g.Deno) return `deno ${g.Deno.version.deno} (v8 ${g.Deno.version.v8})`;
  const bun = (process.versions as Record<string, string | undefined>).bun;
  if (bun) return `bun ${bun}`;
  return `node ${process.versions.node}`;
}

// ---------------------------------------------------------------- variants

/** A variant being run: how many results it has stored so far, and how to stop it. */
interface Running {
  done(): number;
  errors(): number;
  stop(): Promise<void>;
}

interface VariantSpec {
  /** Creates the durable consumer `name` (before the run's events are published). */
  prepare(jsm: JetStreamManager, name: string, cfg: Config): Promise<void>;
  /** Starts consuming with consumer `name`. */
  start(url: string, name: string, cfg: Config): Promise<Running>;
}

const encoder = new TextEncoder();

interface WireMessage {
  event: string;
  id: string;
  run_id: string;
  payload: string;
}

/**
 * The per-event wire work of a minimal hand-written driver: decode, one log
 * line (JetStream, awaited, plus core live copy), the result (awaited, with
 * its `Nats-Msg-Id`). The caller acknowledges.
 */
async function work(
  nc: NatsConnection,
  js: JetStreamClient,
  driver: string,
  m: JsMsg,
): Promise<void> {
  const wire = m.json<WireMessage>();
  const resource = JSON.parse(wire.payload);
  const entry = {
    runid: wire.run_id,
    driver,
    timestamp: new Date().toISOString(),
    message: `reconciled ${resource.name}`,
  };
  const data = encoder.encode(JSON.stringify(entry));
  const h = headers();
  h.set("Conveyor-Log-Level", "info");
  nc.publish(`live.logs.${wire.run_id}.${driver}`, data, { headers: h });
  await js.publish(`logs.${wire.run_id}`, data, { headers: h, msgID: `${wire.id}.1` });
  const envelope = {
    event: "driver.result",
    run_id: wire.run_id,
    resource,
    driverresult: { success: true, message: "ok", data: null, driver },
  };
  await js.publish(RESULT_SUBJECT, JSON.stringify(envelope), {
    msgID: resultMsgId(driver, wire.run_id, wire.id),
  });
}

function addConsumer(
  jsm: JetStreamManager,
  name: string,
  maxAckPending: number,
  filter: { filter_subject?: string; filter_subjects?: string[] },
): Promise<unknown> {
  return jsm.consumers.add(MESSAGES_STREAM, {
    name,
    durable_name: name,
    ...filter,
    ack_policy: AckPolicy.Explicit,
    deliver_policy: DeliverPolicy.All,
    ack_wait: nanos(ACK_WAIT_MS),
    max_ack_pending: maxAckPending,
  });
}

/**
 * The baseline: what a hand-written driver minimally does per event, with
 * plain nats.js and none of the runtime's features (validation, retries,
 * heartbeats, timeouts, confirmed acks, LogTape mirror...). `consume()` keeps
 * a pull request open; in-flight events are bounded by the consumer's
 * `max_ack_pending`.
 */
const baseline: VariantSpec = {
  async prepare(jsm, name, cfg) {
    await addConsumer(jsm, name, cfg.concurrency, { filter_subject: `resources.${RESOURCE}` });
  },
  async start(url, name, cfg) {
    const nc = await connect({ servers: url, name: `bench:${name}` });
    const js = jetstream(nc);
    const consumer = await js.consumers.get(MESSAGES_STREAM, name);
    const iter = await consumer.consume({ max_messages: cfg.concurrency });
    let done = 0;
    let errors = 0;
    const loop = (async () => {
      for await (const m of iter) {
        work(nc, js, name, m).then(() => {
          done++;
          m.ack();
        }, () => {
          errors++;
          m.nak();
        });
      }
    })();
    return {
      done: () => done,
      errors: () => errors,
      async stop() {
        iter.stop();
        await loop.catch(() => {});
        await nc.drain();
      },
    };
  },
};

/**
 * Diagnostic variants (opt-in): the baseline's wire work driven the way the
 * runtime pulls, i.e. local slots and `fetch({ max_messages: freeSlots })`
 * in a loop, acknowledged with a plain `ack()` or with an awaited `ackAck()`
 * before the slot is released. Between `baseline`, these and `runtime`, the
 * gap splits into pull pattern, confirmed ack, and the rest of the runtime.
 */
function fetchVariant(confirmAck: boolean): VariantSpec {
  return {
    async prepare(jsm, name) {
      await addConsumer(jsm, name, 1_000, { filter_subject: `resources.${RESOURCE}` });
    },
    async start(url, name, cfg) {
      const nc = await connect({ servers: url, name: `bench:${name}` });
      const js = jetstream(nc);
      const consumer = await js.consumers.get(MESSAGES_STREAM, name);
      let free = cfg.concurrency;
      let wake: (() => void) | undefined;
      let stopping = false;
      let current: { stop(): void } | undefined;
      let done = 0;
      let errors = 0;
      const inFlight = new Set<Promise<void>>();
      const release = () => {
        free++;
        wake?.();
      };
      const loop = (async () => {
        while (!stopping) {
          if (free === 0) await new Promise<void>((r) => (wake = r));
          wake = undefined;
          if (stopping) break;
          const iter = await consumer.fetch({ max_messages: free, expires: 30_000 });
          current = iter;
          if (stopping) iter.stop();
          for await (const m of iter) {
            free--;
            const p: Promise<void> = work(nc, js, name, m).then(async () => {
              done++;
              if (confirmAck) await m.ackAck();
              else m.ack();
            }).catch(() => {
              errors++;
              m.nak();
            }).finally(() => {
              inFlight.delete(p);
              release();
            });
            inFlight.add(p);
          }
        }
      })();
      return {
        done: () => done,
        errors: () => errors,
        async stop() {
          stopping = true;
          wake?.();
          current?.stop();
          await loop.catch(() => {});
          await Promise.all(inFlight);
          await nc.drain();
        },
      };
    },
  };
}

function benchDriver(name: string): Driver {
  return {
    name,
    resources: [RESOURCE],
    reconcile({ resource, logger }) {
      logger.info(`reconciled ${resource.name}`);
      return { success: true, message: "ok" };
    },
  };
}

/**
 * The runtime: `startDriver` with a driver that logs one line and succeeds.
 * With `nats`, extra connection options (diagnostic variants).
 */
function runtimeVariant(nats?: ServeOptions["nats"]): VariantSpec {
  return {
    async prepare(jsm, name) {
      // Exactly what startDriver would create, so it finds the consumer current.
      await addConsumer(jsm, name, 1_000, { filter_subjects: filterSubjects(benchDriver(name)) });
    },
    async start(url, name, cfg) {
      const running = await startDriver(benchDriver(name), {
        servers: url,
        concurrency: cfg.concurrency,
        ackWait: ACK_WAIT_MS,
        maxAckPending: 1_000,
        handleSignals: false,
        // LogTape stays unconfigured: no console output is measured.
        configureLogging: false,
        shutdownTimeout: 5_000,
        nats,
      });
      return {
        done: () => running.stats().succeeded,
        errors: () => {
          const s = running.stats();
          return s.failed + s.retried + s.invalid + s.requeued;
        },
        stop: () => running.stop(),
      };
    },
  };
}

const VARIANTS: Record<Variant, VariantSpec> = {
  baseline,
  runtime: runtimeVariant(),
  fetch: fetchVariant(false),
  "fetch-ackack": fetchVariant(true),
  // nats.js captures a stack trace (two Error objects) per request unless told not to.
  "runtime-notraces": runtimeVariant({ noAsyncTraces: true }),
};

// ---------------------------------------------------------------- harness

interface RunResult {
  variant: Variant;
  round: number;
  seconds: number;
  eps: number;
  cpuUsPerEvent: number;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

async function purgeAll(jsm: JetStreamManager): Promise<void> {
  for (const s of [MESSAGES_STREAM, "pipeline-engine", "logs-engine"]) {
    await jsm.streams.purge(s);
  }
}

async function publishEvents(nc: NatsConnection, n: number, tag: string): Promise<void> {
  for (let i = 0; i < n; i += PUBLISH_WINDOW) {
    const batch: Promise<unknown>[] = [];
    for (let j = i; j < Math.min(n, i + PUBLISH_WINDOW); j++) {
      batch.push(publishEvent(nc, { resource: RESOURCE, name: `${tag}-${j}`, spec: { i: j } }));
    }
    await Promise.all(batch);
  }
}

async function storedCount(jsm: JetStreamManager, stream: string): Promise<number> {
  return (await jsm.streams.info(stream)).state.messages;
}

/** One run: fresh streams, a fresh consumer, N events; timed until N results are stored. */
async function runOnce(
  nc: NatsConnection,
  url: string,
  variant: Variant,
  round: number,
  n: number,
  cfg: Config,
): Promise<RunResult> {
  const spec = VARIANTS[variant];
  const jsm = await jetstreamManager(nc);
  const name = `bench-${variant}-${round < 0 ? "warmup" : round}`;
  await purgeAll(jsm);
  await spec.prepare(jsm, name, cfg);
  try {
    await publishEvents(nc, n, name);
    const pending = (await jsm.consumers.info(MESSAGES_STREAM, name)).num_pending;
    if (pending !== n) throw new Error(`${name}: ${pending} events pending, expected ${n}`);

    const cpu0 = process.cpuUsage();
    const t0 = performance.now();
    const running = await spec.start(url, name, cfg);
    const deadline = t0 + cfg.timeout;
    let seconds = 0;
    let cpu = { user: 0, system: 0 };
    try {
      while (running.done() < n) {
        if (performance.now() > deadline) {
          throw new Error(
            `${name}: ${running.done()}/${n} results after ${cfg.timeout} ms ` +
              `(${running.errors()} errors)`,
          );
        }
        await sleep(POLL_MS);
      }
    } finally {
      seconds = (performance.now() - t0) / 1000;
      cpu = process.cpuUsage(cpu0);
      await running.stop();
    }

    // Check the run did what it claims: N results, N log lines, every event acknowledged.
    const results = await storedCount(jsm, "pipeline-engine");
    const logs = await storedCount(jsm, "logs-engine");
    if (results !== n || logs !== n) {
      throw new Error(`${name}: stored ${results} results and ${logs} log lines, expected ${n}`);
    }
    if (running.errors() > 0) throw new Error(`${name}: ${running.errors()} errors`);
    for (let i = 0;; i++) {
      const info = await jsm.consumers.info(MESSAGES_STREAM, name);
      if (info.num_pending === 0 && info.num_ack_pending === 0) break;
      if (i >= 100) {
        throw new Error(
          `${name}: ${info.num_pending} pending, ${info.num_ack_pending} unacknowledged at the end`,
        );
      }
      await sleep(20);
    }
    return {
      variant,
      round,
      seconds,
      eps: n / seconds,
      cpuUsPerEvent: (cpu.user + cpu.system) / n,
    };
  } finally {
    await jsm.consumers.delete(MESSAGES_STREAM, name).catch(() => {});
  }
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
}

const fmt = (x: number, digits = 0) =>
  x.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });

async function main(): Promise<void> {
  const cfg = parseConfig(process.argv.slice(2));
  const js = jsRuntime();
  await using server = await startNatsServer();
  // Interrupted: take the nats-server (and its store) down with us.
  const onSignal = () => void server.stop().finally(() => process.exit(130));
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);
  await createConveyorStreams(server.url);
  const nc = await connect({ servers: server.url, name: "bench-harness" });
  try {
    const natsVersion = nc.info?.version ?? "?";
    console.log(
      `throughput: ${cfg.events} events/run, concurrency ${cfg.concurrency}, ` +
        `${cfg.rounds} round(s), warm-up ${cfg.warmup}; ${js}, nats-server ${natsVersion} ` +
        `on ${server.url}, ${availableParallelism()} CPUs`,
    );
    if (cfg.warmup > 0) {
      for (const v of cfg.variants) await runOnce(nc, server.url, v, -1, cfg.warmup, cfg);
    }

    const runs: RunResult[] = [];
    console.log("");
    console.log("round  variant           seconds    events/s  client CPU us/event");
    for (let round = 1; round <= cfg.rounds; round++) {
      // Alternate the order so that drift (JIT, disk, caches) favours no variant.
      const order = round % 2 ? cfg.variants : [...cfg.variants].reverse();
      for (const v of order) {
        const r = await runOnce(nc, server.url, v, round, cfg.events, cfg);
        runs.push(r);
        console.log(
          `${String(round).padStart(5)}  ${v.padEnd(16)}  ${fmt(r.seconds, 3).padStart(7)}  ` +
            `${fmt(r.eps).padStart(10)}  ${fmt(r.cpuUsPerEvent).padStart(19)}`,
        );
      }
    }

    const of = (v: Variant) => runs.filter((r) => r.variant === v);
    const eps = (v: Variant) => median(of(v).map((r) => r.eps));
    const cpu = (v: Variant) => median(of(v).map((r) => r.cpuUsPerEvent));
    const hasBase = cfg.variants.includes("baseline");
    const base = hasBase ? eps("baseline") : NaN;
    console.log("");
    console.log("median            events/s  client CPU us/event  vs baseline");
    for (const v of cfg.variants) {
      console.log(
        `${v.padEnd(16)}  ${fmt(eps(v)).padStart(8)}  ${fmt(cpu(v)).padStart(19)}  ` +
          `${hasBase ? (eps(v) / base).toFixed(3).padStart(11) : "          -"}`,
      );
    }
    let ratio: number | undefined;
    let spread: [number, number] | undefined;
    let pairedMedian: number | undefined;
    if (hasBase && cfg.variants.includes("runtime")) {
      ratio = eps("runtime") / base;
      // Same-round ratios show how much of the result is noise.
      const perRound = of("runtime").map((r) =>
        r.eps / of("baseline").find((b) => b.round === r.round)!.eps
      );
      spread = [Math.min(...perRound), Math.max(...perRound)];
      pairedMedian = median(perRound);
      console.log("");
      console.log(
        `ratio runtime/baseline  ${ratio.toFixed(3)}  (1.0 = as fast as the baseline; ` +
          `same-round ratios ${spread[0].toFixed(2)}..${spread[1].toFixed(2)}, ` +
          `median ${pairedMedian.toFixed(2)})`,
      );
    }
    const medians = Object.fromEntries(cfg.variants.map((v) => [v, {
      eps: Math.round(eps(v)),
      cpu_us_per_event: Math.round(cpu(v)),
    }]));
    console.log(JSON.stringify({
      bench: "throughput",
      events: cfg.events,
      concurrency: cfg.concurrency,
      rounds: cfg.rounds,
      warmup: cfg.warmup,
      js_runtime: js,
      nats_server: natsVersion,
      cpus: availableParallelism(),
      baseline_eps: hasBase ? Math.round(base) : null,
      runtime_eps: cfg.variants.includes("runtime") ? Math.round(eps("runtime")) : null,
      ratio: ratio === undefined ? null : Number(ratio.toFixed(4)),
      ratio_range: spread?.map((x) => Number(x.toFixed(4))) ?? null,
      ratio_same_round_median: pairedMedian === undefined ? null : Number(pairedMedian.toFixed(4)),
      medians,
      runs: runs.map((r) => ({
        variant: r.variant,
        round: r.round,
        seconds: Number(r.seconds.toFixed(4)),
        eps: Math.round(r.eps),
        cpu_us_per_event: Math.round(r.cpuUsPerEvent),
      })),
    }));
  } finally {
    await nc.close().catch(() => {});
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
  }
}

await main();
