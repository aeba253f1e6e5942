/**
 * OpenTelemetry for the runtime, through `@opentelemetry/api` only: a span
 * per delivery (continued from the event's `traceparent` header, passed on
 * in the headers of its log lines and result) and the metrics in
 * {@link METRICS}. Until the application registers a tracer or meter
 * provider (or passes one in `ServeOptions.telemetry`), every call here is
 * the API's no-op.
 *
 * @module
 */
import {
  type Attributes,
  type BatchObservableCallback,
  type Context,
  type Counter,
  defaultTextMapSetter,
  type Histogram,
  type Meter,
  type MeterProvider,
  metrics,
  type ObservableGauge,
  type ObservableUpDownCounter,
  propagation,
  ROOT_CONTEXT,
  type Span,
  SpanKind,
  SpanStatusCode,
  type TextMapGetter,
  type TextMapPropagator,
  trace,
  type Tracer,
  type TracerProvider,
} from "@opentelemetry/api";
import { Match, type MsgHdrs } from "@nats-io/transport-node";
import type { JsMsg } from "@nats-io/jetstream";
import { errorName, errorText } from "./_util.ts";

/**
 * Where the runtime sends its traces and metrics. Each falls back to the
 * global one of `@opentelemetry/api`; register a meter provider before the
 * driver starts (the API hands out no-op meters until one is registered,
 * and keeps them), a tracer provider at any time.
 *
 * @example
 * ```ts
 * import { type Driver, serve } from "@conveyor/driver";
 * import { MeterProvider } from "@opentelemetry/sdk-metrics";
 * const driver: Driver = { name: "builder", resources: ["app"], reconcile() {} };
 * const meterProvider = new MeterProvider({ readers: [] });
 * await serve(driver, { telemetry: { meterProvider } });
 * ```
 */
export interface TelemetryOptions {
  /**
   * Creates the spans: an OpenTelemetry `TracerProvider`, e.g. the SDK's.
   * @default the global tracer provider
   */
  tracerProvider?: { getTracer(name: string, version?: string): unknown };
  /**
   * Creates the instruments: an OpenTelemetry `MeterProvider`, e.g. the SDK's.
   * @default the global meter provider
   */
  meterProvider?: { getMeter(name: string, version?: string): unknown };
  /**
   * Reads the trace context from event headers and writes it into the log
   * and result headers: an OpenTelemetry `TextMapPropagator`, e.g. the W3C
   * trace context propagator. @default the global propagator (W3C trace
   * context when the SDK registers one)
   */
  propagator?: {
    inject(context: unknown, carrier: unknown, setter: unknown): void;
    extract(context: unknown, carrier: unknown, getter: unknown): unknown;
  };
}

/**
 * An OpenTelemetry `Context` (`@opentelemetry/api`): immutable values by key,
 * here the delivery's span.
 */
export type TraceContext = Context;

/** The instrumentation scope of the runtime's spans and metrics. */
export const INSTRUMENTATION_SCOPE = "@conveyor/driver";
/** The runtime's version, as the instrumentation scope's version. */
export const INSTRUMENTATION_VERSION = "0.1.0";

/**
 * Names of the runtime's metrics. Counters and the histogram carry the
 * attributes `conveyor.driver`, `conveyor.resource.type` and `conveyor.event`
 * (`conveyor.outcome` and, on failures, `error.type` where noted); the
 * gauges carry `conveyor.driver`.
 */
