// Faults over time: a soak through one instance, and an instance of three
// killed with SIGKILL mid-job. The default suite runs a short version of
// each; `deno task test:faults` (env CONVEYOR_FAULTS=long) the long one.
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import process from "node:process";
import { readStream } from "./testing.ts";
import {
  consumerState,
  conveyorEnv,
  type Env,
  publishMany,
  sleep,
  spawnProgram,
  waitFor,
} from "./test_util.ts";

const long = process.env.CONVEYOR_FAULTS === "long";

async function resultCount(env: Env): Promise<number> {
  const { jetstreamManager } = await import("@nats-io/jetstream");
  return (await (await jetstreamManager(env.nc)).streams.info("pipeline-engine")).state.messages;
}

describe("faults over time", () => {
  it(`soak: ${long ? "100,000" : "10,000"} events through one instance, memory flat, no handle left`, async () => {
    await using env = await conveyorEnv();
    // Long: the issue's figure, 10,000 against 100,000. Short: 5,000 against
    // 10,000 (resident memory still settles during the first few thousand).
    const total = long ? 100_000 : 10_000;
    const first = long ? 10_000 : 5_000;
    await using driver = spawnProgram("soak_driver", {
      NATS_URL: env.url,
      DRIVER_NAME: "soak",
      CHECKPOINTS: [first, total].join(","),
    }, { gc: true });
    await driver.ready();
    // Both readings at rest: the first batch is done before the rest is sent.
    await publishMany(env.nc, first, "soak");
    await waitFor(() => driver.out.includes(`rss ${first} `), "the first memory reading");
    await publishMany(env.nc, total - first, "soak2");
    await waitFor(async () => (await resultCount(env)) >= total, `${total} results`, total * 5);
    await waitFor(() => driver.out.includes(`rss ${total} `), "the last memory reading");
    const [early, late] = [...driver.out.matchAll(/^rss (\d+) (\d+) (\d+)$/gm)]
      .map((m) => ({ at: Number(m[1]), rss: Number(m[2]), heap: Number(m[3]) }));
    const mb = (b: number) => (b / 1024 / 1024).toFixed(1);
    console.log(
      `soak: rss ${mb(early.rss)} MiB after ${early.at}, ${mb(late.rss)} MiB after ${late.at}` +
        ` (heap ${mb(early.heap)} -> ${mb(late.heap)} MiB)`,
    );
    // The issue's figure holds for the long run; in the short one Deno's
    // resident memory is still settling, so only a gross leak is caught by
    // it, and the heap (after collection) is the precise measure.
    const rssBound = long ? 1.1 : 1.5;
    // Bun's allocator now and then grows resident memory by a step of about
    // 10 MiB and keeps it, whatever runs: a hand-written nats.js loop doing
    // the same work per event shows the same steps (56.5 -> 66.6 MiB in one
    // of three runs; the runtime 69.4 -> 82.2 in one of three). There the
    // heap is the leak measure, and resident memory gets one step of slack.
    // Deno's resident memory grows too, with the heap flat: on this project's
    // machine the same hand-written loop (bench's consume-sem-pipe, a process
    // of its own, concurrency 64) went 151-154 -> 184-192 MiB from 10,000 to
    // 100,000 events in 3 of 3 runs (+21-25%), the runtime 170-177 -> 189-195
    // MiB (+7-15%). There too the heap is the leak measure.
    const slack = "Bun" in globalThis
      ? 16 * 1024 * 1024
      : "Deno" in globalThis && long
      ? 32 * 1024 * 1024
      : 0;
    assert.ok(
      late.rss <= early.rss * rssBound + slack,
      `resident memory grew more than ${Math.round((rssBound - 1) * 100)}%` +
        `${slack ? ` + ${slack / 1024 / 1024} MiB` : ""}: ${mb(early.rss)} -> ${mb(late.rss)} MiB`,
    );
    assert.ok(
      late.heap <= early.heap * 1.1 + 1024 * 1024,
      `heap grew: ${mb(early.heap)} -> ${mb(late.heap)} MiB`,
    );
    const s = await consumerState(env.nc, "soak");
    assert.equal(s.pending + s.ackPending, 0);
    // After shutdown nothing may keep the process alive: it ends by itself.
    driver.kill("SIGTERM");
    const code = await Promise.race([driver.exited, sleep(15_000).then(() => "still running")]);
    assert.equal(code, 0, `after SIGTERM (stdout tail: ${driver.out.slice(-300)})`);
    assert.match(driver.out, /closed/);
  });

  it("one of three instances killed with SIGKILL mid-job: its events reach the others, one result each", async () => {
    await using env = await conveyorEnv();
    const n = long ? 600 : 60;
    const vars = {
      NATS_URL: env.url,
      DRIVER_NAME: "trio",
      JOB_MS: "300",
      CONCURRENCY: "4",
      CONVEYOR_ACK_WAIT: "2s",
    };
    const trio = [0, 1, 2].map(() => spawnProgram("slow_driver", vars));
    await using _trio = {
      async [Symbol.asyncDispose]() {
        await Promise.all(trio.map((p) => p[Symbol.asyncDispose]()));
      },
    };
    await Promise.all(trio.map((p) => p.ready()));
    const runIds = new Set(await publishMany(env.nc, n, "trio"));
    const victim = trio[0];
    await waitFor(() => (victim.out.match(/started/g) ?? []).length >= 3, "the victim at work");
    const startedBefore = (victim.out.match(/started/g) ?? []).length;
    const finishedBefore = (victim.out.match(/finished/g) ?? []).length;
    victim.kill("SIGKILL");
    await victim.exited;
    assert.ok(startedBefore > finishedBefore, "it died with jobs in flight");

    await waitFor(async () => (await resultCount(env)) >= n, `${n} results`, 120_000);
    await waitFor(
      async () => {
        const s = await consumerState(env.nc, "trio");
        return s.pending === 0 && s.ackPending === 0;
      },
      "consumer drained",
      30_000,
    );
    await sleep(500);
    const results = await readStream(env.nc, "pipeline-engine");
    const perRun = new Map<string, number>();
    for (const r of results) {
      const id = (r.json as { run_id: string }).run_id;
      perRun.set(id, (perRun.get(id) ?? 0) + 1);
    }
    assert.equal(results.length, n, "one result per event");
    assert.deepEqual(new Set(perRun.keys()), runIds);
    // What the victim started and never finished, another instance finished.
    const names = (p: { out: string }, what: string) =>
      new Set([...p.out.matchAll(new RegExp(`^${what} (\\S+)$`, "gm"))].map((m) => m[1]));
    const victimFinished = names(victim, "finished");
    const orphans = [...names(victim, "started")].filter((x) => !victimFinished.has(x));
    assert.ok(orphans.length > 0);
    const othersFinished = new Set(trio.slice(1).flatMap((p) => [...names(p, "finished")]));
    assert.deepEqual(orphans.filter((x) => !othersFinished.has(x)), [], "orphans taken over");
    for (const p of trio.slice(1)) p.kill("SIGTERM");
    assert.deepEqual(await Promise.all(trio.slice(1).map((p) => p.exited)), [0, 0]);
  });
});
