/**
 * A driver process for the memory and cold-start figures (the idea of
 * testdata/soak_driver.ts): `startDriver` with the no-op bench driver,
 * configured by environment variables ({@link ProgramEnv}).
 *
 * It prints `ready <pid>` once consuming; at every checkpoint count of
 * results, `rss <results> <rss bytes> <heap bytes>`: the least of five
 * readings, each after a garbage collection (one reading can catch the
 * allocator mid-way), taken while no event is in work; and `closed` after
 * its shutdown (on SIGTERM). It never calls process.exit.
 *
 *   deno run -A --v8-flags=--expose-gc bench/driver_program.ts
 *   bun run bench/driver_program.ts
 *   node --expose-gc npm/bench/driver_program.js
 *
 * @module
 */
import process from "node:process";
import { startDriver } from "../mod.ts";
import { benchDriver, NOOP } from "./drivers.ts";

/** The environment the program reads (all strings, as environment variables are). */
export interface ProgramEnv {
  /** The NATS server, read by the runtime itself. */
  NATS_URL: string;
  /** The driver's (and consumer's) name. */
  DRIVER_NAME: string;
  /** Reconciles in flight. @default "64" */
  CONCURRENCY?: string;
  /** Comma-separated result counts at which to print a memory reading. */
  CHECKPOINTS?: string;
}

const env = process.env as Partial<ProgramEnv>;
const checkpoints = (env.CHECKPOINTS ?? "").split(",").map(Number).filter((n) => n > 0);

function collect(): void {
  const g = globalThis as { gc?: () => void; Bun?: { gc(force: boolean): void } };
  if (g.Bun) g.Bun.gc(true);
  else g.gc?.();
}

const running = await startDriver(benchDriver(env.DRIVER_NAME ?? "bench-program", NOOP), {
  concurrency: Number(env.CONCURRENCY ?? 64),
  configureLogging: false,
});
console.log(`ready ${process.pid}`);
let reading = false;
const timer = setInterval(async () => {
  if (reading || !checkpoints.length || running.stats().succeeded < checkpoints[0]) return;
  reading = true;
  let rss = Infinity;
  let heap = Infinity;
  for (let i = 0; i < 5; i++) {
    collect();
    const m = process.memoryUsage();
    rss = Math.min(rss, m.rss);
    heap = Math.min(heap, m.heapUsed);
    await new Promise((r) => setTimeout(r, 20));
  }
  console.log(`rss ${checkpoints.shift()} ${rss} ${heap}`);
  reading = false;
}, 50);
await running.closed;
clearInterval(timer);
console.log("closed");