export const METRICS = {
  /** Counter, `{event}`: deliveries received (a redelivery counts again). */
  received: "conveyor.driver.events.received",
  /** Counter, `{event}`: deliveries settled, by `conveyor.outcome` (see {@link EventOutcome}). */
  settled: "conveyor.driver.events.settled",
  /** Histogram, `s`: how long `reconcile` ran, by `conveyor.outcome`. */
  duration: "conveyor.driver.reconcile.duration",
  /** Observable up-down counter, `{reconcile}`: reconciles running, hung ones included. */
  active: "conveyor.driver.reconciles.active",
  /** Observable up-down counter, `{reconcile}`: reconciles still running after the runtime gave up on them. */
  hung: "conveyor.driver.reconciles.hung",
  /** Observable up-down counter, `{event}`: events pulled ahead, waiting for a slot. */
  queued: "conveyor.driver.events.queued",
  /** Counter, `{line}`: log lines stored by JetStream. */
  logLines: "conveyor.driver.log.lines",
  /** Counter, `{line}`: log lines not published (logged after the result, or over the buffer). */
  logDropped: "conveyor.driver.log.dropped",
  /** Observable gauge, `{message}`: the consumer's messages not yet delivered, as last read. */
  pending: "conveyor.driver.consumer.pending",
  /** Observable gauge, `{message}`: the consumer's messages delivered and not yet acknowledged. */
  ackPending: "conveyor.driver.consumer.ack_pending",
} as const;

/**
 * How a delivery was settled, the `conveyor.outcome` of spans and metrics:
 * - `succeeded`: a success result stored, the event acknowledged;
 * - `failed`: a failure result stored, the event terminated;
 * - `retried`: the attempt failed and the event is redelivered later;
 * - `terminated`: terminated without a result of its own (a malformed
 *   message, a result that cannot be stored as it is);
 * - `handed_back`: back to the stream unfinished (a shutdown, another
 *   version's event, logs or result that could not be stored yet);
 * - `skipped`: acknowledged without a reconcile (no version handles its
 *   event, or its result was stored already).
 */
export type EventOutcome =
  | "succeeded"
  | "failed"
  | "retried"
  | "terminated"
  | "handed_back"
  | "skipped";

/** Current values the runtime's gauges read. */
export interface TelemetryGauges {
  /** Reconciles running (hung ones included). */
  active(): number;
  /** Reconciles running after the runtime gave up on them. */
  hung(): number;
  /** Events pulled ahead. */
  queued(): number;
  /** The consumer's pending and ack-pending counts, as last read; undefined before the first read. */
  consumer(): { pending: number; ackPending: number } | undefined;
}

/** Histogram buckets from 5 ms to an hour: reconciles run from milliseconds to long builds. */
const DURATION_BUCKETS = [
  0.005,
  0.01,
  0.025,
  0.05,
  0.1,
  0.25,
  0.5,
  1,
  2.5,
  5,
  10,
  30,
  60,
  120,
  300,
  600,
  1800,
  3600,
];

const headerGetter: TextMapGetter<MsgHdrs> = {
  get: (h, key) => h.get(key, Match.IgnoreCase) || undefined,
  keys: (h) => h.keys(),
};

type Propagator = Pick<TextMapPropagator, "inject" | "extract">;

/** The runtime's tracer and instruments, made once per running driver. */
export class Telemetry {
  readonly #driver: string;
  readonly #tracer: Tracer;
  readonly #propagator: Propagator;
  readonly #meter: Meter;
  readonly #received: Counter;
  readonly #settled: Counter;
  readonly #duration: Histogram;
  readonly #logLines: Counter;
  readonly #logDropped: Counter;
  readonly #observables: (ObservableUpDownCounter | ObservableGauge)[];
  readonly #observe: BatchObservableCallback;

