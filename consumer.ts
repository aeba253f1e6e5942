/**
 * The driver's durable consumer and its policy: what a start creates, how it
 * changes a consumer that instances of another version of the driver share
 * (never narrowing it unless told to), and how a running instance reads the
 * consumer's current settings.
 *
 * @module
 */
import type { Logger } from "@logtape/logtape";
import { nanos } from "@nats-io/transport-node";
import {
  AckPolicy,
  type ConsumerConfig,
  type ConsumerInfo,
  DeliverPolicy,
  JetStreamApiCodes,
  JetStreamApiError,
  type JetStreamManager,
} from "@nats-io/jetstream";
import { errorText } from "./_util.ts";
import { ConsumerError, ConveyorError, StreamNotFoundError } from "./errors.ts";
import type { Driver } from "./driver.ts";
import type { ConsumerPolicy } from "./options.ts";

/** Stream the Conveyor server publishes resource and driver events to. */
export const MESSAGES_STREAM = "messages";

/**
 * Consumer metadata key listing the event names the versions of the driver
 * sharing the consumer handle: a JSON array, or `"*"` for all.
 */
export const EVENTS_KEY = "conveyor.events";

/** Deliveries beyond `maxAttempts` the server allows before it stops by itself. */
export const DELIVER_MARGIN = 3;

/** 100 years in nanoseconds: an inactive threshold that never passes. */
const KEEP_FOREVER = nanos(100 * 365 * 24 * 3_600_000);

/**
 * The consumer's filter: both subject forms for every resource type.
 *
 * @example
 * ```ts
 * import { filterSubjects } from "@conveyor/driver";
 * filterSubjects({ name: "builder", resources: ["app"] });
 * // ["resources.app", "drivers.builder.resources.app"]
 * ```
 */
export function filterSubjects(driver: Pick<Driver, "name" | "resources">): string[] {
  return [...new Set(driver.resources)].flatMap((r) => [
    `resources.${r}`,
    `drivers.${driver.name}.resources.${r}`,
  ]);
}

/** What one instance needs of the consumer. */
export interface ConsumerWants {
  /** The consumer's (and driver's) name. */
  name: string;
  /** Its filter subjects. */
  subjects: string[];
  /** `ack_wait`, in nanoseconds. */
  ackWait: number;
  /** `max_ack_pending`. */
  maxAckPending: number;
  /** `max_deliver`: the backstop above `maxAttempts`. */
  maxDeliver: number;
  /** Event names handled, or `"*"` for all. */
  events: readonly string[] | "*";
}

/** What an instance of `driver` with options `o` needs of the consumer. */
export function consumerWants(
  driver: Pick<Driver, "name" | "resources" | "events">,
  o: { ackWait: number; maxAckPending: number; maxAttempts: number },
): ConsumerWants {
  return {
    name: driver.name,
    subjects: filterSubjects(driver),
    ackWait: nanos(o.ackWait),
    maxAckPending: o.maxAckPending,
    maxDeliver: o.maxAttempts + DELIVER_MARGIN,
    events: driver.events ? [...new Set(driver.events)].sort() : "*",
  };
}

/** The consumer's current settings, as a running instance uses them. */
export interface Fleet {
  /** `ack_wait` in ms: heartbeats go every third of it. */
  ackWaitMs: number;
  /** Events some version sharing the consumer handles (`"*"`: all). */
  events: "*" | ReadonlySet<string>;
}

/** Reads the settings a running instance follows from a consumer's config. */
export function fleetOf(config: Pick<ConsumerConfig, "ack_wait" | "metadata">): Fleet {
  const events = eventsOf(config.metadata);
  return {
    ackWaitMs: Math.max(1, Number(config.ack_wait ?? nanos(30_000)) / 1e6),
    events: events === "*" ? "*" : new Set(events),
  };
}

function eventsOf(metadata: Record<string, string> | undefined): readonly string[] | "*" {
  const raw = metadata?.[EVENTS_KEY];
  if (raw === undefined) return [];
  if (raw === "*") return "*";
  try {
    const list = JSON.parse(raw);
    return Array.isArray(list) ? list.filter((e): e is string => typeof e === "string") : [];
  } catch {
    return [];
  }
}

function unionEvents(
  a: readonly string[] | "*",
  b: readonly string[] | "*",
): readonly string[] | "*" {
  if (a === "*" || b === "*") return "*";
  return [...new Set([...a, ...b])].sort();
}

