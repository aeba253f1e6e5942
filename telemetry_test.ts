// Traces, metrics and runtime diagnostics, checked with the OpenTelemetry
// SDK's in-memory exporters and a LogTape test sink against a real
// nats-server: what a platform team's collector would receive.
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import {
  type Attributes,
  context,
  propagation,
  SpanKind,
  SpanStatusCode,
  trace,
} from "@opentelemetry/api";
import { AsyncLocalStorageContextManager } from "@opentelemetry/context-async-hooks";
import { W3CTraceContextPropagator } from "@opentelemetry/core";
import {
  InMemorySpanExporter,
  type ReadableSpan,
  SimpleSpanProcessor,
  TracerProvider,
} from "@opentelemetry/sdk-trace";
import {
  type DataPoint,
  type Histogram,
  MeterProvider,
  MetricReader,
} from "@opentelemetry/sdk-metrics";
import { configure, type LogRecord, reset } from "@logtape/logtape";
import { jetstream } from "@nats-io/jetstream";
import { Client, type Driver, PermanentError, startDriver } from "./mod.ts";
import { METRICS } from "./telemetry.ts";
import { publishEvent, readStream } from "./testing.ts";
import { startTestApiServer } from "./test_api_server.ts";
import { conveyorEnv, quiet, spawnProgram, waitFor, waitForResults } from "./test_util.ts";

const TRACE_ID = "0af7651916cd43dd8448eb211c80319c";
const PARENT_ID = "b7ad6b7169203331";
const incoming = { traceparent: `00-${TRACE_ID}-${PARENT_ID}-01` };

function tracing() {
  const exporter = new InMemorySpanExporter();
  const tracerProvider = new TracerProvider({
    spanProcessors: [new SimpleSpanProcessor({ exporter })],
  });
  return { exporter, tracerProvider, propagator: new W3CTraceContextPropagator() };
}

const processSpans = (spans: ReadableSpan[]) =>
  spans.filter((s) => s.name === "process resources.pipeline");

const traceparentOf = (s: ReadableSpan) =>
  `00-${s.spanContext().traceId}-${s.spanContext().spanId}-01`;

/** A metric reader the test collects from when it wants. */
class TestReader extends MetricReader {
  protected override onForceFlush(): Promise<void> {
    return Promise.resolve();
  }
  protected override onShutdown(): Promise<void> {
    return Promise.resolve();
  }
}

type Points = Map<string, DataPoint<number | Histogram>[]>;

async function collect(reader: MetricReader): Promise<Points> {
  const { resourceMetrics, errors } = await reader.collect();
  assert.deepEqual(errors, []);
  const out: Points = new Map();
  for (const scope of resourceMetrics.scopeMetrics) {
    assert.equal(scope.scope.name, "@conveyor/driver");
    for (const m of scope.metrics) {
      out.set(m.descriptor.name, m.dataPoints as DataPoint<number | Histogram>[]);
    }
  }
  return out;
}

/** Sum of the points of `name` whose attributes include `match`. */
function total(points: Points, name: string, match: Attributes = {}): number {
  let sum = 0;
  for (const p of points.get(name) ?? []) {
    if (!Object.entries(match).every(([k, v]) => p.attributes[k] === v)) continue;
    sum += typeof p.value === "number" ? p.value : p.value.count;
  }
  return sum;
}

