// Two drivers in one process, for the shutdown tests. Driver A (DRIVER_A,
// resource "a") handles signals, and its reconcile ignores ctx.signal and
// keeps the process alive. Driver B (DRIVER_B, resource "b") does not handle
// signals, takes JOB_MS per job, and stops itself after its first result.
// EXIT_PROCESS=0 sets A's exitProcess to false. Prints "ready <pid>",
// "a started", "b started", "b finished", "a closed", "b closed".
import process from "node:process";
import { startDriver } from "../mod.ts";

const jobMs = Number(process.env.JOB_MS ?? 2_000);
const a = await startDriver({
  name: process.env.DRIVER_A ?? "a",
  resources: ["a"],
  reconcile() {
    console.log("a started");
    // Never ends, whatever ctx.signal says; the timer keeps the process up.
    return new Promise(() => setInterval(() => {}, 1_000));
  },
}, {
  concurrency: 1,
  shutdownTimeout: 200,
  configureLogging: false,
  exitProcess: process.env.EXIT_PROCESS !== "0",
});
const b = await startDriver({
  name: process.env.DRIVER_B ?? "b",
  resources: ["b"],
  async reconcile() {
    console.log("b started");
    await new Promise((r) => setTimeout(r, jobMs));
    console.log("b finished");
    return { success: true, message: "b done" };
  },
}, { handleSignals: false, configureLogging: false });
console.log(`ready ${process.pid}`);
void a.closed.then(() => console.log("a closed"));
while (b.stats().succeeded === 0) await new Promise((r) => setTimeout(r, 20));
await b.stop();
console.log("b closed");
