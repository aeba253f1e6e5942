/**
 * Internal leaf helpers shared by the other modules (not part of the public
 * API): timers that accept any duration, one backoff, environment access,
 * and text for errors of any shape.
 *
 * @module
 */
/** The longest delay `setTimeout` honours on every runtime; longer ones fire at once. */
export const MAX_TIMER_MS = 2 ** 31 - 1;

/** A cancellable timer from {@link setLongTimeout}. */
export interface LongTimer {
  /** Cancels the timer; calling it after it fired does nothing. */
  clear(): void;
}

/**
 * `setTimeout` for any duration: delays of 2^31 ms or more (which every
 * runtime fires after 1 ms) are chained, and `Infinity` never fires.
 */
export function setLongTimeout(fn: () => void, ms: number): LongTimer {
  let timer: ReturnType<typeof setTimeout> | undefined;
  let cleared = false;
  const end = Date.now() + ms;
  const arm = (left: number) => {
    if (!Number.isFinite(left)) return;
    timer = setTimeout(() => {
      const rest = end - Date.now();
      if (cleared) return;
      if (rest > 0) arm(rest);
      else fn();
    }, Math.max(0, Math.min(MAX_TIMER_MS, left)));
  };
  arm(ms);
  return {
    clear() {
      cleared = true;
      clearTimeout(timer);
    },
  };
}

/** Resolves after `ms` (any duration), or rejects with the signal's reason when it aborts first. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const timer = setLongTimeout(done, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
    function done() {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }
    function onAbort() {
      timer.clear();
      reject(signal!.reason);
    }
  });
}

/** Like {@link sleep}, but resolves (never rejects) when the signal aborts. */
export function pause(ms: number, signal?: AbortSignal): Promise<void> {
  return sleep(ms, signal).catch(() => {});
}

/** Settings of {@link backoff}. */
export interface BackoffOptions {
  /** Delay after the first failure, in ms. */
  retryDelay: number;
  /** Upper bound of the delay, in ms. */
  retryMaxDelay: number;
}

/**
 * Delay before retrying after failure number `attempt` (1-based):
 * exponential from `retryDelay`, capped at `retryMaxDelay`, ±20% jitter so
 * that many failures do not come back in lockstep. `random` is for tests.
 */
export function backoff(
  attempt: number,
  o: BackoffOptions,
  random: () => number = Math.random,
): number {
  const base = Math.min(o.retryMaxDelay, o.retryDelay * 2 ** Math.max(0, attempt - 1));
  const jitter = base * 0.2 * (random() * 2 - 1);
  return Math.max(0, Math.round(Math.min(o.retryMaxDelay, base + jitter)));
}

