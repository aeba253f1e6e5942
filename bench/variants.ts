/**
 * What a run measures: the runtime (`startDriver` in this process) or a
 * hand-written nats.js v3 loop doing the same wire work per event. The
 * hand-written loops are the candidates for the overhead figure's baseline
 * (bench/README.md says which ones won and why); a diagnostic variant helps
 * split a gap into its causes.
 *
 * @module
 */
import { connect, headers, type NatsConnection } from "@nats-io/transport-node";
import {
  jetstream,
  type JetStreamClient,
  type JetStreamManager,
  type JsMsg,
} from "@nats-io/jetstream";
import { W3CTraceContextPropagator } from "@opentelemetry/core";
import { MeterProvider, MetricReader } from "@opentelemetry/sdk-metrics";
import { BatchSpanProcessor, type SpanExporter, TracerProvider } from "@opentelemetry/sdk-trace";
import {
  MESSAGES_STREAM,
  RESULT_SUBJECT,
  resultMsgId,
  startDriver,
  type TelemetryOptions,
} from "../mod.ts";
import { benchDriver, type Work } from "./drivers.ts";
import { ACK_WAIT_MS, addConsumer, MAX_ACK_PENDING, Semaphore } from "./harness.ts";

/** A variant consuming: its error count, and how to stop it. */
export interface Running {
  /** Events that failed (the run is then invalid). */
  errors(): number;
  /** Stops consuming and closes its connection. */
  stop(): Promise<void>;
}

/** One way of doing the work of a run. */
export interface Variant {
  /** The name used in flags, tables and the JSON. */
  readonly name: string;
  /** One line saying what it is. */
  readonly description: string;
  /** True for the runtime; false for a hand-written loop. */
  readonly runtime: boolean;
  /** Creates the durable consumer `name`, before the run's events are published. */
  prepare(jsm: JetStreamManager, name: string, concurrency: number): Promise<void>;
  /**
   * Starts consuming with consumer `name`, at most `concurrency` events in
   * work at once. Hand-written loops only do the no-op work (one log line).
   */
  start(url: string, name: string, concurrency: number, work: Work): Promise<Running>;
}

interface WireMessage {
  event: string;
  id: string;
  run_id: string;
  payload: string;
}

const encoder = new TextEncoder();

/**
 * The wire work of a minimal hand-written driver for one event: decode the
 * DriverMessage and its payload string, publish one log line (JetStream
 * `logs.{run_id}` with a `Nats-Msg-Id`, and core `live.logs.{run_id}.{driver}`),
 * then the result envelope with its `Nats-Msg-Id`, both confirmed. With
 * `pipelined`, the result is sent without waiting for the log line's
 * confirmation and both are awaited together. The caller acknowledges.
 */
async function work(
  nc: NatsConnection,
  js: JetStreamClient,
  driver: string,
  m: JsMsg,
  pipelined: boolean,
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
  const log = js.publish(`logs.${wire.run_id}`, data, { headers: h, msgID: `${wire.id}.1` });
  const envelope = JSON.stringify({
    event: "driver.result",
    run_id: wire.run_id,
    resource,
    driverresult: { success: true, message: "ok", data: null, driver },
  });
  const msgID = resultMsgId(driver, wire.run_id, wire.id);
  if (pipelined) {
    await Promise.all([log, js.publish(RESULT_SUBJECT, envelope, { msgID })]);
  } else {
    await log;
    await js.publish(RESULT_SUBJECT, envelope, { msgID });
  }
}

/** How a hand-written loop takes events and bounds its work. */
type Pull = "consume-map" | "consume-sem" | "fetch";

interface LoopOptions {
  pull: Pull;
  pipelined: boolean;
  /** Waits for the server's confirmation of each ack (`ackAck()`) before freeing the slot. */
  confirmAck?: boolean;
}

/**
 * A hand-written loop:
 * - `consume-map`: `consume({ max_messages: concurrency })`, work bounded by
 *   the consumer's `max_ack_pending` = concurrency (the server holds the rest);
 * - `consume-sem`: `consume({ max_messages: 2 × concurrency })` with a
 *   semaphore of `concurrency` permits (the nats.js README's pattern);
 * - `fetch`: local slots and `fetch({ max_messages: free slots })` in a loop,
 *   as the runtime pulls.
 */
