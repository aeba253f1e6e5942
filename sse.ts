/**
 * A small Server-Sent Events reader over `fetch`, for long-lived streams such
 * as Conveyor's log streams: it reconnects when the connection drops, asks
 * for fresh headers on every connect (so a renewed token is used), and can
 * drop the events a server replays after a reconnect.
 *
 * @module
 */
import { createParser } from "eventsource-parser";
import {
  ApiNetworkError,
  ApiTimeoutError,
  ConfigError,
  ConveyorApiError,
  ConveyorError,
} from "./errors.ts";
import {
  backoff,
  httpErrorText,
  MAX_ERROR_BODY,
  MAX_TIMER_MS,
  parseRetryAfter,
  readText,
  sleep,
} from "./_util.ts";
import { ReplayFilter } from "./_replay.ts";

/** One Server-Sent Event. Comments (`: heartbeat`) are not events. */
export interface SseEvent {
  /** The event's data; several `data:` lines are joined with `\n`. */
  data: string;
  /** The `event:` field, when the server sent one. */
  event?: string;
  /** The `id:` field of the event's block, when the server sent one. */
  id?: string;
}

/**
 * An event's identity and its place in a replaying server's order: the
 * server replays each group's events in time order (Conveyor: each driver's
 * log lines by timestamp).
 *
 * @example
 * ```ts
 * import { readSse, type SseKey } from "@conveyor/driver";
 * const key = (data: string): SseKey => {
 *   const line = JSON.parse(data);
 *   return { key: data, group: line.driver, time: Date.parse(line.timestamp) };
 * };
 * const url = "http://localhost:8080/logs/pipeline/0b7e1c1e-8d4e-4f7a-9a52-4a3b2c1d0e9f";
 * for await (const ev of readSse(url, { key })) console.log(ev.data);
 * ```
 */
export interface SseKey {
  /** What tells the event apart from others. */
  key: string;
  /** The group whose events the server replays in time order. */
  group: string;
  /** The event's time in ms; NaN when unknown (never dropped by time then). */
  time: number;
}

/** What {@link SseOptions.onReconnect} is told before each reconnect. */
export interface SseReconnectInfo {
  /** Consecutive attempts without an event so far, 1 for the first reconnect. */
  attempt: number;
  /** How long the reader waits before reconnecting, in ms. */
  delay: number;
  /** Why the previous connection ended or failed. */
  error: unknown;
}

/** Options of {@link readSse}. */
export interface SseOptions {
  /** A `fetch`-compatible function to use. @default globalThis.fetch */
  fetch?: (input: URL, init: RequestInit) => Promise<Response>;
  /**
   * Request headers, asked for again before every (re)connect, so that a
   * short-lived token is renewed. `Accept`, `Cache-Control` and
   * `Last-Event-ID` are set by the reader.
   */
  headers?: () => RequestInit["headers"] | Promise<RequestInit["headers"]>;
  /**
   * Aborting it closes the stream and ends the iteration quietly (the
   * `for await` loop finishes; nothing is thrown), also while connecting or
   * waiting to reconnect.
   */
  signal?: AbortSignal;
  /**
   * How long to wait for the response headers of one connect, in ms. Some
   * servers (Conveyor's among them) send headers only with the first event or
   * heartbeat, so keep this above their heartbeat interval.
   * @default 30_000
   */
  connectTimeout?: number;
  /**
   * Once connected, how long the stream may stay silent (no event, no
   * comment, no byte) before the reader gives the connection up and
   * reconnects, in ms: about three of the Conveyor server's 15 s heartbeats.
   * 0 or `Infinity`: wait for ever.
   * @default 45_000
   */
  idleTimeout?: number;
  /**
   * Identity of an event's data, to drop what a server replays after a
   * reconnect. Without `key`, nothing is dropped.
   *
   * The reader remembers the last `dedupeWindow` events it yielded, each as a
   * 53-bit hash of its key (a few numbers, whatever the event's size), and
   * how often each key came. On a new connection it yields an event only
   * once that connection has sent more events of its key than were yielded
   * before, so lines repeated on purpose still come through.
   *
   * For what fell out of the window, `key` may also place the event in the
   * server's replay order (see {@link SseKey}): an event of a later
   * connection older than the newest one its group let fall out of the
   * window is dropped as replayed too.
   */
  key?: (data: string) => string | SseKey;
  /**
   * How many yielded events the duplicate filter remembers exactly (about
   * 100 bytes each): an integer of at least 1, else the iteration rejects
   * with a `ConfigError`. Older ones are recognised by their time, when
   * `key` gives one.
   * @default 10_000
   */
  dedupeWindow?: number;
  /**
   * Largest event (or run of bytes without one) the reader buffers, in
   * bytes; a larger one ends the iteration with a `ConveyorApiError`, since a
   * replay would send it again.
   * @default 8 MiB
   */
  maxEventBytes?: number;
  /**
   * How many consecutive attempts may fail before the iteration rejects with
   * the last error. An attempt fails when it cannot connect, gets a 5xx, 408
   * or 429, or its stream ends before a single event or comment arrived; any
   * event or comment resets the count. `Infinity` retries for as long as the
   * signal allows.
   * @default 10
   */
  maxRetries?: number;
  /**
   * Delay before the first reconnect, in ms, doubled on each further attempt
   * (±20% jitter) until a connection stays up for `stableAfter`. A `retry:`
   * field from the server replaces it, kept within `minDelay` and `maxDelay`.
   * @default 250
   */
  initialDelay?: number;
  /** Lower bound of the reconnect delay, in ms, whatever the server's `retry:` says. @default 250 */
  minDelay?: number;
  /** Upper bound of the reconnect delay, in ms (a `Retry-After` may ask for more). @default 5_000 */
  maxDelay?: number;
  /**
   * How long a connection must stay up for the reconnect delay to start
   * over from `initialDelay`, in ms: a server that sends a heartbeat and
   * closes at once is reconnected to ever more slowly, not in a loop.
   * @default 10_000
   */
  stableAfter?: number;
  /** Called before each reconnect, e.g. to log it. */
  onReconnect?: (info: SseReconnectInfo) => void;
}

