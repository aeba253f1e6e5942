/**
 * A driver that checks URLs for each `http-check` resource and records the
 * outcome on the resource through the Conveyor API (`ctx.client`): fetch
 * with `ctx.signal` and a per-request timeout, one log line per URL, the
 * result a success only when every URL answered as expected.
 *
 *     NATS_URL=nats://127.0.0.1:4222 CONVEYOR_API_URL=http://localhost:8080 \
 *       deno run -A examples/http_check.ts
 *     (or bun run examples/http_check.ts; node npm/examples/http_check.js after
 *     node scripts/build_npm.mjs)
 *
 * A resource it checks:
 *
 *     { "name": "web", "resource": "http-check",
 *       "spec": { "urls": ["https://example.com/", "https://example.com/health"],
 *                 "expectStatus": 200, "timeoutMs": 5000 } }
 *
 * After the check the resource's metadata holds `http-check.outcome`
 * (`passing` or `failing`), `http-check.summary`, `http-check.checked-at` and
 * `http-check.run` (metadata values are strings: the server refuses others).
 * Without `CONVEYOR_API_URL` (no `ctx.client`) the check runs and reports its
 * result, and nothing is recorded.
 *
 * It handles `create` events only: the server answers the update this driver
 * makes with an `update` event, which a driver handling updates would answer
 * with another check and another update, for ever. (To re-check on updates,
 * compare the spec with one recorded in the metadata and skip when equal.)
 *
 * @module
 */
import * as v from "valibot";
import { defineDriver, type DriverLogger, serve } from "../mod.ts";
import { isMain } from "./_main.ts";

/** The spec of an `http-check` resource. */
export const HttpCheckSpec = v.object({
  urls: v.pipe(
    v.array(
      v.pipe(
        v.string(),
        v.url(),
        v.check((u) => /^https?:\/\//i.test(u), "only http and https URLs are checked"),
      ),
    ),
    v.minLength(1, "urls must list at least one URL"),
  ),
  expectStatus: v.optional(v.pipe(v.number(), v.integer(), v.minValue(100), v.maxValue(599)), 200),
  /** Per URL, in ms. */
  timeoutMs: v.optional(v.pipe(v.number(), v.integer(), v.minValue(1)), 10_000),
});

/** What one URL answered. */
export interface UrlCheck {
  url: string;
  /** The HTTP status, or null when no answer came. */
  status: number | null;
  /** Whether it is the expected status. */
  ok: boolean;
  /** How long it took, in ms. */
  ms: number;
  /** Why no answer came. */
  error?: string;
}

export const httpCheck = defineDriver({
  name: "http-check",
  resources: ["http-check"],
  events: ["create"],
  spec: HttpCheckSpec,
  async reconcile({ resource, message, runId, logger, signal, client }) {
    const { urls, expectStatus, timeoutMs } = resource.spec; // defaults applied
    const checks = await Promise.all(
      urls.map((url) => checkUrl(url, expectStatus, timeoutMs, signal)),
    );
    for (const c of checks) logCheck(logger, c, expectStatus);

    const passed = checks.filter((c) => c.ok).length;
    const success = passed === checks.length;
    const summary = `${passed} of ${checks.length} URLs answered ${expectStatus}`;
    if (client) {
      // The resource as the event carried it (its spec as the user wrote it,
      // not the schema's output with defaults), with the outcome added.
      const sent = message.payload;
      const updated = await client.updateResource(sent.resource, sent.name, {
        ...sent,
        metadata: {
          ...stringsOnly(sent.metadata),
          "http-check.outcome": success ? "passing" : "failing",
          "http-check.summary": summary,
          "http-check.checked-at": new Date().toISOString(),
          "http-check.run": runId,
        },
      }, { signal });
      logger.info(`recorded the outcome as version ${updated.metadata.version}`);
    }
    return { success, message: summary, data: { checks } };
  },
});

/** GETs `url`; an abort of `signal` (the runtime giving up) rejects with its reason. */
async function checkUrl(
  url: string,
  expectStatus: number,
  timeoutMs: number,
  signal: AbortSignal,
): Promise<UrlCheck> {
  const started = performance.now();
  const ms = () => Math.round(performance.now() - started);
  try {
    const res = await fetch(url, {
      signal: AbortSignal.any([signal, AbortSignal.timeout(timeoutMs)]),
    });
    await res.body?.cancel(); // the status is all we need
    return { url, status: res.status, ok: res.status === expectStatus, ms: ms() };
  } catch (err) {
    if (signal.aborted) throw signal.reason;
    const error = (err as Error)?.name === "TimeoutError"
      ? `no answer within ${timeoutMs} ms`
      : String((err as Error)?.message ?? err);
    return { url, status: null, ok: false, ms: ms(), error };
  }
}

function logCheck(logger: DriverLogger, c: UrlCheck, expectStatus: number): void {
  const labels = { url: c.url, status: c.status ?? "none" };
  if (c.status === null) logger.error(`GET ${c.url}: ${c.error}`, labels);
  else if (c.ok) logger.info(`GET ${c.url}: ${c.status} (${c.ms} ms)`, labels);
  else logger.warn(`GET ${c.url}: ${c.status}, expected ${expectStatus} (${c.ms} ms)`, labels);
}

/** The server's metadata is a map of strings: anything else would be refused. */
function stringsOnly(metadata: Record<string, unknown>): Record<string, string> {
  return Object.fromEntries(
    Object.entries(metadata ?? {}).filter((e): e is [string, string] => typeof e[1] === "string"),
  );
}

if (isMain(import.meta)) await serve(httpCheck);