/** Reads an environment variable; undefined when unset, blank or not permitted (Deno). */
export function readEnv(name: string): string | undefined {
  try {
    // Through globalThis rather than node:process: edge runtimes may lack it,
    // and the API client must load there.
    const env = (globalThis as { process?: { env?: Record<string, string | undefined> } })
      .process?.env;
    const value = env?.[name]?.trim();
    return value ? value : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Reads a UTF-8 file through the runtime's `node:fs` without importing it
 * (`process.getBuiltinModule`: Node >= 20.16, Deno, Bun), so that modules
 * using it still load, and bundle, where there is no file system; there it
 * throws a `TypeError` that says so.
 */
export async function readTextFile(path: string): Promise<string> {
  type Fs = { readFile(path: string, encoding: "utf8"): Promise<string> };
  const proc = (globalThis as {
    process?: { getBuiltinModule?: (id: string) => Fs | undefined };
  }).process;
  const fs = typeof proc?.getBuiltinModule === "function"
    ? proc.getBuiltinModule("node:fs/promises")
    : undefined;
  if (!fs) {
    throw new TypeError(
      "this runtime has no file system (no process.getBuiltinModule); pass the PEM text " +
        "(cert, key, ca options) instead of a file",
    );
  }
  return await fs.readFile(path, "utf8");
}

/** `String(x)` that cannot throw (a null-prototype object, a throwing `toString`). */
export function safeString(x: unknown): string {
  try {
    return String(x);
  } catch {
    try {
      return JSON.stringify(x) ?? Object.prototype.toString.call(x);
    } catch {
      return Object.prototype.toString.call(x);
    }
  }
}

/**
 * A message for any thrown value: an Error's message (or name), a string as
 * is, anything else described. Never throws, even for hostile values.
 */
export function errorText(err: unknown): string {
  try {
    if (err instanceof Error) {
      const message = err.message;
      return typeof message === "string" && message !== "" ? message : safeString(err.name);
    }
  } catch {
    return "an Error whose message cannot be read";
  }
  return typeof err === "string" ? err : `non-Error thrown: ${safeString(err)}`;
}

/** The name of a thrown value's class (`"Error"`, `"TypeError"`…), or its `typeof`. Never throws. */
export function errorName(err: unknown): string {
  try {
    if (err instanceof Error && typeof err.name === "string") return err.name;
  } catch { /* a throwing getter: fall through */ }
  return err === null ? "null" : typeof err;
}

/**
 * The error text of an HTTP response: the `error` (or `message`) field of a
 * JSON body, else the body as text, else the status text.
 */
export function httpErrorText(res: Response, body: string): string {
  const text = body.trim();
  if (text.startsWith("{")) {
    try {
      const json = JSON.parse(text) as Record<string, unknown>;
      const msg = json.error ?? json.message;
      if (typeof msg === "string" && msg !== "") return truncate(msg, MAX_ERROR_TEXT);
    } catch {
      // not JSON after all: use the text
    }
  }
  return truncate(text, MAX_ERROR_TEXT) || res.statusText || `HTTP ${res.status}`;
}

/** Longest server error text an error carries, in characters. */
export const MAX_ERROR_TEXT = 2_000;
/** Most bytes of an error response's body that are read. */
export const MAX_ERROR_BODY = 64 * 1024;

/** `text` cut to `max` characters, saying how much was left out. */
export function truncate(text: string, max: number): string {
  return text.length <= max
    ? text
    : `${text.slice(0, max)}… [${text.length - max} more characters]`;
}

/**
 * Reads a response body as text, at most `max` bytes: the rest is not read
 * (the body is cancelled) and `truncated` says so. Bounds what a server or
 * proxy can make the client hold.
 */
export async function readText(
  res: Response,
  max: number,
): Promise<{ text: string; truncated: boolean }> {
  if (!res.body) return { text: "", truncated: false };
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let text = "";
  let bytes = 0;
  try {
    while (true) {
      const { done, value } = await reader.read();
      if (done) return { text: text + decoder.decode(), truncated: false };
      if (bytes + value.length > max) {
        text += decoder.decode(value.subarray(0, max - bytes));
        await reader.cancel().catch(() => {});
        return { text, truncated: true };
      }
      bytes += value.length;
      text += decoder.decode(value, { stream: true });
    }
  } finally {
    reader.releaseLock();
  }
}

/**
 * Milliseconds a `Retry-After` header asks to wait: delta-seconds or an HTTP
 * date; undefined when absent or unreadable.
 */
export function parseRetryAfter(
  value: string | null,
  now: number = Date.now(),
): number | undefined {
  if (value === null) return undefined;
  const text = value.trim();
  if (/^\d+$/.test(text)) return Number(text) * 1_000;
  const date = Date.parse(text);
  return Number.isNaN(date) ? undefined : Math.max(0, date - now);
}

/** A server URL without its user info (`nats://user:pass@host` -> `nats://host`), for messages. */
export function redactUrl(url: string): string {
  return url.replace(/^([a-z][a-z0-9+.-]*:\/\/)?[^/@\s]*@/i, "$1");
}

/** Whether `x` is a plain (non-array) object. */
export function isRecord(x: unknown): x is Record<string, unknown> {
  return typeof x === "object" && x !== null && !Array.isArray(x);
}