describe("tracing", () => {
  // The context manager an OpenTelemetry SDK set-up registers: the active
  // context follows async code (AsyncLocalStorage on Deno, Bun and Node).
  before(() => {
    context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable());
  });
  after(() => context.disable());

  it("continues the event's trace in one span per delivery, carried into its logs, result and API calls", async () => {
    await using env = await conveyorEnv();
    await using api = await startTestApiServer();
    const { exporter, tracerProvider, propagator } = tracing();
    const tracer = tracerProvider.getTracer("the-driver");
    // The API client injects with the global propagator, as an SDK sets it up.
    propagation.setGlobalPropagator(propagator);
    const driver: Driver = {
      name: "traced",
      resources: ["pipeline"],
      reconcile(ctx) {
        ctx.logger.info("one");
        // A child span by hand, parented on ctx.traceContext: no context manager needed.
        tracer.startSpan("by hand", {}, ctx.traceContext).end();
        // A child span from the active context.
        return tracer.startActiveSpan("build", async (span) => {
          ctx.logger.info("two");
          await ctx.client!.health();
          span.end();
          return { success: true, message: "built" };
        });
      },
    };
    try {
      await using _running = await startDriver(driver, {
        servers: env.url,
        ...quiet,
        client: new Client({ baseUrl: api.url }),
        telemetry: { tracerProvider, propagator },
      });
      const sent = await publishEvent(env.nc, {
        resource: "pipeline",
        name: "web",
        headers: incoming,
      });
      const [result] = await waitForResults(env, 1);
      await waitFor(() => processSpans(exporter.getFinishedSpans()).length === 1, "the span");
      const spans = exporter.getFinishedSpans();
      const [process] = processSpans(spans);
      assert.equal(process.kind, SpanKind.CONSUMER);
      assert.equal(process.spanContext().traceId, TRACE_ID, "the event's trace continues");
      assert.equal(process.parentSpanContext?.spanId, PARENT_ID);
      assert.equal(process.instrumentationScope.name, "@conveyor/driver");
      assert.deepEqual(process.attributes, {
        "messaging.system": "nats",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "resources.pipeline",
        "messaging.consumer.group.name": "traced",
        "messaging.message.body.size": process.attributes["messaging.message.body.size"],
        "messaging.message.id": sent.message.id,
        "conveyor.driver": "traced",
        "conveyor.attempt": 1,
        "conveyor.stream.sequence": sent.seq,
        "conveyor.resource.type": "pipeline",
        "conveyor.resource.name": "web",
        "conveyor.run_id": sent.message.run_id,
        "conveyor.event": "create",
        "conveyor.outcome": "succeeded",
      });
      assert.ok(Number(process.attributes["messaging.message.body.size"]) > 100);
      assert.equal(process.status.code, SpanStatusCode.UNSET);

      const byHand = spans.find((s) => s.name === "by hand")!;
      const build = spans.find((s) => s.name === "build")!;
      for (const child of [byHand, build]) {
        assert.equal(child.spanContext().traceId, TRACE_ID);
        assert.equal(child.parentSpanContext?.spanId, process.spanContext().spanId);
      }

      // Read back from the streams: the logs and the result carry the span.
      const logs = await readStream(env.nc, "logs-engine", `logs.${sent.message.run_id}`);
      assert.equal(logs.length, 2);
      for (const line of logs) assert.equal(line.headers.traceparent, traceparentOf(process));
      assert.equal(result.headers.traceparent, traceparentOf(process));
      // The API call made inside "build" continues from "build".
      const call = api.requests.find((r) => r.path === "/health")!;
      assert.equal(call.headers.traceparent, traceparentOf(build));
    } finally {
      propagation.disable();
    }
  });

  it("records failures on the span: the error, its type and an error status, on every attempt", async () => {
    await using env = await conveyorEnv();
    const { exporter, tracerProvider, propagator } = tracing();
    await using _running = await startDriver({
      name: "failing",
      resources: ["pipeline"],
      async reconcile({ resource, signal }) {
        if (resource.name === "slow") {
          await new Promise((_, reject) =>
            signal.addEventListener("abort", () => reject(signal.reason))
          );
        }
        if (resource.name === "perm") throw new PermanentError("spec.image is required");
        throw new Error("boom");
      },
    }, {
      servers: env.url,
      ...quiet,
      maxAttempts: 2,
      retryDelay: 50,
      reconcileTimeout: 300,
      telemetry: { tracerProvider, propagator },
    });
    await publishEvent(env.nc, { resource: "pipeline", name: "boom" });
    await publishEvent(env.nc, { resource: "pipeline", name: "perm" });
    await publishEvent(env.nc, { resource: "pipeline", name: "slow" });
    await jetstream(env.nc).publish("resources.pipeline", "{ not json", { headers: undefined });
    const results = await waitForResults(env, 3);
    await waitFor(() => processSpans(exporter.getFinishedSpans()).length === 6, "6 spans");
    const spans = processSpans(exporter.getFinishedSpans());
    const of = (name: string) =>
      spans.filter((s) => s.attributes["conveyor.resource.name"] === name)
        .sort((a, b) =>
          Number(a.attributes["conveyor.attempt"]) - Number(b.attributes["conveyor.attempt"])
        );

    const [first, second] = of("boom");
    assert.equal(first.attributes["conveyor.outcome"], "retried");
    assert.equal(second.attributes["conveyor.outcome"], "failed");
    for (const s of [first, second]) {
      assert.equal(s.status.code, SpanStatusCode.ERROR);
      assert.equal(s.status.message, "boom");
      assert.equal(s.attributes["error.type"], "Error");
      const ex = s.events.find((e) => e.name === "exception")!;
      assert.equal(ex.attributes!["exception.message"], "boom");
    }
    assert.notEqual(
      first.spanContext().traceId,
      second.spanContext().traceId,
      "no parent: new traces",
    );
    const boomResult = results.find((r) =>
      (r.json as { resource: { name: string } }).resource.name === "boom"
    )!;
    assert.equal(
      boomResult.headers.traceparent,
      traceparentOf(second),
      "the result joins the last attempt",
    );

    const [perm] = of("perm");
    assert.equal(perm.attributes["conveyor.outcome"], "failed");
    assert.equal(perm.attributes["error.type"], "PermanentError");

    const slow = of("slow");
    assert.deepEqual(slow.map((s) => s.attributes["conveyor.outcome"]), ["retried", "failed"]);
    assert.equal(slow[0].attributes["error.type"], "ReconcileTimeoutError");

    const [bad] = spans.filter((s) => s.attributes["conveyor.resource.name"] === undefined);
    assert.equal(bad.attributes["conveyor.outcome"], "terminated");
    assert.equal(bad.attributes["error.type"], "InvalidMessageError");
    assert.equal(bad.status.code, SpanStatusCode.ERROR);
  });

  it("starts a new trace for a malformed or hostile traceparent, and processes the event", async () => {
    await using env = await conveyorEnv();
    const { exporter, tracerProvider, propagator } = tracing();
    await using _running = await startDriver({
      name: "hostile",
      resources: ["pipeline"],
      reconcile: () => ({ success: true, message: "ok" }),
    }, { servers: env.url, ...quiet, telemetry: { tracerProvider, propagator } });
    const hostile: Record<string, string>[] = [
      { traceparent: "garbage" },
      { traceparent: `00-${"0".repeat(32)}-${PARENT_ID}-01` }, // the invalid all-zero trace id
      { traceparent: `00-${TRACE_ID}-${PARENT_ID}-01`.repeat(500) },
      {
        traceparent: incoming.traceparent,
        tracestate: Array.from({ length: 200 }, (_, i) => `k${i}=${"v".repeat(200)}`).join(","),
      },
    ];
    for (const headers of hostile) {
      await publishEvent(env.nc, { resource: "pipeline", name: "web", headers });
    }
    const results = await waitForResults(env, hostile.length);
    assert.ok(
      results.every((r) => (r.json as { driverresult: { success: boolean } }).driverresult.success),
    );
    await waitFor(() => processSpans(exporter.getFinishedSpans()).length === 4, "4 spans");
    const spans = processSpans(exporter.getFinishedSpans());
    const continued = spans.filter((s) => s.spanContext().traceId === TRACE_ID);
    // Only the valid traceparent continues; its oversized tracestate is cut, not passed on whole.
    assert.equal(continued.length, 1);
    assert.ok((continued[0].spanContext().traceState?.serialize() ?? "").length <= 512);
    for (const r of results) {
      assert.ok((r.headers.tracestate ?? "").length <= 512, "no oversized tracestate passed on");
    }
  });

  it("uses a tracer provider registered globally after the driver started", async () => {
    await using env = await conveyorEnv();
    const { exporter, tracerProvider, propagator } = tracing();
    await using _running = await startDriver({
      name: "late",
      resources: ["pipeline"],
      reconcile: () => {},
    }, { servers: env.url, ...quiet });
    trace.setGlobalTracerProvider(tracerProvider);
    propagation.setGlobalPropagator(propagator);
    try {
      await publishEvent(env.nc, { resource: "pipeline", name: "web", headers: incoming });
      const [result] = await waitForResults(env, 1);
      await waitFor(() => processSpans(exporter.getFinishedSpans()).length === 1, "the span");
      const [span] = processSpans(exporter.getFinishedSpans());
      assert.equal(span.spanContext().traceId, TRACE_ID);
      assert.equal(result.headers.traceparent, traceparentOf(span));
    } finally {
      trace.disable();
      propagation.disable();
    }
  });

  it("is a no-op until set up: a non-recording span, no trace headers added", async () => {
    await using env = await conveyorEnv();
    const seen: { recording: boolean; valid: boolean }[] = [];
    await using _running = await startDriver({
      name: "untraced",
      resources: ["pipeline"],
      reconcile({ traceContext, logger }) {
        const span = trace.getSpan(traceContext)!;
        seen.push({
          recording: span.isRecording(),
          valid: span.spanContext().traceId !== "0".repeat(32),
        });
        span.setAttribute("ignored", true).addEvent("ignored");
        logger.info("a line");
      },
    }, { servers: env.url, ...quiet });
    const sent = await publishEvent(env.nc, { resource: "pipeline", name: "web" });
    const [result] = await waitForResults(env, 1);
    assert.deepEqual(seen, [{ recording: false, valid: false }]);
    const [line] = await readStream(env.nc, "logs-engine", `logs.${sent.message.run_id}`);
    assert.equal(line.headers.traceparent, undefined);
    assert.equal(result.headers.traceparent, undefined);
  });
});

