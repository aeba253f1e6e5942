// A 3-node JetStream cluster with the Conveyor streams replicated 3 times:
// the node the driver is on and then the stream leader are killed with -9
// mid-run. The default suite runs 600 events; `deno task test:faults`
// (CONVEYOR_FAULTS=long) 3,000.
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import process from "node:process";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { AckPolicy, jetstream, jetstreamManager } from "@nats-io/jetstream";
import { startDriver } from "./mod.ts";
import { publishMany, sleep, waitFor } from "./test_util.ts";
import {
  clientNode,
  createConveyorStreamsClustered,
  type NatsCluster,
  startNatsCluster,
  streamLeader,
  waitForStreamsCurrent,
} from "./test_cluster.ts";

const long = process.env.CONVEYOR_FAULTS === "long";

/**
 * Stands in for a server engine: a durable consumer on `stream` that takes
 * and acknowledges everything (so the work queue deletes it, as the real
 * pipeline engine and log store do), recording each message.
 */
function engine(
  nc: NatsConnection,
  stream: string,
  record: (m: { seq: number; id: string; json: unknown }) => void,
) {
  let stopped = false;
  const done = (async () => {
    const jsm = await jetstreamManager(nc);
    await jsm.consumers.add(stream, { durable_name: "engine", ack_policy: AckPolicy.Explicit });
    const consumer = await jetstream(nc).consumers.get(stream, "engine");
    while (!stopped) {
      try {
        // A short expiry: after a failover the pull resumes within seconds.
        const iter = await consumer.fetch({ max_messages: 256, expires: 2_000 });
        for await (const m of iter) {
          record({ seq: m.seq, id: m.headers?.get("Nats-Msg-Id") ?? "", json: m.json() });
          m.ack();
        }
      } catch {
        await sleep(200);
      }
    }
  })();
  return { stop: () => ((stopped = true), done.catch(() => {})) };
}

async function killAndRestart(cluster: NatsCluster, name: string, downMs: number) {
  await cluster.node(name).kill();
  await sleep(downMs);
  await cluster.node(name).restart();
}

describe("a JetStream cluster loses nodes", () => {
  it(`kill -9 of the driver's node, then of the stream leader, mid-run: ${long ? "3,000" : "600"} events, none lost, none reconciled twice`, async () => {
    await using cluster = await startNatsCluster();
    const url = cluster.urls.join(",");
    await createConveyorStreamsClustered(url);
    const nc = await connect({
      servers: cluster.urls,
      maxReconnectAttempts: -1,
      reconnectTimeWait: 250,
    });
    try {
      // About 15 s of work, so that both kills land mid-run.
      const total = long ? 3_000 : 600;
      const [workMs, concurrency] = long ? [80, 16] : [100, 4];
      const reconciled = new Map<string, number>();
      const starts: number[] = [];
      const results = new Map<string, { seqs: Set<number>; ids: Set<string>; success: boolean }>();
      const pipelineEngine = engine(nc, "pipeline-engine", ({ seq, id, json }) => {
        const e = json as { run_id: string; driverresult: { success: boolean } };
        const r = results.get(e.run_id) ?? { seqs: new Set(), ids: new Set(), success: true };
        r.seqs.add(seq);
        r.ids.add(id);
        r.success &&= e.driverresult.success;
        results.set(e.run_id, r);
      });
      const logStore = engine(nc, "logs-engine", () => {});
      await using _driver = await startDriver({
        name: "clustered",
        resources: ["pipeline"],
        async reconcile({ runId, logger }) {
          reconciled.set(runId, (reconciled.get(runId) ?? 0) + 1);
          starts.push(Date.now());
          logger.info("step 1");
          await sleep(workMs);
          logger.info("step 2");
          return { success: true, message: "ok" };
        },
      }, {
        servers: cluster.urls,
        concurrency,
        handleSignals: false,
        configureLogging: false,
      });
      const runIds = await publishMany(nc, total, "c");

      await waitFor(() => results.size >= total / 10, "the first tenth of the results", 60_000);
      const driverNode = await waitFor(
        () => clientNode(cluster, "conveyor-driver:clustered"),
        "the driver's node",
      );
      const killedAt = Date.now();
      await killAndRestart(cluster, driverNode, 3_000);
      await sleep(1_000);
      const leader = await streamLeader(url, "pipeline-engine");
      const before = results.size;
      const reconciledBefore = reconciled.size;
      await killAndRestart(cluster, leader, 3_000);
      const restarted = Date.now();

      await waitFor(() => results.size >= total, `${total} results`, 180_000);
      const recovery = (Date.now() - restarted) / 1000;
      await waitForStreamsCurrent(url, ["messages", "pipeline-engine"]);
      await sleep(1_000);
      await pipelineEngine.stop();
      await logStore.stop();

      const missing = runIds.filter((id) => !results.has(id));
      const rerun = [...reconciled].filter(([, n]) => n > 1);
      const twoIds = [...results].filter(([, r]) => r.ids.size > 1);
      const copies = [...results].filter(([, r]) => r.seqs.size > 1);
      const took = recovery.toFixed(1);
      // How long the driver did no work after losing its node.
      const resumed = starts.find((t) => t > killedAt + 50);
      const pause = resumed ? ((resumed - killedAt) / 1000).toFixed(1) : "-";
      console.log(
        `cluster: ${total} events; killed ${driverNode} (the driver's node; its next reconcile ` +
          `${pause} s later), then ${leader} ` +
          `(pipeline-engine leader) at ${before} results (${reconciledBefore} reconciled); ` +
          `all results ${took} s after the ` +
          `last restart; ${copies.length} event(s) with a second stored copy of one result id`,
      );
      assert.ok(before < total, `the second kill came mid-run (${before} of ${total} results)`);
      assert.deepEqual(missing, [], "every event has a result");
      assert.deepEqual(rerun, [], "no event was reconciled twice");
      assert.deepEqual(twoIds, [], "every event's results carry one Nats-Msg-Id");
      assert.ok([...results.values()].every((r) => r.success), "no event ran out of attempts");
    } finally {
      await nc.close();
    }
  });
});
