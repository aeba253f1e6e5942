// NATS over WebSocket (ws://): what edge runtimes, or a NATS reachable
// through an HTTP proxy only, use. A real nats-server with a websocket
// listener; the driver connects to that listener only.
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { ConfigError, defineDriver, startDriver } from "./mod.ts";
import { readStream, startNatsServer, startTestConveyor } from "./testing.ts";
import { waitFor } from "./test_util.ts";

const echo = defineDriver({
  name: "ws-echo",
  resources: ["app"],
  reconcile({ resource, logger }) {
    logger.info(`over WebSocket: ${resource.name}`);
    return { success: true, message: `echoed ${resource.name}` };
  },
});

const noWebSocket = typeof globalThis.WebSocket !== "function"
  ? "this runtime has no global WebSocket (Node 20): ws:// needs Deno, Bun or Node 22+"
  : undefined;
const quiet = { handleSignals: false, configureLogging: false } as const;

describe("NATS over WebSocket", () => {
  it("runs a driver connected with a ws:// URL: events in, logs and results out", async (t) => {
    if (noWebSocket) return t.skip(noWebSocket);
    await using conveyor = await startTestConveyor({ websocket: true });
    assert.match(conveyor.url, /^ws:\/\/127\.0\.0\.1:\d+$/);
    const started = performance.now();
    await using _d = await startDriver(echo, { servers: conveyor.url, ...quiet });
    const { message } = await conveyor.emit({ resource: "app", name: "edge" });
    const result = await conveyor.waitForResult(message.run_id);
    const coldStart = performance.now() - started;
    assert.equal(result.driverresult.message, "echoed edge");
    for await (const line of conveyor.logs(message.run_id)) {
      assert.equal(line.message, "over WebSocket: edge");
      break;
    }
    t.diagnostic(`cold start to first result over WebSocket: ${coldStart.toFixed(0)} ms`);
  });

  it("gets back after a NATS restart, as over TCP", async (t) => {
    if (noWebSocket) return t.skip(noWebSocket);
    await using conveyor = await startTestConveyor({ websocket: true });
    await using _d = await startDriver(echo, { servers: conveyor.url, ...quiet });
    const before = await conveyor.emit({ resource: "app", name: "before" });
    await conveyor.waitForResult(before.message.run_id);
    await conveyor.server.restart({ downtime: 300 });
    // The WebSocket port is kept across the restart; the kit reconnects too.
    const after = await waitFor(
      () => conveyor.emit({ resource: "app", name: "after" }).catch(() => undefined),
      "a publish after the restart",
    );
    const result = await conveyor.waitForResult(after.message.run_id, { timeout: 30_000 });
    assert.equal(result.driverresult.message, "echoed after");
  });

  it("refuses WebSocket and TCP URLs mixed in servers", async () => {
    await assert.rejects(
      startDriver(echo, { servers: ["ws://127.0.0.1:1", "nats://127.0.0.1:2"], ...quiet }),
      (err) => err instanceof ConfigError && /mixes WebSocket/.test(err.message),
    );
  });

  // nats.js keeps one transport per process, which every connection
  // reconnects with: a second transport would strand the first after a restart.
  it("refuses a driver over TCP while this process holds a WebSocket connection, and the reverse", async (t) => {
    if (noWebSocket) return t.skip(noWebSocket);
    await using conveyor = await startTestConveyor({ websocket: true });
    const tcp = `nats://127.0.0.1:${conveyor.server.port}`;
    await assert.rejects(
      startDriver(echo, { servers: tcp, ...quiet }),
      (err) =>
        err instanceof ConfigError && err.field === "servers" &&
        /over TCP .* while this process has 1 open over WebSocket/.test(err.message),
    );
    await assert.rejects(readStream(tcp, "pipeline-engine"), ConfigError);
    await conveyor.stop();
    // Once the WebSocket connections are closed, TCP is free again.
    await using tcpConveyor = await startTestConveyor();
    await using _d = await startDriver(echo, { servers: tcpConveyor.url, ...quiet });
    await using wsServer = await startNatsServer({ websocket: true });
    await assert.rejects(
      startDriver(echo, { servers: wsServer.wsUrl!, ...quiet }),
      (err) => err instanceof ConfigError && /over WebSocket .* open over TCP/.test(err.message),
    );
  });
});