/** Statuses worth another connect; other 4xx are the request's fault. */
const RETRY_STATUS = new Set([408, 429, 500, 502, 503, 504]);

/**
 * Reads a Server-Sent Events stream with `GET url`. The connection opens when
 * the iteration starts; leaving the loop (`break`, `return`, a throw) or
 * aborting `options.signal` closes it. Each iteration of the returned
 * iterable opens a stream of its own.
 *
 * Dropped connections are resumed (see {@link SseOptions}): with
 * `Last-Event-ID` when the server sent ids, and without duplicates when a
 * `key` is given. A response that is not 2xx rejects with a
 * `ConveyorApiError`; 408, 429 and 5xx are retried first.
 *
 * @throws {ConveyorApiError} on a non-2xx answer that is not retried (or no
 * longer), or a 2xx answer that is not `text/event-stream`.
 * @throws {ApiNetworkError} when the connection failed or dropped `maxRetries + 1` times in a row.
 * @throws {ApiTimeoutError} when the last attempt got no response headers within `connectTimeout`.
 * @example
 * ```ts
 * import { readSse } from "@conveyor/driver";
 * const ac = new AbortController();
 * for await (const ev of readSse("http://localhost:8080/logs/pipeline/0b7e…", { signal: ac.signal })) {
 *   console.log(ev.data);
 * }
 * ```
 */
export function readSse(url: string | URL, options: SseOptions = {}): AsyncIterable<SseEvent> {
  return { [Symbol.asyncIterator]: () => stream(new URL(url), options) };
}