function encodeEvents(e: readonly string[] | "*"): string {
  return e === "*" ? "*" : JSON.stringify(e);
}

/** What a start does to the consumer. */
export interface ConsumerPlan {
  /** Create it, update it, or leave it as it is. */
  action: "create" | "update" | "keep";
  /** The whole config to create, or the fields to change. */
  config: Partial<ConsumerConfig>;
  /** Each change, in words, for the log. */
  changes: string[];
  /** A consumer the Go SDK made without a durable name, kept for good from now on. */
  legacy: boolean;
}

const sameSet = (a: readonly string[], b: readonly string[]) => {
  const s = new Set(a);
  return s.size === new Set(b).size && b.every((x) => s.has(x));
};

/**
 * Plans what a start does to the consumer: pure, for tests and for the
 * periodic check of a running instance. Policy `widen` takes the union of
 * subjects and events and the larger `ack_wait`, `max_ack_pending` and
 * `max_deliver`, so that no running instance of another version loses what
 * it needs; `replace` sets exactly `wants`.
 *
 * @throws {ConsumerError} when the consumer is not an explicit-ack pull consumer.
 */
export function planConsumer(
  current: ConsumerConfig | undefined,
  wants: ConsumerWants,
  policy: ConsumerPolicy,
): ConsumerPlan {
  if (!current) {
    return {
      action: "create",
      changes: ["created"],
      legacy: false,
      config: {
        name: wants.name,
        durable_name: wants.name,
        ack_policy: AckPolicy.Explicit,
        deliver_policy: DeliverPolicy.All,
        filter_subjects: wants.subjects,
        ack_wait: wants.ackWait,
        max_ack_pending: wants.maxAckPending,
        max_deliver: wants.maxDeliver,
        metadata: { [EVENTS_KEY]: encodeEvents(wants.events) },
      },
    };
  }
  if (current.ack_policy !== AckPolicy.Explicit || current.deliver_subject) {
    throw new ConsumerError(
      wants.name,
      `consumer "${wants.name}" exists but is not an explicit-ack pull consumer ` +
        `(ack_policy ${current.ack_policy}${current.deliver_subject ? ", push" : ""}); ` +
        "delete it to let the driver recreate it",
    );
  }
  const widen = policy === "widen";
  const changes: string[] = [];
  const config: Partial<ConsumerConfig> = {};

  const had = current.filter_subjects?.length
    ? current.filter_subjects
    : current.filter_subject
    ? [current.filter_subject]
    : [];
  // No filter at all takes every subject: nothing to widen.
  const subjects = widen
    ? had.length === 0 ? [] : [...new Set([...had, ...wants.subjects])]
    : wants.subjects;
  if (!sameSet(had, subjects) || (current.filter_subject && subjects.length > 0)) {
    const added = subjects.filter((s) => !had.includes(s));
    const removed = had.filter((s) => !subjects.includes(s));
    config.filter_subjects = subjects;
    if (current.filter_subject) config.filter_subject = "";
    if (added.length) changes.push(`filter_subjects + ${added.join(", ")}`);
    if (removed.length) changes.push(`filter_subjects - ${removed.join(", ")}`);
  }

  const larger = (now: number | undefined, want: number) =>
    widen && now !== undefined ? Math.max(now, want) : want;
  const ackWait = larger(current.ack_wait, wants.ackWait);
  if (ackWait !== current.ack_wait) {
    config.ack_wait = ackWait;
    changes.push(`ack_wait ${ms(current.ack_wait)} -> ${ms(ackWait)}`);
  }
  // -1 is unlimited, which widening keeps; the Go SDK's 1 is raised like
  // any smaller value.
  const pending = widen && (current.max_ack_pending ?? 0) < 0
    ? current.max_ack_pending!
    : larger(current.max_ack_pending, wants.maxAckPending);
  if (pending !== current.max_ack_pending) {
    config.max_ack_pending = pending;
    changes.push(`max_ack_pending ${current.max_ack_pending} -> ${pending}`);
  }
  // Unlimited (0 or -1, as older runtimes left it) gets the backstop: it is
  // what keeps an event the runtime cannot settle from cycling for ever.
  const deliver = (current.max_deliver ?? 0) <= 0
    ? wants.maxDeliver
    : larger(current.max_deliver, wants.maxDeliver);
  if (deliver !== current.max_deliver) {
    config.max_deliver = deliver;
    changes.push(`max_deliver ${current.max_deliver ?? "unset"} -> ${deliver}`);
  }

  const hadEvents = eventsOf(current.metadata);
  const events = widen ? unionEvents(hadEvents, wants.events) : wants.events;
  if (current.metadata?.[EVENTS_KEY] !== encodeEvents(events)) {
    // The server manages the `_nats.` keys itself (2.11+): leave them out.
    const kept = Object.fromEntries(
      Object.entries(current.metadata ?? {}).filter(([k]) => !k.startsWith("_nats.")),
    );
    config.metadata = { ...kept, [EVENTS_KEY]: encodeEvents(events) };
    changes.push(`events ${encodeEvents(hadEvents)} -> ${encodeEvents(events)}`);
  }

  const legacy = !current.durable_name &&
    Number(current.inactive_threshold ?? 0) < KEEP_FOREVER;
  if (legacy) {
    // A durable name cannot be added to an existing consumer; a threshold
    // this long keeps it (it survives server restarts too).
    config.inactive_threshold = KEEP_FOREVER;
    changes.push("inactive_threshold -> 100 years (it had no durable name)");
  }
  return { action: changes.length ? "update" : "keep", config, changes, legacy };
}

