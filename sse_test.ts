import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { readSse, type SseEvent, type SseOptions } from "./sse.ts";
import { ApiNetworkError, ApiTimeoutError, ConfigError, ConveyorApiError } from "./errors.ts";
import { startTestApiServer, type TestApiServer } from "./test_api_server.ts";
import type { LogEntry } from "./types.ts";

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

function line(runid: string, message: string, timestamp = "2025-01-01T00:00:00Z"): LogEntry {
  return { runid, driver: "builder", timestamp, message };
}

/** The dedup key client.ts uses for logs, from the parsed JSON. */
function logKey(data: string): string {
  const l = JSON.parse(data);
  return JSON.stringify([l.runid, l.driver, l.timestamp, l.message]);
}

/** Iterates until `n` events arrived (then breaks), or the stream throws. */
async function take(
  url: string,
  n: number,
  options: SseOptions = {},
  onEvent?: (ev: SseEvent, i: number) => void | Promise<void>,
): Promise<SseEvent[]> {
  const out: SseEvent[] = [];
  if (n === 0) return out;
  for await (const ev of readSse(url, { initialDelay: 10, maxDelay: 50, ...options })) {
    out.push(ev);
    await onEvent?.(ev, out.length);
    if (out.length >= n) break;
  }
  return out;
}

function streamUrl(api: TestApiServer, runId: string): string {
  return `${api.url}/logs/streams/builder/${runId}`;
}