describe("metrics", () => {
  it("counts a known mix by outcome, times reconciles, and reports the gauges", async () => {
    await using env = await conveyorEnv();
    const reader = new TestReader();
    const meterProvider = new MeterProvider({ readers: [reader] });
    let open!: () => void;
    const gate = new Promise<void>((r) => (open = r));
    const running = await startDriver({
      name: "measured",
      resources: ["pipeline"],
      events: ["create"],
      async reconcile({ resource, attempt, logger, signal }) {
        logger.info(`working on ${resource.name}`);
        switch (resource.name) {
          case "gate":
            await gate;
            return;
          case "failure":
            return { success: false, message: "tests failed" };
          case "perm":
            throw new PermanentError("cannot ever work");
          case "flaky":
            if (attempt === 1) throw new Error("first try fails");
            return;
          case "hang":
            await new Promise((_, reject) =>
              signal.addEventListener("abort", () => reject(signal.reason))
            );
        }
      },
    }, {
      servers: env.url,
      ...quiet,
      concurrency: 1,
      maxAttempts: 2,
      retryDelay: 100,
      shutdownTimeout: 100,
      telemetry: { meterProvider },
    });
    try {
      for (const name of ["gate", "ok-1", "ok-2", "failure", "perm"]) {
        await publishEvent(env.nc, { resource: "pipeline", name });
      }
      // One slot, busy with "gate": nothing is pulled ahead before a reconcile
      // has finished, so the other four wait in the stream. The consumer is
      // read every 10 s.
      await waitFor(
        async () => {
          const p = await collect(reader);
          return total(p, METRICS.pending) === 4 ? p : undefined;
        },
        "the pending gauge at 4",
        15_000,
      ).then((p) => {
        const driverOnly = { "conveyor.driver": "measured" };
        assert.equal(total(p, METRICS.active, driverOnly), 1);
        assert.equal(total(p, METRICS.hung), 0);
        assert.equal(total(p, METRICS.queued), 0);
        assert.equal(total(p, METRICS.ackPending), 1);
        assert.deepEqual(p.get(METRICS.pending)![0].attributes, driverOnly);
      });
      open();
      await publishEvent(env.nc, { resource: "pipeline", name: "flaky" });
      await jetstream(env.nc).publish("resources.pipeline", "not json");
      await publishEvent(env.nc, { resource: "pipeline", name: "skip", event: "delete" });
      await waitFor(() => {
        const s = running.stats();
        return s.succeeded === 4 && s.failed === 2 && s.invalid === 1 && s.skipped === 1 &&
          s.settling === 0;
      }, "the mix settled");
      await publishEvent(env.nc, { resource: "pipeline", name: "hang" });
      await waitFor(() => running.stats().inFlight === 1, "hang running");
    } finally {
      open();
      await running.stop();
    }

    const p = await collect(reader);
    const pipeline = { "conveyor.driver": "measured", "conveyor.resource.type": "pipeline" };
    const create = { ...pipeline, "conveyor.event": "create" };
    assert.equal(
      total(p, METRICS.received),
      10,
      "gate ok-1 ok-2 failure perm flaky×2 bad skip hang",
    );
    assert.equal(total(p, METRICS.received, create), 8);
    assert.equal(total(p, METRICS.received, { ...pipeline, "conveyor.event": "delete" }), 1);
    const settled = (outcome: string, extra: Attributes = {}) =>
      total(p, METRICS.settled, { "conveyor.outcome": outcome, ...extra });
    assert.equal(settled("succeeded", create), 4);
    assert.equal(settled("failed", create), 2);
    assert.equal(settled("failed", { "error.type": "PermanentError" }), 1);
    assert.equal(settled("failed", { "error.type": "failure" }), 1);
    assert.equal(settled("retried", { ...create, "error.type": "Error" }), 1);
    assert.equal(settled("terminated", { ...pipeline, "error.type": "InvalidMessageError" }), 1);
    assert.equal(settled("skipped"), 1);
    assert.equal(settled("handed_back", create), 1);
    assert.equal(total(p, METRICS.settled), 10, "every delivery settled once");
    // Every reconcile that ran: gate ok-1 ok-2 failure perm flaky×2 hang.
    assert.equal(total(p, METRICS.duration), 8);
    const [succeeded] = (p.get(METRICS.duration) ?? []).filter((d) =>
      d.attributes["conveyor.outcome"] === "succeeded"
    ).map((d) => d.value as Histogram);
    assert.equal(succeeded.count, 4);
    // "gate" alone ran while the test waited for a 10 s consumer read.
    assert.ok((succeeded.sum ?? 0) > 0, `seconds: ${succeeded.sum}`);
    assert.equal(total(p, METRICS.logLines, pipeline), 8, "one line per reconcile, all stored");
    await meterProvider.shutdown();
  });
});

