// NATS over WebSocket (ws://): what edge runtimes, or a NATS reachable
// through an HTTP proxy only, use. A real nats-server with a websocket
// listener; the driver connects to that listener only.
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ConfigError, defineDriver, startDriver } from "./mod.ts";
import { startTestConveyor } from "./testing.ts";
import { freePort } from "./test_util.ts";

const echo = defineDriver({
  name: "ws-echo",
  resources: ["app"],
  reconcile({ resource, logger }) {
    logger.info(`over WebSocket: ${resource.name}`);
    return { success: true, message: `echoed ${resource.name}` };
  },
});

describe("NATS over WebSocket", () => {
  it("runs a driver connected with a ws:// URL: events in, logs and results out", async (t) => {
    if (typeof globalThis.WebSocket !== "function") {
      t.skip("this runtime has no global WebSocket (Node 20): ws:// needs Deno, Bun or Node 22+");
      return;
    }
    const dir = await mkdtemp(join(tmpdir(), "conveyor-ws-"));
    try {
      const port = await freePort();
      const config = join(dir, "ws.conf");
      writeFileSync(config, `websocket { listen: "127.0.0.1:${port}", no_tls: true }\n`);
      await using conveyor = await startTestConveyor({ nats: { args: ["-c", config] } });
      const url = `ws://127.0.0.1:${port}`;
      const started = performance.now();
      await using _d = await startDriver(echo, {
        servers: url,
        handleSignals: false,
        configureLogging: false,
      });
      const { message } = await conveyor.emit({ resource: "app", name: "edge" });
      const result = await conveyor.waitForResult(message.run_id);
      const coldStart = performance.now() - started;
      assert.equal(result.driverresult.message, "echoed edge");
      for await (const line of conveyor.logs(message.run_id)) {
        assert.equal(line.message, "over WebSocket: edge");
        break;
      }
      t.diagnostic(`cold start to first result over WebSocket: ${coldStart.toFixed(0)} ms`);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("refuses WebSocket and TCP URLs mixed in servers", async () => {
    await assert.rejects(
      startDriver(echo, {
        servers: ["ws://127.0.0.1:1", "nats://127.0.0.1:2"],
        handleSignals: false,
        configureLogging: false,
      }),
      (err) => err instanceof ConfigError && /mixes WebSocket/.test(err.message),
    );
  });
});
