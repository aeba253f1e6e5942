// A driver for the soak test: logs one line per event and succeeds. At every
// CHECKPOINTS count of results it prints "rss <results> <bytes> <heap bytes>":
// the least of five readings, each after a garbage collection (one reading
// can catch the allocator mid-way); "closed" when it has shut down. It never calls
// process.exit: if a timer or socket were left after shutdown, the process
// would not end by itself, and the test notices.
import process from "node:process";
import { startDriver } from "../mod.ts";

const checkpoints = (process.env.CHECKPOINTS ?? "").split(",").map(Number).filter(Boolean);

function collect(): void {
  const g = globalThis as { gc?: () => void; Bun?: { gc(force: boolean): void } };
  if (g.Bun) g.Bun.gc(true);
  else g.gc?.();
}

const running = await startDriver({
  name: process.env.DRIVER_NAME ?? "soak",
  resources: ["pipeline"],
  reconcile({ resource, logger }) {
    logger.info(`working on ${resource.name}`);
    return { success: true, message: "ok" };
  },
}, { concurrency: Number(process.env.CONCURRENCY ?? 64), configureLogging: false });
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