async function waitUntil(check: () => boolean, what: string, timeout = 10_000): Promise<void> {
  const end = Date.now() + timeout;
  while (!check()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

describe("readSse", () => {
  it("yields data events and ignores heartbeat comments", async () => {
    await using api = await startTestApiServer();
    const runId = crypto.randomUUID();
    api.sse.heartbeatFirst = true;
    api.sse.heartbeat = 10;
    api.logs.push(line(runId, "stored"));
    const events = await take(streamUrl(api, runId), 2, {}, async (_ev, i) => {
      if (i === 1) {
        await sleep(60); // a few heartbeats go by
        api.pushLog(line(runId, "live"));
      }
    });
    assert.deepEqual(events.map((e) => JSON.parse(e.data).message), ["stored", "live"]);
    assert.ok(events.every((e) => e.event === undefined && e.id === undefined));
    const req = api.requests[0];
    assert.equal(req.headers.accept, "text/event-stream");
    assert.equal(req.headers["last-event-id"], undefined);
  });

  for (const chunkSize of [1, 2, 3, 7]) {
    it(`reassembles events split into ${chunkSize}-byte chunks, multi-byte characters too`, async () => {
      await using api = await startTestApiServer();
      const runId = crypto.randomUUID();
      api.sse.chunkSize = chunkSize;
      api.sse.heartbeatFirst = true;
      const messages = ["héllo ✓", "日本語のログ", "emoji 🚀 end"];
      for (const m of messages) api.logs.push(line(runId, m));
      const events = await take(streamUrl(api, runId), 3);
      assert.deepEqual(events.map((e) => JSON.parse(e.data).message), messages);
    });
  }

  for (const [name, ending] of [["CRLF", "\r\n"], ["CR", "\r"]] as const) {
    it(`handles ${name} line endings, split chunks too`, async () => {
      await using api = await startTestApiServer();
      const runId = crypto.randomUUID();
      api.sse.lineEnding = ending;
      api.sse.heartbeatFirst = true;
      api.sse.chunkSize = 1; // a CR and its LF arrive in separate reads
      api.logs.push(line(runId, "a"), line(runId, "b"));
      const events = await take(streamUrl(api, runId), 2);
      assert.deepEqual(events.map((e) => JSON.parse(e.data).message), ["a", "b"]);
    });
  }

  it("reports event names, ids and multi-line data", async () => {
    await using api = await startTestApiServer();
    const runId = crypto.randomUUID();
    api.sse.heartbeatFirst = true;
    const done = take(streamUrl(api, runId), 3);
    await api.waitForStreams(1);
    api.sseWrite("event: log\nid: 7\ndata: a\ndata: b\n\n: a comment\n");
    api.sseWrite("retry: 5\nid\ndata: c\n\ndata:d\n\n");
    assert.deepEqual(await done, [
      { data: "a\nb", event: "log", id: "7" },
      { data: "c", id: "" },
      { data: "d" },
    ]);
  });

  it("reconnects after a drop without yielding the server's replay again", async () => {
    await using api = await startTestApiServer();
    const runId = crypto.randomUUID();
    // The same line twice on purpose: both copies must come through.
    api.logs.push(line(runId, "one"), line(runId, "same"), line(runId, "same"));
    api.sse.dropAfter.push(2, 4); // 1st connection: after 2 events; 2nd: after 4
    let connects = 0;
    const events = await take(
      streamUrl(api, runId),
      6,
      {
        key: logKey,
        headers: () => ({ Authorization: `Bearer token-${++connects}` }),
      },
      async (_ev, i) => {
        if (i === 3) {
          await waitUntil(() => api.openStreams === 1, "the 2nd connection");
          api.pushLog(line(runId, "four"));
        }
        if (i === 4) {
          // Dropped after 4 events; the 3rd connection replays all 4 lines
          // again. (Not awaited here: the reader reconnects only when asked
          // for the next event.)
          waitUntil(() => api.requests.length === 3 && api.openStreams === 1, "the 3rd connection")
            .then(() => {
              api.pushLog(line(runId, "same"));
              api.pushLog(line(runId, "five"));
            });
        }
      },
    );
    assert.deepEqual(events.map((e) => JSON.parse(e.data).message), [
      "one",
      "same",
      "same",
      "four",
      "same",
      "five",
    ]);
    assert.equal(api.requests.length, 3);
    // Fresh headers on every connect (a renewed token).
    assert.deepEqual(api.requests.map((r) => r.headers.authorization), [
      "Bearer token-1",
      "Bearer token-2",
      "Bearer token-3",
    ]);
  });

  it("refuses a dedupeWindow that is not a positive integer, before connecting", async () => {
    await using api = await startTestApiServer();
    for (const dedupeWindow of [0, -1, 2.5, NaN, Infinity]) {
      await assert.rejects(
        take(streamUrl(api, crypto.randomUUID()), 1, { key: logKey, dedupeWindow }),
        (err: unknown) => err instanceof ConfigError && err.field === "dedupeWindow",
      );
    }
    assert.equal(api.requests.length, 0);
  });

  it("without a key, yields what the server sends", async () => {
    await using api = await startTestApiServer();
    const runId = crypto.randomUUID();
    api.logs.push(line(runId, "one"), line(runId, "two"));
    api.sse.dropAfter.push(1);
    const events = await take(streamUrl(api, runId), 3);
    assert.deepEqual(events.map((e) => JSON.parse(e.data).message), ["one", "one", "two"]);
  });

  it("sends Last-Event-ID on reconnect and honours the server's retry: field", async () => {
    await using api = await startTestApiServer();
    const runId = crypto.randomUUID();
    api.sse.ids = true;
    api.sse.retry = 20;
    api.logs.push(line(runId, "one"), line(runId, "two"));
    api.sse.dropAfter.push(1);
    const started = Date.now();
    // Without the server's retry: 20, the first reconnect would wait a minute.
    const events = await take(streamUrl(api, runId), 2, {
      initialDelay: 60_000,
      maxDelay: 60_000,
      key: logKey,
    });
    assert.ok(Date.now() - started < 10_000);
    assert.deepEqual(events.map((e) => JSON.parse(e.data).message), ["one", "two"]);
    assert.equal(events[0].id, "1");
    assert.equal(api.requests[0].headers["last-event-id"], undefined);
    assert.equal(api.requests[1].headers["last-event-id"], "1");
  });

  it("closes the connection when the consumer breaks", async () => {
    await using api = await startTestApiServer();
    const runId = crypto.randomUUID();
    api.logs.push(line(runId, "one"), line(runId, "two"));
    const events = await take(streamUrl(api, runId), 1);
    assert.equal(events.length, 1);
    await waitUntil(() => api.openStreams === 0, "the server to see the stream closed");
    await sleep(50);
    assert.equal(api.requests.length, 1, "no reconnect after break");
  });

  it("closes the stream on abort and ends the iteration quietly", async () => {
    await using api = await startTestApiServer();
    const runId = crypto.randomUUID();
    api.sse.heartbeatFirst = true;
    const ac = new AbortController();
    const reason = new Error("stop it");
    const got: SseEvent[] = [];
    const done = take(streamUrl(api, runId), 10, { signal: ac.signal }, (ev) => {
      got.push(ev);
    });
    await api.waitForStreams(1);
    api.pushLog(line(runId, "one"));
    await waitUntil(() => got.length === 1, "the first event");
    ac.abort(reason);
    assert.equal((await done).length, 1, "the loop ends, nothing thrown");
    await waitUntil(() => api.openStreams === 0, "the server to see the stream closed");
    assert.equal(api.requests.length, 1);
  });

  it("ends at once with an already aborted signal, without a request", async () => {
    await using api = await startTestApiServer();
    const ac = new AbortController();
    ac.abort();
    assert.deepEqual(await take(streamUrl(api, crypto.randomUUID()), 1, { signal: ac.signal }), []);
    assert.equal(api.requests.length, 0);
  });

  it("ends quietly when aborted during the reconnect delay", async () => {
    await using api = await startTestApiServer();
    const runId = crypto.randomUUID();
    api.logs.push(line(runId, "one"));
    api.sse.dropAfter.push(1);
    const ac = new AbortController();
    const done = take(streamUrl(api, runId), 5, {
      signal: ac.signal,
      initialDelay: 60_000,
      maxDelay: 60_000,
      onReconnect: () => ac.abort(),
    });
    assert.equal((await done).length, 1);
    assert.equal(api.requests.length, 1);
  });

  it("fails on a 4xx without reconnecting, with the server's error text", async () => {
    await using api = await startTestApiServer({ auth: () => false });
    const err = await take(streamUrl(api, crypto.randomUUID()), 1).then(
      () => assert.fail("no error"),
      (e) => e,
    );
    assert.ok(err instanceof ConveyorApiError);
    assert.equal(err.status, 401);
    assert.equal(err.error, "missing Authorization header");
    assert.equal(err.method, "GET");
    assert.match(err.path, /^\/logs\/streams\/builder\//);
    assert.equal(api.requests.length, 1);

    api.fail({
      match: "GET /logs/streams/{drivername}/{runid}",
      status: 404,
      body: "no such page",
    });
    await assert.rejects(take(streamUrl(api, "x"), 1), { status: 404, error: "no such page" });
  });

  it("reconnects after 5xx, 429 and network errors, honouring Retry-After", async () => {
    await using api = await startTestApiServer();
    const runId = crypto.randomUUID();
    api.logs.push(line(runId, "one"));
    const op = "GET /logs/streams/{drivername}/{runid}";
    api.fail({ match: op, status: 503, body: { error: "busy" }, headers: { "Retry-After": "0" } });
    api.fail({ match: op, status: 429, body: "slow down" });
    api.fail({ match: op, drop: true });
    const reconnects: unknown[] = [];
    const events = await take(streamUrl(api, runId), 1, {
      onReconnect: ({ error }) => reconnects.push(error),
    });
    assert.equal(events.length, 1);
    assert.equal(api.requests.length, 4);
    assert.equal((reconnects[0] as ConveyorApiError).status, 503);
    assert.equal((reconnects[1] as ConveyorApiError).status, 429);
    assert.ok(reconnects[2] instanceof ApiNetworkError);
  });

  it("gives up after maxRetries consecutive failures", async () => {
    await using api = await startTestApiServer();
    api.fail({ drop: true, times: 3 });
    await assert.rejects(
      take(streamUrl(api, crypto.randomUUID()), 1, { maxRetries: 2 }),
      (err) => err instanceof ApiNetworkError,
    );
    assert.equal(api.requests.length, 3);

    api.fail({ status: 500, body: { error: "Error getting logs" }, times: 2 });
    await assert.rejects(
      take(streamUrl(api, crypto.randomUUID()), 1, { maxRetries: 1 }),
      { status: 500, error: "Error getting logs" },
    );
  });

  it("times out waiting for response headers after connectTimeout", async () => {
    await using api = await startTestApiServer();
    // No stored lines and no heartbeat: the headers never come.
    const started = Date.now();
    const err = await take(streamUrl(api, crypto.randomUUID()), 1, {
      connectTimeout: 100,
      maxRetries: 1,
    }).then(() => assert.fail("no error"), (e) => e);
    assert.ok(err instanceof ApiTimeoutError, String(err));
    assert.equal(err.timeout, 100);
    assert.ok(Date.now() - started >= 200);
    assert.equal(api.requests.length, 2);
  });

  it("keeps a connection through silence shorter than idleTimeout, and reconnects after a longer one", async () => {
    await using api = await startTestApiServer();
    const runId = crypto.randomUUID();
    api.sse.heartbeatFirst = true;
    const reconnects: unknown[] = [];
    const got: SseEvent[] = [];
    const done = take(streamUrl(api, runId), 2, {
      connectTimeout: 50,
      idleTimeout: 400,
      key: logKey,
      onReconnect: ({ error }) => reconnects.push(error),
    }, (ev) => void got.push(ev));
    await api.waitForStreams(1);
    await sleep(200); // silent, far beyond connectTimeout, within idleTimeout
    api.pushLog(line(runId, "early"));
    await waitUntil(() => got.length === 1, "the first line");
    assert.equal(api.requests.length, 1, "the same connection");
    // Silent for longer than idleTimeout: a new connection, which resumes.
    await waitUntil(() => api.requests.length === 2, "a reconnect after the silence", 5_000);
    assert.ok(reconnects[0] instanceof ApiTimeoutError, String(reconnects[0]));
    assert.equal((reconnects[0] as ApiTimeoutError).timeout, 400);
    await api.waitForStreams(1);
    api.pushLog(line(runId, "late"));
    assert.deepEqual((await done).map((e) => JSON.parse(e.data).message), ["early", "late"]);
  });

  it("reconnects ever more slowly to a server that sends retry: 0 and a heartbeat, then closes", async () => {
    await using api = await startTestApiServer();
    api.sse.heartbeatFirst = true;
    api.sse.retry = 0;
    api.sse.dropAfter.push(...Array(1_000).fill(0));
    const ac = new AbortController();
    const delays: number[] = [];
    const done = take(streamUrl(api, crypto.randomUUID()), 1, {
      signal: ac.signal,
      initialDelay: 250,
      maxDelay: 5_000,
      maxRetries: Infinity,
      onReconnect: ({ delay }) => void delays.push(delay),
    });
    await sleep(3_000);
    ac.abort();
    await done;
    // 250, 500, 1000, 2000 ms (±20%): five connections in 3 s, where a
    // reader that takes retry: 0 as is and resets on every heartbeat makes hundreds.
    assert.ok(api.requests.length <= 6, `${api.requests.length} connections`);
    assert.ok(delays.every((d) => d >= 200), `delays ${delays}`);
    for (let i = 1; i < delays.length; i++) {
      assert.ok(delays[i] > delays[i - 1], `growing: ${delays}`);
    }
  });

  it("ends with an error when the stream sends more than maxEventBytes without an event", async () => {
    // A broken proxy: one endless line, never a blank line to end the event.
    const endless = (): Promise<Response> => {
      let sent = 0;
      const body = new ReadableStream<Uint8Array>({
        pull(c) {
          if (sent++ === 0) c.enqueue(new TextEncoder().encode("data: "));
          else c.enqueue(new Uint8Array(64 * 1024).fill(0x61));
          if (sent > 1_000) c.close();
        },
      });
      return Promise.resolve(
        new Response(body, { headers: { "Content-Type": "text/event-stream" } }),
      );
    };
    const err = await take("http://conveyor.test/logs/pipeline/x", 1, {
      fetch: endless,
      maxEventBytes: 1024 * 1024,
    }).then(() => assert.fail("no error"), (e) => e);
    assert.ok(err instanceof ConveyorApiError, String(err));
    assert.match(err.error, /over 1048576 bytes without completing an event/);
  });

  it("reads at most 64 KiB of an error answer, and keeps 2,000 characters of its text", async () => {
    await using api = await startTestApiServer();
    api.fail({ status: 400, body: { error: "x".repeat(5_000_000) } });
    const err = await take(streamUrl(api, "r"), 1).then(() => assert.fail("no error"), (e) => e);
    assert.ok(err instanceof ConveyorApiError);
    // The JSON is cut at 64 KiB, so it is shown as text, cut again.
    assert.ok(err.error.length < 2_100, `${err.error.length} characters`);
    assert.match(err.error, /more characters\]$/);
  });

  it("refuses a 2xx answer that is not an event stream", async () => {
    await using api = await startTestApiServer();
    api.fail({ status: 200, body: { not: "sse" } });
    await assert.rejects(take(streamUrl(api, "x"), 1), (err) => {
      assert.ok(err instanceof ConveyorApiError);
      assert.equal(err.status, 200);
      assert.match(err.error, /text\/event-stream/);
      return true;
    });
    assert.equal(api.requests.length, 1);
  });
});