function loop(name: string, description: string, o: LoopOptions): Variant {
  return {
    name,
    description,
    runtime: false,
    async prepare(jsm, consumer, concurrency) {
      await addConsumer(jsm, consumer, {
        runtime: false,
        maxAckPending: o.pull === "consume-map" ? concurrency : MAX_ACK_PENDING,
      });
    },
    async start(url, consumerName, concurrency) {
      // As the runtime connects: without it nats.js captures a stack trace
      // (an Error) per request, which costs CPU on every publish.
      const nc = await connect({
        servers: url,
        name: `bench:${consumerName}`,
        noAsyncTraces: true,
      });
      const js = jetstream(nc);
      const consumer = await js.consumers.get(MESSAGES_STREAM, consumerName);
      let errors = 0;
      const inFlight = new Set<Promise<void>>();
      /** Works on one event; `done` frees its slot. */
      const handle = (m: JsMsg, done: () => void): void => {
        const p: Promise<void> = work(nc, js, consumerName, m, o.pipelined).then(
          async () => {
            if (o.confirmAck) await m.ackAck();
            else m.ack();
          },
        ).catch(() => {
          errors++;
          m.nak();
        }).finally(() => {
          inFlight.delete(p);
          done();
        });
        inFlight.add(p);
      };
      let stopping = false;
      let current: { stop(): void } | undefined;
      let wake: (() => void) | undefined;
      let pulling: Promise<void>;
      if (o.pull === "fetch") {
        let free = concurrency;
        const release = () => {
          free++;
          wake?.();
        };
        pulling = (async () => {
          while (!stopping) {
            if (free === 0) await new Promise<void>((r) => (wake = r));
            wake = undefined;
            if (stopping) break;
            const iter = await consumer.fetch({ max_messages: free, expires: 5_000 });
            current = iter;
            if (stopping) iter.stop();
            for await (const m of iter) {
              free--;
              handle(m, release);
            }
          }
        })();
      } else {
        const sem = o.pull === "consume-sem" ? new Semaphore(concurrency) : undefined;
        const iter = await consumer.consume({
          max_messages: o.pull === "consume-sem" ? 2 * concurrency : concurrency,
        });
        current = iter;
        const release = () => sem?.release();
        pulling = (async () => {
          for await (const m of iter) {
            const wait = sem?.acquire();
            if (wait) await wait;
            handle(m, release);
          }
        })();
      }
      return {
        errors: () => errors,
        async stop() {
          stopping = true;
          wake?.();
          current?.stop();
          await pulling.catch(() => {});
          await Promise.all(inFlight);
          await nc.drain();
        },
      };
    },
  };
}

/** Telemetry a runtime variant starts with, and how to shut it down. */
interface TelemetrySetup {
  options: TelemetryOptions;
  shutdown(): Promise<void>;
}

/** `startDriver` with a `benchDriver`, LogTape left unconfigured (no console output is measured). */
function runtimeVariant(
  name: string,
  description: string,
  telemetry?: () => TelemetrySetup,
): Variant {
  return {
    name,
    description,
    runtime: true,
    async prepare(jsm, consumer) {
      await addConsumer(jsm, consumer, { runtime: true });
    },
    async start(url, consumer, concurrency, w) {
      const t = telemetry?.();
      const running = await startDriver(benchDriver(consumer, w), {
        servers: url,
        concurrency,
        ackWait: ACK_WAIT_MS,
        maxAckPending: MAX_ACK_PENDING,
        handleSignals: false,
        configureLogging: false,
        shutdownTimeout: 5_000,
        telemetry: t?.options,
      });
      return {
        errors: () => {
          const s = running.stats();
          return s.failed + s.retried + s.invalid + s.requeued;
        },
        stop: async () => {
          await running.stop();
          await t?.shutdown();
        },
      };
    },
  };
}

