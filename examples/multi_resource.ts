/**
 * Two resource types, each with its own typed spec and its own events, served
 * from one process. A driver has one spec schema, so each type gets its own
 * driver (and its own consumer); what they have in common is shared code.
 *
 * - `repository` resources, driver `repo-mirror`: spec
 *   `{ url, branch = "main" }`; handles `create` only (a mirror is set up
 *   once): its `update` and `delete` events are acknowledged and skipped.
 * - `deployment` resources, driver `deployer`: spec
 *   `{ image, replicas = 1, env = {} }`; handles `create` and `update` (a
 *   rollout for each change).
 *
 *     NATS_URL=nats://127.0.0.1:4222 deno run -A examples/multi_resource.ts
 *     NATS_URL=nats://127.0.0.1:4222 bun run examples/multi_resource.ts
 *     node scripts/build_npm.mjs && NATS_URL=nats://127.0.0.1:4222 node npm/examples/multi_resource.js
 *
 * SIGTERM or SIGINT stops both gracefully.
 *
 * @module
 */
import * as v from "valibot";
import {
  defineDriver,
  type DriverLogger,
  type DriverResult,
  type ReconcileContext,
  serve,
} from "../mod.ts";
import { isMain } from "./_main.ts";

/** The spec of a `repository`. */
export const RepositorySpec = v.object({
  url: v.pipe(v.string(), v.url()),
  branch: v.optional(v.pipe(v.string(), v.minLength(1)), "main"),
});

/** The spec of a `deployment`. */
export const DeploymentSpec = v.object({
  image: v.pipe(v.string(), v.minLength(1)),
  replicas: v.optional(v.pipe(v.number(), v.integer(), v.minValue(0)), 1),
  env: v.optional(v.record(v.string(), v.string()), {}),
});

/**
 * What both drivers share: the log labelled with the resource's type and
 * event, the work timed, and one shape of result. Generic in the spec, so
 * each driver's `work` sees its own type.
 */
async function step<Spec>(
  ctx: ReconcileContext<Spec>,
  work: (spec: Spec, log: DriverLogger) => string | Promise<string>,
): Promise<DriverResult> {
  const log = ctx.logger.with({ type: ctx.resource.resource, event: ctx.event });
  const started = Date.now();
  const done = await work(ctx.resource.spec, log);
  log.info(`${done} (${Date.now() - started} ms)`);
  return {
    success: true,
    message: done,
    data: { type: ctx.resource.resource, name: ctx.resource.name, event: ctx.event },
  };
}

export const repoMirror = defineDriver({
  name: "repo-mirror",
  resources: ["repository"],
  events: ["create"],
  spec: RepositorySpec,
  reconcile: (ctx) =>
    step(ctx, ({ url, branch }, log) => {
      // url: string, branch: string (defaulted): the schema's output type.
      log.info(`cloning ${url}`, { branch });
      return `mirrored ${url}@${branch}`;
    }),
});

export const deployer = defineDriver({
  name: "deployer",
  resources: ["deployment"],
  events: ["create", "update"],
  spec: DeploymentSpec,
  reconcile: (ctx) =>
    step(ctx, async ({ image, replicas, env }, log) => {
      const what = ctx.event === "create" ? "deployed" : "rolled out";
      for (let i = 1; i <= replicas; i++) {
        ctx.signal.throwIfAborted(); // a shutdown stops a rollout between replicas
        log.info(`replica ${i}/${replicas}: ${image}`, { vars: Object.keys(env).length });
        await new Promise((r) => setTimeout(r, 5));
      }
      return `${what} ${image} x${replicas}`;
    }),
});

/** Both drivers, to serve together. */
export const drivers = [repoMirror, deployer] as const;

// Each driver connects on its own; SIGTERM/SIGINT stops both gracefully, and
// the process exits once both have stopped.
if (isMain(import.meta)) await Promise.all(drivers.map((d) => serve(d)));
