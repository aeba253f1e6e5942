// A driver in plain JavaScript for Node.js 20+, using the npm package: no
// TypeScript, no build step. It greets each `greeting` resource.
//
// In your project:
//
//     npm install @conveyor/driver
//     NATS_URL=nats://127.0.0.1:4222 node driver.mjs
//
// From this repository, build the package into npm/ and make it resolvable
// as `@conveyor/driver`, as examples/node_test.ts does:
//
//     node scripts/build_npm.mjs
//     mkdir -p /tmp/greeter/node_modules/@conveyor
//     ln -s "$PWD/npm" /tmp/greeter/node_modules/@conveyor/driver
//     cp examples/node/driver.mjs /tmp/greeter/
//     NATS_URL=nats://127.0.0.1:4222 node /tmp/greeter/driver.mjs
//
// A resource it handles: { "name": "hi", "resource": "greeting",
// "spec": { "who": "world", "shout": true } }. SIGTERM or SIGINT stops it
// gracefully (in-flight events finish or go back to the stream).
import process from "node:process";
import { defineDriver, PermanentError, serve } from "@conveyor/driver";

/** @type {import("@conveyor/driver").Driver<{ who?: unknown, shout?: unknown }>} */
const greeter = defineDriver({
  name: "node-greeter",
  resources: ["greeting"],
  reconcile({ resource, logger, attempt }) {
    const { who, shout } = resource.spec ?? {};
    if (typeof who !== "string" || who === "") {
      // No retry can fix the spec: report the failure at once.
      throw new PermanentError("spec.who must be a non-empty string");
    }
    logger.info(`greeting ${who} (attempt ${attempt})`);
    const text = `hello ${who}`;
    return {
      success: true,
      message: shout === true ? text.toUpperCase() : text,
      data: { node: process.version },
    };
  },
});

// NATS_URL and the other CONVEYOR_* variables configure it; serve() resolves
// after a graceful shutdown.
await serve(greeter);