describe("runtime diagnostics", () => {
  it("go to LogTape categories under conveyor with structured properties, never to the console", async () => {
    const records: LogRecord[] = [];
    await configure({
      sinks: { test: (r) => void records.push(r) },
      loggers: [
        { category: ["conveyor"], lowestLevel: "debug", sinks: ["test"] },
        { category: ["logtape", "meta"], lowestLevel: "warning", sinks: [] },
      ],
    });
    const consoleCalls: string[] = [];
    const saved = { ...console };
    for (const m of ["log", "info", "warn", "error", "debug"] as const) {
      console[m] = (...args: unknown[]) => void consoleCalls.push(`${m}: ${args.join(" ")}`);
    }
    try {
      await using env = await conveyorEnv();
      const running = await startDriver({
        name: "diagnosed",
        resources: ["pipeline"],
        reconcile({ resource, attempt }) {
          if (resource.name === "flaky" && attempt === 1) throw new Error("first try fails");
        },
      }, { servers: env.url, handleSignals: false, maxAttempts: 3, retryDelay: 50 });
      await publishEvent(env.nc, { resource: "pipeline", name: "flaky" });
      await jetstream(env.nc).publish("resources.pipeline", "not json");
      await waitForResults(env, 1);
      await waitFor(() => running.stats().invalid === 1, "the malformed message terminated");
      await env.server.restart({ downtime: 500 });
      await waitFor(() => running.health().ready, "ready again", 10_000);
      await running.stop();

      const find = (template: string) => {
        const r = records.find((r) => r.rawMessage === template);
        assert.ok(
          r,
          `a record "${template}" among:\n${records.map((r) => r.rawMessage).join("\n")}`,
        );
        return r;
      };
      for (const r of records) assert.equal(r.category[0], "conveyor");
      const runtime = ["conveyor", "driver", "diagnosed", "runtime"];
      assert.deepEqual(find("connected to NATS at {server}").category, runtime);
      assert.match(String(find("connected to NATS at {server}").properties.server), /127\.0\.0\.1/);
      assert.equal(find("consumer {name} created").properties.name, "diagnosed");
      const retry = find(
        "run {runId}: attempt {attempt}/{max} failed, retrying in {delay} ms: {error}",
      );
      assert.equal(retry.level, "warning");
      assert.equal(retry.properties.attempt, 1);
      assert.equal(retry.properties.max, 3);
      assert.equal(retry.properties.error, "first try fails");
      assert.ok(retry.properties.cause instanceof Error);
      const term = find("terminating message {seq} on {subject}: {error}");
      assert.equal(term.level, "error");
      assert.match(String(term.properties.error), /JSON/);
      assert.equal(term.properties.subject, "resources.pipeline");
      find("disconnected from NATS at {server}; reconnecting");
      find("reconnected to NATS at {server}");
      find("shutting down: stopped pulling, handed back {queued} queued event(s)");
      const stopped = find("driver {driver} stopped");
      assert.equal(stopped.properties.succeeded, 1);
      assert.equal(stopped.properties.invalid, 1);
      assert.deepEqual(consoleCalls, []);
    } finally {
      Object.assign(console, saved);
      await reset();
    }
  });

  it("print to stderr by default, leaving stdout to the application", async () => {
    await using env = await conveyorEnv();
    await using p = spawnProgram("default_logging", { NATS_URL: env.url }, { stderr: "capture" });
    await p.ready();
    await publishEvent(env.nc, { resource: "pipeline", name: "web" });
    await waitForResults(env, 1);
    p.kill("SIGTERM");
    assert.equal(await p.exited, 0, `exit code (stderr: ${p.err})`);
    assert.deepEqual(p.out.trim().split("\n").map((l) => l.split(" ")[0]), ["ready", "closed"]);
    for (
      const expected of [
        /\[INF\] conveyor·driver·plain·runtime: connected to NATS at/,
        /\[INF\] conveyor·driver·plain: hello web/,
        /\[INF\] conveyor·driver·plain·runtime: SIGTERM received: shutting down gracefully/,
        /\[INF\] conveyor·driver·plain·runtime: driver plain stopped/,
      ]
    ) assert.match(p.err, expected);
  });
});

