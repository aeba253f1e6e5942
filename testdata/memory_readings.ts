// The memory readings of a long-running driver process, shared by the soak
// test's driver (testdata/soak_driver.ts) and the benchmark's
// (bench/driver_program.ts): at every count of results in CHECKPOINTS it
// prints "rss <results> <rss bytes> <heap bytes>", the least of five readings
// each after a garbage collection (one reading can catch the allocator
// mid-way), taken while no event is in work; and "closed" once the driver has
// shut down. It never calls process.exit: if a timer or socket were left
// after shutdown, the process would not end by itself, and the caller notices.
import process from "node:process";
import type { RunningDriver } from "../mod.ts";

/** A full garbage collection, where the runtime offers one (`--expose-gc`, Bun). */
function collect(): void {
  const g = globalThis as { gc?: () => void; Bun?: { gc(force: boolean): void } };
  if (g.Bun) g.Bun.gc(true);
  else g.gc?.();
}

/** Prints `ready`, the readings at each checkpoint, and `closed`; resolves once closed. */
export async function reportMemory(running: RunningDriver, checkpointsEnv = ""): Promise<void> {
  const checkpoints = checkpointsEnv.split(",").map(Number).filter((n) => n > 0);
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
}
