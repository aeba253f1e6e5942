// PubAcks: publishes that wait for the server's acknowledgement, through one
// inbox, against a real nats-server.
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { AckPolicy, DiscardPolicy, jetstream, jetstreamManager } from "@nats-io/jetstream";
import { headers } from "@nats-io/transport-node";
import { PubAckError, PubAcks } from "./pubacks.ts";
import { conveyorEnv } from "./test_util.ts";

describe("PubAcks", () => {
  it("resolves when JetStream stores the message, once per Nats-Msg-Id", async () => {
    await using env = await conveyorEnv();
    const p = new PubAcks(env.nc);
    const h = headers();
    h.set("Conveyor-Log-Level", "info");
    await Promise.all([
      p.publish("logs.r1", "a", { msgID: "one", headers: h }),
      p.publish("logs.r1", "b", { msgID: "two" }),
      p.publish("logs.r1", "a again", { msgID: "one" }),
    ]);
    const jsm = await jetstreamManager(env.nc);
    const info = await jsm.streams.info("logs-engine");
    assert.equal(info.state.messages, 2, "the second 'one' was dropped as a duplicate");
    const first = await jsm.streams.getMessage("logs-engine", { seq: 1 });
    assert.equal(first!.header.get("Nats-Msg-Id"), "one");
    assert.equal(first!.header.get("Conveyor-Log-Level"), "info");
    assert.equal(p.size, 0);
    p.close();
  });

  it("rejects with no-responders when no stream takes the subject", async () => {
    await using env = await conveyorEnv();
    const p = new PubAcks(env.nc);
    await assert.rejects(
      p.publish("nowhere.at.all", "x"),
      (e) => e instanceof PubAckError && e.kind === "no-responders",
    );
    p.close();
  });

  it("rejects with the server's description on an API error", async () => {
    await using env = await conveyorEnv();
    const jsm = await jetstreamManager(env.nc);
    await jsm.streams.add({
      name: "tiny",
      subjects: ["tiny.>"],
      max_msgs: 1,
      discard: DiscardPolicy.New,
    });
    const p = new PubAcks(env.nc);
    await p.publish("tiny.a", "first");
    await assert.rejects(
      p.publish("tiny.a", "second"),
      (e) => e instanceof PubAckError && e.kind === "api" && /maximum messages/.test(e.message),
    );
    p.close();
  });

  it("rejects with a timeout when nothing answers, with one timer for all", async () => {
    await using env = await conveyorEnv();
    env.nc.subscribe("silent.>", { callback: () => {} });
    await env.nc.flush();
    const p = new PubAcks(env.nc, { timeout: 300 });
    const started = Date.now();
    const all = await Promise.allSettled(
      Array.from({ length: 50 }, (_, i) => p.publish(`silent.${i}`, "x")),
    );
    assert.ok(
      all.every((r) => r.status === "rejected" && (r.reason as PubAckError).kind === "timeout"),
    );
    assert.ok(Date.now() - started >= 300);
    assert.equal(p.size, 0);
    p.close();
  });

  it("confirms an ack sent to a delivery's reply subject", async () => {
    await using env = await conveyorEnv();
    const jsm = await jetstreamManager(env.nc);
    await jsm.consumers.add("logs-engine", { durable_name: "c", ack_policy: AckPolicy.Explicit });
    await jetstream(env.nc).publish("logs.x", "hello");
    const c = await jetstream(env.nc).consumers.get("logs-engine", "c");
    const m = await c.next();
    const p = new PubAcks(env.nc);
    await p.publish((m as unknown as { reply: string }).reply, "+ACK");
    const info = await jsm.consumers.info("logs-engine", "c");
    assert.equal(info.num_ack_pending, 0);
    p.close();
  });

  it("rejects what is pending on close", async () => {
    await using env = await conveyorEnv();
    env.nc.subscribe("silent.>", { callback: () => {} });
    await env.nc.flush();
    const p = new PubAcks(env.nc);
    const pending = p.publish("silent.x", "x");
    p.close();
    await assert.rejects(pending, PubAckError);
  });
});