describe("the README's observability examples", () => {
  it("examples/observability.ts prints the spans and metrics with the console exporters", async () => {
    await using p = spawnProgram("examples/observability", {}, { stderr: "capture" });
    assert.equal(await p.exited, 0, `exit code (stderr: ${p.err})`);
    assert.match(p.out, /process resources\.pipeline/);
    assert.match(p.out, new RegExp(`traceId: .${TRACE_ID}.`), "the upstream trace continued");
    assert.match(p.out, /compile/);
    assert.match(p.out, /conveyor\.driver\.events\.settled/);
    assert.match(p.out, /conveyor\.driver\.reconcile\.duration/);
    assert.match(p.err, /building web/, "the driver's lines on stderr");
  });

  it("examples/prometheus.ts serves the metrics for a scrape", async () => {
    await using p = spawnProgram("examples/prometheus", { METRICS_PORT: "0" }, {
      stderr: "capture",
    });
    assert.equal(await p.exited, 0, `exit code (stderr: ${p.err})`);
    const series = (outcome: string) =>
      new RegExp(
        `^conveyor_driver_events_settled_total\\{[^}]*conveyor_outcome="${outcome}"[^}]*\\} (\\d+)$`,
        "m",
      ).exec(p.out)?.[1];
    assert.equal(series("succeeded"), "2", p.out);
    assert.equal(series("failed"), "1");
    assert.match(p.out, /^# TYPE conveyor_driver_reconcile_duration histogram$/m);
    assert.match(p.out, /^conveyor_driver_reconciles_active\{conveyor_driver="scraped"[^}]*\} 0$/m);
  });
});
