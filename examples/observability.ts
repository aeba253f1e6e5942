/**
 * Observability with OpenTelemetry, exported to the console: the SDK set up
 * as an application sets it up, a driver against a local nats-server, two
 * events (one continuing a trace from upstream, one failing), then the spans
 * and metrics printed by the SDK's console exporters. The runtime's own
 * messages and the driver's log lines go to stderr (LogTape's default here).
 *
 *     npm run example:otel
 *     deno run -A examples/observability.ts
 *     bun run examples/observability.ts
 *
 * In production, swap the console exporters for OTLP ones
 * (`@opentelemetry/exporter-trace-otlp-http`, `...-metrics-otlp-http`).
 *
 * @module
 */
import { context, metrics, propagation, trace } from "@opentelemetry/api";
import { AsyncLocalStorageContextManager } from "@opentelemetry/context-async-hooks";
import { W3CTraceContextPropagator } from "@opentelemetry/core";
import { resourceFromAttributes } from "@opentelemetry/resources";
import { ConsoleSpanExporter, SimpleSpanProcessor, TracerProvider } from "@opentelemetry/sdk-trace";
import {
  ConsoleMetricExporter,
  MeterProvider,
  PeriodicExportingMetricReader,
} from "@opentelemetry/sdk-metrics";
import { PermanentError, startDriver } from "../mod.ts";
import { createConveyorStreams, publishEvent, startNatsServer } from "../testing.ts";

// 1. The OpenTelemetry SDK, registered globally before the driver starts (a
//    meter provider registered later would not be seen).
context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable());
propagation.setGlobalPropagator(new W3CTraceContextPropagator());
const resource = resourceFromAttributes({ "service.name": "observed-driver" });
const tracerProvider = new TracerProvider({
  resource,
  spanProcessors: [new SimpleSpanProcessor({ exporter: new ConsoleSpanExporter() })],
});
trace.setGlobalTracerProvider(tracerProvider);
const meterProvider = new MeterProvider({
  resource,
  readers: [
    new PeriodicExportingMetricReader({
      exporter: new ConsoleMetricExporter(),
      exportIntervalMillis: 60_000,
    }),
  ],
});
metrics.setGlobalMeterProvider(meterProvider);

// 2. A nats-server with the streams the Conveyor server creates.
await using nats = await startNatsServer();
await createConveyorStreams(nats.url);

// 3. The driver. The runtime starts a span per event; reconcile's own spans
//    are its children (here through the active context).
const tracer = trace.getTracer("example-driver");
const running = await startDriver({
  name: "observed",
  resources: ["pipeline"],
  async reconcile({ resource, logger }) {
    logger.info(`building ${resource.name}`);
    await tracer.startActiveSpan("compile", async (span) => {
      await new Promise((r) => setTimeout(r, 20));
      span.setAttribute("files", 42);
      span.end();
    });
    if ((resource.spec as { fail?: boolean }).fail) {
      throw new PermanentError("the spec asked for a failure");
    }
    return { success: true, message: "built" };
  },
}, { servers: nats.url, handleSignals: false });

// 4. Events: one continuing an upstream trace (its W3C traceparent header),
//    one that fails.
await publishEvent(nats.url, {
  resource: "pipeline",
  name: "web",
  headers: { traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" },
});
await publishEvent(nats.url, { resource: "pipeline", name: "broken", spec: { fail: true } });
while (running.stats().succeeded + running.stats().failed < 2) {
  await new Promise((r) => setTimeout(r, 20));
}
await running.stop();

// 5. Shutting down exports the metrics now rather than at the next interval.
await meterProvider.shutdown();
await tracerProvider.shutdown();