  /** Gets the tracer and creates the instruments of `driver`. */
  constructor(driver: string, options: TelemetryOptions, gauges: TelemetryGauges) {
    this.#driver = driver;
    // Typed loosely in the options (any version of the API fits); they are
    // the API's types.
    this.#tracer = ((options.tracerProvider as TracerProvider | undefined) ??
      trace.getTracerProvider()).getTracer(INSTRUMENTATION_SCOPE, INSTRUMENTATION_VERSION);
    this.#propagator = (options.propagator as Propagator | undefined) ?? propagation;
    const meter = ((options.meterProvider as MeterProvider | undefined) ??
      metrics.getMeterProvider()).getMeter(INSTRUMENTATION_SCOPE, INSTRUMENTATION_VERSION);
    this.#meter = meter;
    this.#received = meter.createCounter(METRICS.received, {
      description: "Deliveries received from the driver's consumer",
      unit: "{event}",
    });
    this.#settled = meter.createCounter(METRICS.settled, {
      description: "Deliveries settled, by outcome",
      unit: "{event}",
    });
    this.#duration = meter.createHistogram(METRICS.duration, {
      description: "How long reconcile ran",
      unit: "s",
      advice: { explicitBucketBoundaries: DURATION_BUCKETS },
    });
    this.#logLines = meter.createCounter(METRICS.logLines, {
      description: "Log lines stored by JetStream",
      unit: "{line}",
    });
    this.#logDropped = meter.createCounter(METRICS.logDropped, {
      description: "Log lines not published: logged after the result, or over the buffer",
      unit: "{line}",
    });
    const active = meter.createObservableUpDownCounter(METRICS.active, {
      description: "Reconciles running, hung ones included",
      unit: "{reconcile}",
    });
    const hung = meter.createObservableUpDownCounter(METRICS.hung, {
      description: "Reconciles still running after the runtime gave up on them",
      unit: "{reconcile}",
    });
    const queued = meter.createObservableUpDownCounter(METRICS.queued, {
      description: "Events pulled ahead, waiting for a slot",
      unit: "{event}",
    });
    const pending = meter.createObservableGauge(METRICS.pending, {
      description: "The consumer's messages not yet delivered, as last read",
      unit: "{message}",
    });
    const ackPending = meter.createObservableGauge(METRICS.ackPending, {
      description: "The consumer's messages delivered and not yet acknowledged, as last read",
      unit: "{message}",
    });
    this.#observables = [active, hung, queued, pending, ackPending];
    const attrs = { "conveyor.driver": driver };
    this.#observe = (r) => {
      r.observe(active, gauges.active(), attrs);
      r.observe(hung, gauges.hung(), attrs);
      r.observe(queued, gauges.queued(), attrs);
      const c = gauges.consumer();
      if (c) {
        r.observe(pending, c.pending, attrs);
        r.observe(ackPending, c.ackPending, attrs);
      }
    };
    meter.addBatchObservableCallback(this.#observe, this.#observables);
  }

  /** Starts the span of one delivery, a child of the trace in its headers. */
  begin(m: JsMsg): EventTelemetry {
    const parent = m.headers
      ? this.#propagator.extract(ROOT_CONTEXT, m.headers, headerGetter)
      : ROOT_CONTEXT;
    const span = this.#tracer.startSpan(`process ${m.subject}`, {
      kind: SpanKind.CONSUMER,
      attributes: {
        "messaging.system": "nats",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": m.subject,
        "messaging.consumer.group.name": this.#driver,
        "messaging.message.body.size": m.data.length,
        "conveyor.driver": this.#driver,
        "conveyor.attempt": m.info.deliveryCount,
        "conveyor.stream.sequence": m.info.streamSequence,
      },
    }, parent);
    return new EventTelemetry(this, span, trace.setSpan(parent, span));
  }

  /** Stops reporting the gauges (the driver stopped). */
  close(): void {
    this.#meter.removeBatchObservableCallback(this.#observe, this.#observables);
  }

  /** The metric attributes of a delivery. */
  attributes(type: string | undefined, event: string | undefined): Attributes {
    const base: Attributes = { "conveyor.driver": this.#driver };
    if (type !== undefined) base["conveyor.resource.type"] = type;
    if (event !== undefined) base["conveyor.event"] = event;
    return base;
  }

  /** Counts a delivery received. */
  received(base: Attributes): void {
    this.#received.add(1, base);
  }

  /** Records a settled delivery. */
  record(
    outcome: EventOutcome,
    base: Attributes,
    seconds: number | undefined,
    lines: number,
    dropped: number,
    errorType: string | undefined,
  ): void {
    if (lines > 0) this.#logLines.add(lines, base);
    if (dropped > 0) this.#logDropped.add(dropped, base);
    const withOutcome: Attributes = { ...base, "conveyor.outcome": outcome };
    if (errorType !== undefined) withOutcome["error.type"] = errorType;
    this.#settled.add(1, withOutcome);
    if (seconds !== undefined) this.#duration.record(seconds, withOutcome);
  }

  /** Writes the trace context of `context` into a plain carrier; undefined when there is none. */
  inject(context: Context): Record<string, string> | undefined {
    const carrier: Record<string, string> = {};
    this.#propagator.inject(context, carrier, defaultTextMapSetter);
    for (const _ in carrier) return carrier;
    return undefined;
  }
}

