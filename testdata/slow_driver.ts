// A driver process for the shutdown tests: each job takes JOB_MS. It prints
// "ready", "started <name>", "finished <name>" and "closed" on stdout.
import process from "node:process";
import { startDriver } from "../mod.ts";

const ms = Number(process.env.JOB_MS ?? 1_500);
const running = await startDriver({
  name: process.env.DRIVER_NAME ?? "slow",
  resources: ["pipeline"],
  async reconcile({ resource, logger }) {
    console.log(`started ${resource.name}`);
    logger.info(`working on ${resource.name}`);
    await new Promise((r) => setTimeout(r, ms));
    logger.info(`finished ${resource.name}`);
    console.log(`finished ${resource.name}`);
    return { success: true, message: `built ${resource.name}` };
  },
}, { concurrency: Number(process.env.CONCURRENCY ?? 1), configureLogging: false });
console.log(`ready ${process.pid}`);
await running.closed;
console.log("closed");
