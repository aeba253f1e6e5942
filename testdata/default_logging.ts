// A driver that configures no logging, for the test of the runtime's default
// LogTape sink. It prints only "ready <pid>" and "closed" on stdout itself.
import process from "node:process";
import { startDriver } from "../mod.ts";

const running = await startDriver({
  name: "plain",
  resources: ["pipeline"],
  reconcile({ resource, logger }) {
    logger.info(`hello ${resource.name}`);
  },
});
console.log(`ready ${process.pid}`);
await running.closed;
console.log("closed");