/**
 * One delivery's span and measures. {@link EventTelemetry.context} holds the
 * span: it is `ctx.traceContext`, and the active context around reconcile.
 */
export class EventTelemetry {
  readonly #t: Telemetry;
  /** The delivery's span (non-recording when tracing is off). */
  readonly span: Span;
  /** A context holding {@link EventTelemetry.span}. */
  readonly context: Context;
  #attributes?: Attributes;
  #seconds?: number;
  #lines?: { readonly stored: number; readonly dropped: number };
  #carrier?: Record<string, string> | null;
  #ended = false;

  /** Made by {@link Telemetry.begin}. */
  constructor(t: Telemetry, span: Span, context: Context) {
    this.#t = t;
    this.span = span;
    this.context = context;
  }

  /** Names what the delivery carries, once decoded. */
  identify(
    d: { type: string; event?: string; name?: string; runId?: string; messageId?: string },
  ): void {
    this.#attributes = this.#t.attributes(d.type, d.event);
    this.#t.received(this.#attributes);
    if (!this.span.isRecording()) return;
    const a: Attributes = { "conveyor.resource.type": d.type };
    if (d.event !== undefined) a["conveyor.event"] = d.event;
    if (d.name !== undefined) a["conveyor.resource.name"] = d.name;
    if (d.runId !== undefined) a["conveyor.run_id"] = d.runId;
    if (d.messageId !== undefined) a["messaging.message.id"] = d.messageId;
    this.span.setAttributes(a);
  }

  /** Notes how long reconcile ran, in ms. */
  reconciled(ms: number): void {
    this.#seconds = ms / 1_000;
  }

  /** The run's log: its lines stored and not published are counted at the end. */
  logs(run: { readonly stored: number; readonly dropped: number }): void {
    this.#lines = run;
  }

  /** The trace context to carry in the headers of the run's logs and result. */
  headers(): Record<string, string> | undefined {
    if (this.#carrier === undefined) this.#carrier = this.#t.inject(this.context) ?? null;
    return this.#carrier ?? undefined;
  }

  /**
   * Ends the span and records the metrics; `failure` marks the span as an
   * error (an exception is recorded when it is an `Error`). Only the first
   * call counts.
   */
  end(outcome: EventOutcome, failure?: { error?: unknown; message?: string }): void {
    if (this.#ended) return;
    this.#ended = true;
    const errorType = failure
      ? failure.error === undefined ? "failure" : errorName(failure.error)
      : undefined;
    if (!this.#attributes) {
      this.#attributes = this.#t.attributes(undefined, undefined);
      this.#t.received(this.#attributes);
    }
    this.#t.record(
      outcome,
      this.#attributes,
      this.#seconds,
      this.#lines?.stored ?? 0,
      this.#lines?.dropped ?? 0,
      errorType,
    );
    const span = this.span;
    if (span.isRecording()) {
      span.setAttribute("conveyor.outcome", outcome);
      if (failure) {
        span.setAttribute("error.type", errorType!);
        if (failure.error instanceof Error) span.recordException(failure.error);
        span.setStatus({
          code: SpanStatusCode.ERROR,
          message: (failure.message ?? errorText(failure.error)).slice(0, 1_000),
        });
      }
    }
    span.end();
  }
}