async function* stream(url: URL, o: SseOptions): AsyncGenerator<SseEvent, void, undefined> {
  const doFetch = o.fetch ?? ((input, init) => fetch(input, init));
  const connectTimeout = o.connectTimeout ?? 30_000;
  const maxRetries = o.maxRetries ?? 10;
  const initialDelay = o.initialDelay ?? 250;
  const maxDelay = o.maxDelay ?? 5_000;
  const minDelay = Math.min(o.minDelay ?? 250, maxDelay);
  const stableAfter = o.stableAfter ?? 10_000;
  const idle = o.idleTimeout ?? 45_000;
  const idleTimeout = idle > 0 && idle < MAX_TIMER_MS ? idle : undefined;
  const maxEventBytes = o.maxEventBytes ?? 8 * 1024 * 1024;
  const signal = o.signal;
  const path = url.pathname;
  const where = { method: "GET", path };
  // What was yielded, across connections, to drop what a reconnect replays.
  const window = o.dedupeWindow ?? 10_000;
  if (!Number.isInteger(window) || window < 1) {
    throw new ConfigError(
      "dedupeWindow",
      `dedupeWindow must be an integer of at least 1, got ${window}`,
    );
  }
  const replay = o.key ? new ReplayFilter(window) : undefined;
  let lastId: string | undefined;
  let serverRetry: number | undefined;
  let failures = 0;
  // Connections in a row that did not stay up `stableAfter`.
  let flaps = 0;

  while (true) {
    if (signal?.aborted) return;
    // Asked for outside the error handling below: a token that cannot be
    // made is not a connection problem, and retrying would not help.
    const headers = new Headers(await o.headers?.());
    headers.set("Accept", "text/event-stream");
    headers.set("Cache-Control", "no-cache");
    if (lastId !== undefined) headers.set("Last-Event-ID", lastId);

    const conn = new AbortController();
    let reader: ReadableStreamDefaultReader<Uint8Array> | undefined;
    const onAbort = () => {
      conn.abort(signal?.reason);
      reader?.cancel(signal?.reason).catch(() => {});
    };
    signal?.addEventListener("abort", onAbort, { once: true });
    let progress = false;
    let retryAfter: number | undefined;
    let error: unknown;
    let connectedAt: number | undefined;
    let idleExpired = false;
    let idleTimer: ReturnType<typeof setTimeout> | undefined;
    try {
      let timedOut = false;
      // Infinity (or a value no timer can wait): no connect timeout.
      const timer = connectTimeout < MAX_TIMER_MS
        ? setTimeout(() => {
          timedOut = true;
          conn.abort(new ApiTimeoutError({ ...where, timeout: connectTimeout }));
        }, connectTimeout)
        : undefined;
      let res: Response;
      try {
        res = await doFetch(url, { headers, signal: conn.signal });
      } catch (err) {
        if (signal?.aborted) return;
        throw timedOut
          ? new ApiTimeoutError({ ...where, timeout: connectTimeout }, { cause: err })
          : new ApiNetworkError(where, { cause: err });
      } finally {
        clearTimeout(timer);
      }
      if (!res.ok) {
        retryAfter = parseRetryAfter(res.headers.get("retry-after"));
        const { text } = await readText(res, MAX_ERROR_BODY)
          .catch(() => ({ text: "" }));
        const apiError = new ConveyorApiError({
          status: res.status,
          error: httpErrorText(res, text),
          ...where,
        });
        if (!RETRY_STATUS.has(res.status)) throw new Fatal(apiError);
        throw apiError;
      }
      const type = res.headers.get("content-type");
      if (type !== null && !/^text\/event-stream\b/i.test(type)) {
        await res.body?.cancel().catch(() => {});
        throw new Fatal(
          new ConveyorApiError({
            status: res.status,
            error: `expected a text/event-stream response, got ${type}`,
            ...where,
          }),
        );
      }
      if (!res.body) throw new ApiNetworkError(where, { cause: new Error("response has no body") });
      reader = res.body.getReader();
      connectedAt = Date.now();
      let lastData = connectedAt;
      if (idleTimeout !== undefined) {
        // One timer per connection, pushed back lazily rather than re-armed per chunk.
        const check = () => {
          const quiet = Date.now() - lastData;
          if (quiet < idleTimeout) idleTimer = setTimeout(check, idleTimeout - quiet);
          else {
            conn.abort();
            reader?.cancel(
              new ApiTimeoutError({ ...where, timeout: idleTimeout }, {
                cause: new Error(`no data for ${idleTimeout} ms`),
              }),
            ).catch(() => {});
            idleExpired = true;
          }
        };
        idleTimer = setTimeout(check, idleTimeout);
      }
      replay?.connected();
      const queue: SseEvent[] = [];
      const parser = createParser({
        onEvent(ev) {
          const out: SseEvent = { data: ev.data };
          if (ev.event !== undefined) out.event = ev.event;
          if (ev.id !== undefined) {
            out.id = ev.id;
            // eventsource-parser 3 (kept for Node 20) reports ids with events only.
            lastId = ev.id;
          }
          queue.push(out);
        },
        onRetry(ms) {
          serverRetry = ms;
        },
        onComment() {
          progress = true;
          sawComment = true;
        },
      });
      const decoder = new TextDecoder();
      // Line ends become "\n" here: a CR at the end of a read is a line end at
      // once (the parser would hold it, waiting to see whether a LF follows,
      // until the next bytes: a heartbeat 15 s later), and a LF right after
      // it is then dropped.
      let afterCr = false;
      const lines = (text: string): string => {
        if (afterCr && text.startsWith("\n")) text = text.slice(1);
        if (text !== "") afterCr = text.endsWith("\r");
        return text.replace(/\r\n?/g, "\n");
      };
      let sawComment = false;
      // Bytes since the last event or comment: what the parser may be holding.
      let pending = 0;
      while (true) {
        const { done, value } = await reader.read();
        if (done) break;
        lastData = Date.now();
        sawComment = false;
        parser.feed(lines(decoder.decode(value, { stream: true })));
        pending = queue.length > 0 || sawComment ? 0 : pending + value.length;
        if (pending > maxEventBytes) {
          throw new Fatal(
            new ConveyorApiError({
              status: res.status,
              error: `the stream sent over ${maxEventBytes} bytes without completing an event`,
              ...where,
            }),
          );
        }
        while (queue.length > 0) {
          const ev = queue.shift()!;
          progress = true;
          if (replay) {
            let k: string | SseKey;
            try {
              k = o.key!(ev.data);
            } catch (err) {
              throw new Fatal(err); // a bug in `key`, not a connection problem
            }
            const admitted = typeof k === "string"
              ? replay.admit(hash53(k))
              : replay.admit(hash53(k.key), k);
            if (!admitted) continue; // replayed
          }
          yield ev;
        }
        if (progress) failures = 0;
      }
      // An incomplete event at the end is dropped (as the SSE spec says): a
      // replaying server sends it again, and otherwise it is lost anyway.
      if (signal?.aborted) return;
      error = idleExpired
        ? new ApiTimeoutError({ ...where, timeout: idleTimeout! })
        : new ApiNetworkError(where, { cause: new Error("the server closed the stream") });
    } catch (err) {
      if (signal?.aborted) return;
      if (err instanceof Fatal) throw err.error;
      error = idleExpired
        ? new ApiTimeoutError({ ...where, timeout: idleTimeout! }, { cause: err })
        : err instanceof ConveyorError
        ? err
        : new ApiNetworkError(where, { cause: err });
    } finally {
      clearTimeout(idleTimer);
      signal?.removeEventListener("abort", onAbort);
      // Closes the connection when the loop ended early (break, throw) or the
      // stream failed; harmless once it ended.
      conn.abort();
      reader?.cancel().catch(() => {});
    }

    if (progress) failures = 0;
    failures++;
    if (failures > maxRetries) throw error;
    // Only a connection that stayed up a while starts the delays over.
    if (connectedAt !== undefined && Date.now() - connectedAt >= stableAfter) flaps = 0;
    flaps++;
    const base = Math.min(maxDelay, Math.max(minDelay, serverRetry ?? initialDelay));
    let delay = Math.max(
      minDelay,
      backoff(Math.max(failures, flaps), { retryDelay: base, retryMaxDelay: maxDelay }),
    );
    if (retryAfter !== undefined) delay = Math.max(delay, retryAfter);
    o.onReconnect?.({ attempt: failures, delay, error });
    try {
      await sleep(delay, signal);
    } catch (err) {
      if (signal?.aborted) return;
      throw err;
    }
  }
}

/**
 * A 53-bit hash of a string (cyrb53): the duplicate filter keeps this
 * instead of each event's text. Two distinct lines share one with a
 * chance of about n²/2^54.
 */
function hash53(text: string): number {
  let h1 = 0xdeadbeef;
  let h2 = 0x41c6ce57;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    h1 = Math.imul(h1 ^ c, 2654435761);
    h2 = Math.imul(h2 ^ c, 1597334677);
  }
  h1 = Math.imul(h1 ^ (h1 >>> 16), 2246822507) ^ Math.imul(h2 ^ (h2 >>> 13), 3266489909);
  h2 = Math.imul(h2 ^ (h2 >>> 16), 2246822507) ^ Math.imul(h1 ^ (h1 >>> 13), 3266489909);
  return 4294967296 * (2097151 & h2) + (h1 >>> 0);
}

/** Wraps an error that must end the iteration without a reconnect. */
class Fatal {
  constructor(readonly error: unknown) {}
}
