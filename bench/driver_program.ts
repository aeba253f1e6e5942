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
import { reportMemory } from "../testdata/memory_readings.ts";
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
const running = await startDriver(benchDriver(env.DRIVER_NAME ?? "bench-program", NOOP), {
  concurrency: Number(env.CONCURRENCY ?? 64),
  configureLogging: false,
});
await reportMemory(running, env.CHECKPOINTS);
