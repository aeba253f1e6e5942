/**
 * The demo behind `npm run demo` / `deno task demo`: a real driver process
 * against a local nats-server set up as the Conveyor server sets it up.
 *
 * 1. starts a nats-server (127.0.0.1, random port, temporary store) and
 *    creates the streams `messages`, `pipeline-engine` and `logs-engine`;
 * 2. starts the example driver `examples/echo.ts` as its own process;
 * 3. publishes events exactly as the server's `POST /resources` does (and one
 *    as the pipeline engine addresses a step to a driver);
 * 4. prints log lines (`live.logs.>`) and results (`pipelines.driver.result`)
 *    as they arrive;
 * 5. sends the driver SIGTERM, waits for its clean exit and stops NATS.
 *
 * Options: `--events N` publishes N more events and reports events/s;
 * `--quiet` prints only the summary lines.
 *
 * @module
 */
import { spawn } from "node:child_process";
import process from "node:process";
import { parseArgs } from "node:util";
import { connect } from "@nats-io/transport-node";
import { createConveyorStreams, publishEvent, startNatsServer } from "../testing.ts";

const { values } = parseArgs({
  args: process.argv.slice(2),
  options: {
    events: { type: "string", default: "0" },
    quiet: { type: "boolean", default: false },
    concurrency: { type: "string", default: "16" },
  },
});
const extra = Number(values.events);
const quiet = values.quiet;
const say = (line: string) => console.log(line);
const dim = (s: string) => (process.stdout.isTTY ? `\x1b[2m${s}\x1b[0m` : s);

await using nats = await startNatsServer();
await createConveyorStreams(nats.url);
say(
  `nats-server ${nats.url} (pid ${nats.pid}) with streams messages, pipeline-engine, logs-engine`,
);

const nc = await connect({ servers: nats.url });
let results = 0;
let failures = 0;
nc.subscribe("live.logs.>", {
  callback: (_err, m) => {
    if (quiet) return;
    const e = m.json<{ runid: string; message: string; timestamp: string }>();
    say(dim(`  log  ${e.runid.slice(0, 8)} ${e.message}`));
  },
});
let allDone: () => void = () => {};
let expected = Infinity;
nc.subscribe("pipelines.driver.result", {
  callback: (_err, m) => {
    const r = m.json<
      {
        run_id: string;
        resource: { name: string };
        driverresult: { success: boolean; message: string; driver: string };
      }
    >();
    results++;
    if (!r.driverresult.success) failures++;
    if (!quiet) {
      const mark = r.driverresult.success ? "ok  " : "FAIL";
      say(
        `  ${mark} ${
          r.run_id.slice(0, 8)
        } ${r.resource.name} <- ${r.driverresult.driver}: ${r.driverresult.message}`,
      );
    }
    if (results >= expected) allDone();
  },
});

// The example driver, as its own process on the same runtime as this demo.
const driverFile = new URL("./echo.ts", import.meta.url).pathname;
const isDeno = "Deno" in globalThis;
const driver = spawn(process.execPath, isDeno ? ["run", "-A", driverFile] : ["run", driverFile], {
  env: {
    ...process.env,
    NATS_URL: nats.url,
    CONVEYOR_CONCURRENCY: values.concurrency,
    CONVEYOR_LOG_LEVEL: quiet ? "warning" : "info",
  },
  stdio: ["ignore", quiet ? "ignore" : "inherit", "inherit"],
});
const exited = new Promise<number | null>((r) => driver.on("exit", (code) => r(code)));
say(`driver examples/echo.ts started (pid ${driver.pid})`);

// Events go to an Interest stream: wait until the driver's consumer exists.
const { jetstreamManager } = await import("@nats-io/jetstream");
const jsm = await jetstreamManager(nc);
for (let i = 0;; i++) {
  try {
    await jsm.consumers.info("messages", "echo");
    break;
  } catch {
    if (i > 300) throw new Error("the driver did not start within 30 s");
    await new Promise((r) => setTimeout(r, 100));
  }
}

const done = new Promise<void>((r) => (allDone = r));
say("publishing events as POST /resources does:");
const demoEvents = [
  { resource: "pipeline", name: "web", spec: { work_ms: 300 } },
  { resource: "pipeline", name: "api", spec: { work_ms: 100 } },
  { resource: "pipeline", name: "broken", spec: { fail: true } },
  // As the pipeline engine sends a step to one driver.
  { resource: "pipeline", name: "docs", driver: "echo", event: "process", pipeline: "ci" },
];
for (const e of demoEvents) {
  const p = await publishEvent(nc, e);
  if (!quiet) say(`  sent ${p.message.run_id.slice(0, 8)} ${e.name} on ${p.subject}`);
}
let started = performance.now();
if (extra > 0) {
  started = performance.now();
  say(`publishing ${extra} more events...`);
  const pubs = [];
  for (let i = 0; i < extra; i++) {
    pubs.push(publishEvent(nc, { resource: "pipeline", name: `load-${i}` }));
    if (pubs.length >= 256) await Promise.all(pubs.splice(0));
  }
  await Promise.all(pubs);
}
expected = demoEvents.length + extra;
if (results >= expected) allDone();
await done;
const seconds = (performance.now() - started) / 1000;

say(`${results} results (${failures} failed on request), sending SIGTERM to the driver`);
// process.kill: Deno's ChildProcess.kill makes any exit look like a signal.
process.kill(driver.pid!, "SIGTERM");
const code = await exited;
say(`driver exited with ${code === null ? "a signal" : `code ${code}`}`);
if (extra > 0) {
  say(
    `throughput: ${extra} events in ${seconds.toFixed(2)} s = ${
      (extra / seconds).toFixed(0)
    } events/s ` +
      `(concurrency ${values.concurrency}, publish and reconcile overlapping)`,
  );
}
await nc.drain();
