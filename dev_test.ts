// conveyor-dev: a local NATS with the Conveyor streams that a driver in
// development runs against; commands in, results and log lines out.
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { startDriver } from "./mod.ts";
import { startDev } from "./dev.ts";
import { freePort, waitFor } from "./test_util.ts";

describe("conveyor-dev", () => {
  it("serves the streams on the port asked for, emits on command and prints results and logs", async () => {
    const port = await freePort();
    const lines: string[] = [];
    await using dev = await startDev({ port, write: (l) => lines.push(l) });
    assert.equal(dev.url, `nats://127.0.0.1:${port}`);
    await using _d = await startDriver({
      name: "builder",
      resources: ["app"],
      reconcile({ resource, logger, event }) {
        logger.info(`building ${JSON.stringify(resource.spec)} on ${event}`);
        return { success: event !== "process", message: `done with ${resource.name}` };
      },
    }, { servers: dev.url, handleSignals: false, configureLogging: false });

    const emitted = await dev.command('emit app web {"image":"node:22"}');
    const run = /run (\S+) on resources\.app$/.exec(emitted)?.[1];
    assert.ok(run, emitted);
    await waitFor(
      () => lines.some((l) => l.startsWith(`result run ${run} builder ok: done with web`)),
      "the result line",
    );
    assert.ok(lines.includes(`log    run ${run} builder: building {"image":"node:22"} on create`));

    const step = await dev.command("emit app api event=process driver=builder");
    assert.match(step, /^emitted process app\/api run \S+ on drivers\.builder\.resources\.app$/);
    await waitFor(() => lines.some((l) => /builder FAILED: done with api/.test(l)), "the failure");

    assert.match(await dev.command("emit app x {not json"), /^error: the spec is not JSON/);
    assert.match(await dev.command("frobnicate"), /^unknown command: frobnicate\ncommands:/);
    assert.match(await dev.command("help"), /emit <type> <name>/);
  });
});