function ms(ns: number | undefined): string {
  return ns === undefined ? "unset" : `${ns / 1e6} ms`;
}

/** Whether `err` is a JetStream API error with `code`. */
export function isApiError(err: unknown, code: number): boolean {
  return err instanceof JetStreamApiError && err.code === code;
}

/** Reads the consumer's info; undefined when it does not exist. */
export async function readConsumer(
  jsm: JetStreamManager,
  name: string,
): Promise<ConsumerInfo | undefined> {
  try {
    return await jsm.consumers.info(MESSAGES_STREAM, name);
  } catch (err) {
    if (isApiError(err, JetStreamApiCodes.ConsumerNotFound)) return undefined;
    throw new ConsumerError(name, `cannot read consumer "${name}": ${errorText(err)}`, {
      cause: err,
    });
  }
}

/** Throws `StreamNotFoundError` when the `messages` stream is missing. */
export async function checkStream(jsm: JetStreamManager): Promise<void> {
  try {
    await jsm.streams.info(MESSAGES_STREAM);
  } catch (err) {
    if (isApiError(err, JetStreamApiCodes.StreamNotFound)) {
      throw new StreamNotFoundError(MESSAGES_STREAM, { cause: err });
    }
    throw new ConveyorError(`cannot read stream "${MESSAGES_STREAM}": ${errorText(err)}`, {
      cause: err,
    });
  }
}

/**
 * Makes the consumer cover what this instance needs: creates it, or applies
 * {@link planConsumer}'s changes. Another instance may change it at the same
 * moment, so the result is read back and the merge repeated (a few times)
 * until it covers this instance's needs.
 */
export async function ensureConsumer(
  jsm: JetStreamManager,
  wants: ConsumerWants,
  policy: ConsumerPolicy,
  log: Logger,
): Promise<ConsumerInfo> {
  const name = wants.name;
  let lastError: unknown;
  for (let round = 0; round < 5; round++) {
    const current = await readConsumer(jsm, name);
    // Replace only once: later rounds merge like everyone else.
    const plan = planConsumer(current?.config, wants, round === 0 ? policy : "widen");
    try {
      if (plan.action === "create") {
        await jsm.consumers.add(MESSAGES_STREAM, plan.config as ConsumerConfig);
        log.info("consumer {name} created", { name });
      } else if (plan.action === "update") {
        if (plan.legacy) {
          log.warn(
            "consumer {name} was created without a durable name (Go SDK) and would vanish " +
              "5 s after its last client, dropping events; keeping it for good. Delete it " +
              "once while no events are pending to have it recreated as a durable consumer.",
            { name },
          );
        }
        await jsm.consumers.update(MESSAGES_STREAM, name, plan.config);
        log.info("consumer {name} updated: {changes}", { name, changes: plan.changes });
      }
    } catch (err) {
      // Created or changed by another instance meanwhile: read and merge again.
      lastError = err;
      continue;
    }
    const after = await readConsumer(jsm, name);
    if (after && planConsumer(after.config, wants, "widen").action === "keep") return after;
  }
  throw new ConsumerError(
    name,
    `cannot make consumer "${name}" cover this instance (it kept changing, or: ${
      errorText(lastError)
    })`,
    { cause: lastError },
  );
}
