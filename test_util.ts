// Shared helpers of the test files (not published).
import { spawn } from "node:child_process";
import { createServer } from "node:net";
import process from "node:process";
import type { NatsConnection } from "@nats-io/transport-node";
import { openNats } from "./_nats.ts";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import {
  type NatsServer,
  readStream,
  startTestConveyor,
  type StoredMessage,
  type TestConveyor,
} from "./testing.ts";

/** A port on 127.0.0.1 that nothing listens on right now. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
  });
}

/** Polls `check` until it returns a truthy value or `timeout` ms pass. */
export async function waitFor<T>(
  check: () => T | Promise<T>,
  what: string,
  timeout = 15_000,
): Promise<NonNullable<T>> {
  const end = Date.now() + timeout;
  let last: unknown;
  while (Date.now() < end) {
    try {
      last = await check();
      if (last) return last as NonNullable<T>;
    } catch (err) {
      last = String(err); // e.g. a request timing out while NATS restarts
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(
    `timed out after ${timeout} ms waiting for ${what} (last: ${JSON.stringify(last)})`,
  );
}

/**
 * The testing kit's conveyor (a nats-server with the Conveyor streams), plus
 * a connection that rides out server restarts, for the tests that go below
 * what the kit offers.
 */
export interface Env extends AsyncDisposable {
  conveyor: TestConveyor;
  server: NatsServer;
  /** The tests' own connection, over {@link TRANSPORT}, riding out restarts. */
  nc: NatsConnection;
  /** The URL drivers connect to: `ws://` when {@link TRANSPORT} is "ws". */
  url: string;
}

/**
 * How the drivers under test reach NATS: `CONVEYOR_TEST_TRANSPORT=ws` runs
 * them over WebSocket (scripts/test.mjs runs the end-to-end files both ways
 * on Deno and Bun).
 */
export const TRANSPORT: "tcp" | "ws" = process.env.CONVEYOR_TEST_TRANSPORT === "ws" ? "ws" : "tcp";

/** A testing-kit conveyor speaking {@link TRANSPORT}. */
export function transportConveyor(): Promise<TestConveyor> {
  if (TRANSPORT === "ws" && typeof globalThis.WebSocket !== "function") {
    throw new Error("CONVEYOR_TEST_TRANSPORT=ws needs a runtime with a global WebSocket");
  }
  return startTestConveyor({ websocket: TRANSPORT === "ws" });
}

export async function conveyorEnv(): Promise<Env> {
  const conveyor = await transportConveyor();
  const nc = await openNats({
    servers: conveyor.url,
    maxReconnectAttempts: -1,
    reconnectTimeWait: 100,
  });
  return {
    conveyor,
    server: conveyor.server,
    nc,
    url: conveyor.url,
    async [Symbol.asyncDispose]() {
      await nc.close().catch(() => {});
      await conveyor.stop();
    },
  };
}

/** Options the tests start drivers with: no signal handlers, no console output. */
export const quiet = { handleSignals: false, configureLogging: false } as const;

/** A result envelope as stored (loosely typed, for assertions). */
// deno-lint-ignore no-explicit-any
export type Envelope = { event: string; run_id: string; resource: any; driverresult: any };

/** The envelope of a stored result. */
export const envelope = (m: StoredMessage): Envelope => m.json as Envelope;

/** The results stored on `pipelines.driver.result`. */
export function results(env: Env): Promise<StoredMessage[]> {
  return readStream(env.nc, "pipeline-engine", "pipelines.driver.result");
}

/** Waits until at least `n` results are stored; returns them. */
export async function waitForResults(
  env: Env,
  n: number,
  timeout = 20_000,
): Promise<StoredMessage[]> {
  return await waitFor(
    async () => {
      const r = await results(env);
      return r.length >= n ? r : undefined;
    },
    `${n} result(s)`,
    timeout,
  );
}

/** Waits until the consumer has nothing pending or unacknowledged. */
export function drained(env: Env, name: string): Promise<unknown> {
  return waitFor(async () => {
    const s = await consumerState(env.nc, name);
    return s.pending === 0 && s.ackPending === 0 ? s : undefined;
  }, `consumer ${name} drained`);
}

/**
 * Publishes `n` events to resources.pipeline in the server's wire format,
 * pipelined in batches; returns their run ids in order.
 */
export async function publishMany(
  nc: NatsConnection,
  n: number,
  prefix: string,
): Promise<string[]> {
  const js = jetstream(nc);
  const runIds: string[] = [];
  for (let i = 0; i < n; i += 500) {
    const batch = [];
    for (let j = i; j < Math.min(n, i + 500); j++) {
      const runId = crypto.randomUUID();
      runIds.push(runId);
      const resource = JSON.stringify({
        id: `${prefix}-${j}`,
        name: `${prefix}-${j}`,
        resource: "pipeline",
        metadata: { version: "1" },
        spec: { n: j },
      });
      batch.push(js.publish(
        "resources.pipeline",
        JSON.stringify({
          event: "create",
          id: crypto.randomUUID(),
          run_id: runId,
          payload: resource,
        }),
      ));
    }
    await Promise.all(batch);
  }
  return runIds;
}

/**
 * Waits until driver `name`'s consumer exists on stream `messages`: a driver
 * started in another process takes events from then on (the stream drops
 * those published before any consumer wanted them).
 */
export async function consumerReady(
  target: NatsConnection | string,
  name: string,
  timeout = 30_000,
): Promise<boolean> {
  const nc = typeof target === "string" ? await openNats({ servers: target }) : target;
  try {
    return await waitFor(
      async () => {
        const jsm = await jetstreamManager(nc);
        return await jsm.consumers.info("messages", name).then(() => true, () => false);
      },
      `driver ${name}'s consumer`,
      timeout,
    );
  } finally {
    if (typeof target === "string") await nc.close();
  }
}

/** Delivered and acknowledged counts of a driver's consumer. */
export async function consumerState(nc: NatsConnection, name: string) {
  const jsm = await jetstreamManager(nc);
  const info = await jsm.consumers.info("messages", name);
  return {
    pending: info.num_pending,
    ackPending: info.num_ack_pending,
    redelivered: info.num_redelivered,
    delivered: info.delivered.consumer_seq,
    config: info.config,
  };
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/**
 * A program from testdata/ running in its own process; see {@link spawnProgram}.
 * Disposing of it kills it (SIGKILL) if it still runs, so a failing test
 * leaves no process behind.
 */
export interface Program extends AsyncDisposable {
  /** Everything it printed on stdout so far. */
  out: string;
  /** Everything it printed on stderr so far, when spawned with `stderr: "capture"`. */
  err: string;
  /** Its exit code (null when a signal ended it). */
  exited: Promise<number | null>;
  /** Waits until it printed "ready <pid>". */
  ready(): Promise<unknown>;
  /** Sends a signal to the program (not to a wrapper). */
  kill(signal: "SIGTERM" | "SIGINT" | "SIGKILL"): void;
}

/**
 * Runs testdata/<program> (or <dir>/<program>) in its own process on the runtime running the
 * tests, with extra environment variables; `gc` exposes a garbage collector
 * to it (`globalThis.gc`, or Bun.gc).
 */
export function spawnProgram(
  program: string,
  vars: Record<string, string>,
  options: { gc?: boolean; stderr?: "inherit" | "capture" } = {},
): Program {
  const ext = import.meta.url.endsWith(".js") ? "js" : "ts";
  // "name" is a program in testdata/; "dir/name" one elsewhere (examples/).
  const rel = program.includes("/") ? program : `testdata/${program}`;
  const file = new URL(`./${rel}.${ext}`, import.meta.url).pathname;
  const gc = options.gc ? ["--v8-flags=--expose-gc"] : [];
  const [cmd, args] = "Deno" in globalThis
    ? [process.execPath, ["run", "-A", ...gc, file]]
    : "Bun" in globalThis
    ? [process.execPath, ["run", file]]
    : [process.execPath, [...(options.gc ? ["--expose-gc"] : []), file]];
  const child = spawn(cmd, args, {
    env: { ...process.env, ...vars },
    stdio: ["ignore", "pipe", options.stderr === "capture" ? "pipe" : "inherit"],
  });
  const proc: Program = {
    out: "",
    err: "",
    exited: new Promise<number | null>((r) => child.on("exit", (code) => r(code))),
    ready: () => waitFor(() => proc.out.includes("ready"), "driver process ready", 30_000),
    // process.kill, not child.kill: Deno's ChildProcess reports any child it
    // was asked to kill as ended by that signal, whatever its exit code.
    kill: (signal) => process.kill(Number(/ready (\d+)/.exec(proc.out)![1]), signal),
    async [Symbol.asyncDispose]() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill("SIGKILL");
      await proc.exited;
    },
  };
  child.stdout!.on("data", (c: Uint8Array) => (proc.out += new TextDecoder().decode(c)));
  child.stderr?.on("data", (c: Uint8Array) => (proc.err += new TextDecoder().decode(c)));
  return proc;
}

import { Ajv2020 } from "ajv/dist/2020.js";
import addFormats from "ajv-formats";
import { readFileSync } from "node:fs";

const schemaNames = ["resource", "driver-message", "driver-result", "driver-result-event", "log"];

/** Validators compiled from the SDD's own JSON schemas (schemas/*.json). */
export function sddValidators(): Record<string, (x: unknown) => string | undefined> {
  // deno-lint-ignore no-explicit-any
  const ajv = new (Ajv2020 as any)({ strict: false, allErrors: true });
  // deno-lint-ignore no-explicit-any
  ((addFormats as any).default ?? addFormats)(ajv);
  const out: Record<string, (x: unknown) => string | undefined> = {};
  for (const name of schemaNames) {
    const schema = JSON.parse(
      readFileSync(new URL(`./schemas/${name}.schema.json`, import.meta.url), "utf8"),
    );
    // The DriverMessage schema refers to the Resource schema by this name.
    if (name === "resource") schema.$id = "resource.schema";
    ajv.addSchema(schema, name);
  }
  for (const name of schemaNames) {
    const validate = ajv.getSchema(name)!;
    out[name] = (x) => validate(x) ? undefined : ajv.errorsText(validate.errors);
  }
  return out;
}