/**
 * The runtime, as measured by every figure: `startDriver` in this process
 * with a `benchDriver`, OpenTelemetry not set up (its API is a no-op).
 */
export const RUNTIME: Variant = runtimeVariant(
  "runtime",
  "startDriver(), reconcile logs one line via ctx.logger and returns { success: true }",
);

/** An exporter that drops what it gets: the SDK's cost without an exporter's. */
const discard = {
  export(_items: unknown, done: (r: { code: number }) => void) {
    done({ code: 0 });
  },
  shutdown: () => Promise.resolve(),
  forceFlush: () => Promise.resolve(),
};

/** A metric reader nobody collects from: the instruments aggregate as in production. */
class IdleReader extends MetricReader {
  protected override onForceFlush(): Promise<void> {
    return Promise.resolve();
  }
  protected override onShutdown(): Promise<void> {
    return Promise.resolve();
  }
}

function tracing(): TelemetrySetup {
  const tracerProvider = new TracerProvider({
    spanProcessors: [new BatchSpanProcessor({ exporter: discard as unknown as SpanExporter })],
  });
  return {
    options: { tracerProvider, propagator: new W3CTraceContextPropagator() },
    shutdown: () => tracerProvider.shutdown(),
  };
}

/** The runtime with OpenTelemetry tracing on: every span sampled, batched, exported to nowhere. */
export const RUNTIME_TRACED: Variant = runtimeVariant(
  "runtime-traced",
  "runtime with an OpenTelemetry SDK tracer provider (all sampled, batch processor, " +
    "W3C propagation into log and result headers)",
  tracing,
);

/** The runtime with OpenTelemetry tracing and metrics on. */
export const RUNTIME_OTEL: Variant = runtimeVariant(
  "runtime-otel",
  "runtime-traced plus an OpenTelemetry SDK meter provider",
  () => {
    const t = tracing();
    const meterProvider = new MeterProvider({ readers: [new IdleReader()] });
    return {
      options: { ...t.options, meterProvider },
      shutdown: async () => {
        await t.shutdown();
        await meterProvider.shutdown();
      },
    };
  },
);

/** The hand-written candidates for the overhead figure's baseline. */
export const BASELINES: readonly Variant[] = [
  loop("consume-map", "consume(), in-flight bounded by max_ack_pending = concurrency", {
    pull: "consume-map",
    pipelined: false,
  }),
  loop("consume-map-pipe", "consume-map, log and result published together", {
    pull: "consume-map",
    pipelined: true,
  }),
  loop("consume-sem", "consume({ max_messages: 2c }) + a semaphore of c", {
    pull: "consume-sem",
    pipelined: false,
  }),
  loop("consume-sem-pipe", "consume-sem, log and result published together", {
    pull: "consume-sem",
    pipelined: true,
  }),
  loop("fetch", "fetch({ max_messages: free slots }) in a loop, as the runtime pulls", {
    pull: "fetch",
    pipelined: false,
  }),
  loop("fetch-pipe", "fetch, log and result published together", {
    pull: "fetch",
    pipelined: true,
  }),
];

/**
 * The baseline candidates the overhead figure runs unless told otherwise (the
 * fastest by median is the baseline): `consume-sem-pipe` alone, the fastest
 * correct loop of all {@link BASELINES} at every concurrency on Deno, Bun and
 * Node on this project's machine (bench/README.md has the measurements).
 * `--baseline auto` runs them all again.
 */
export const DEFAULT_BASELINES: readonly string[] = ["consume-sem-pipe"];

/** Opt-in diagnostic variants, to split a gap between baseline and runtime into its causes. */
export const DIAGNOSTICS: readonly Variant[] = [
  RUNTIME_TRACED,
  RUNTIME_OTEL,
  loop("fetch-ackack", "fetch, each ack confirmed (ackAck) before its slot is freed", {
    pull: "fetch",
    pipelined: false,
    confirmAck: true,
  }),
];

/** Every variant by name. */
export function variantByName(name: string): Variant | undefined {
  return [RUNTIME, ...BASELINES, ...DIAGNOSTICS].find((v) => v.name === name);
}
