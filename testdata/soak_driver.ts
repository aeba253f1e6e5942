// A driver for the soak test: logs one line per event and succeeds, and
// reports its memory at the CHECKPOINTS counts of results
// (testdata/memory_readings.ts).
import process from "node:process";
import { startDriver } from "../mod.ts";
import { reportMemory } from "./memory_readings.ts";

const running = await startDriver({
  name: process.env.DRIVER_NAME ?? "soak",
  resources: ["pipeline"],
  reconcile({ resource, logger }) {
    logger.info(`working on ${resource.name}`);
    return { success: true, message: "ok" };
  },
}, { concurrency: Number(process.env.CONCURRENCY ?? 64), configureLogging: false });
await reportMemory(running, process.env.CHECKPOINTS);
