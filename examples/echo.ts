/**
 * An example driver: greets each resource, simulates some work and reports
 * the result. Run it against a NATS server that the Conveyor server uses:
 *
 *     NATS_URL=nats://127.0.0.1:4222 deno run -A examples/echo.ts
 *     NATS_URL=nats://127.0.0.1:4222 bun run examples/echo.ts
 *
 * `spec.work_ms` sets how long the work takes; `spec.fail: true` makes it
 * report a failure.
 *
 * @module
 */
import { type Driver, serve } from "../mod.ts";

export const echo: Driver = {
  name: "echo",
  resources: ["pipeline"],
  async reconcile({ resource, event, attempt, logger, signal }) {
    const spec = (resource.spec ?? {}) as { work_ms?: number; fail?: boolean };
    logger.info(`hello ${resource.name} (${event}, attempt ${attempt})`);
    if (spec.work_ms) {
      await new Promise<void>((resolve, reject) => {
        const t = setTimeout(resolve, spec.work_ms);
        signal.addEventListener("abort", () => {
          clearTimeout(t);
          reject(signal.reason);
        }, { once: true });
      });
    }
    if (spec.fail) {
      logger.error(`${resource.name}: the spec asked for a failure`);
      return { success: false, message: "failed on request" };
    }
    logger.info(`done with ${resource.name}`);
    return { success: true, message: "ok", data: { name: resource.name } };
  },
};

if (import.meta.main) await serve(echo);
