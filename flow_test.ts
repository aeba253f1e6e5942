// Flow control without NATS: how many events a runtime pulls, when they may
// start, and that every count stays within its bound whatever the order of
// what happens.
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { Flow, MIN_PREFETCH_CAP, MIN_SETTLING, PREFETCH_MS } from "./flow.ts";

/** Pulls what the flow wants and starts what it may; returns how many started. */
function fill(f: Flow): number {
  for (let n = f.wanted(); n > 0; n--) f.pulled();
  let started = 0;
  while (f.canStart()) {
    f.started();
    started++;
  }
  return started;
}

describe("flow", () => {
  it("pulls no more than the free slots until reconciles have been seen to be short", () => {
    const f = new Flow(4);
    assert.equal(f.prefetch, 0);
    assert.equal(f.wanted(), 4);
    assert.equal(fill(f), 4);
    assert.equal(f.wanted(), 0, "every slot busy, nothing queued");
  });

  it("queues what the slots get through in about 100 ms, at most max(concurrency, 16)", () => {
    const f = new Flow(4);
    fill(f);
    f.reconciled(1);
    f.returned();
    assert.equal(f.prefetch, MIN_PREFETCH_CAP);
    // One slot free and the window 4 + 16: pulls 17 (one to run, sixteen to queue).
    assert.equal(f.wanted(), 17);
    fill(f);
    assert.equal(f.queued, 16);
    assert.equal(f.running, 4);
    // Long reconciles pull the average above the limit: the queue is not refilled.
    for (let i = 0; i < 30; i++) {
      f.reconciled(PREFETCH_MS * 100);
      f.returned();
      f.settled(true);
      fill(f);
    }
    assert.equal(f.prefetch, 0);
    assert.equal(f.queued, 0);
    assert.equal(f.running, 4);
    assert.equal(f.wanted(), 0);
  });

  it("sizes the queue by the pace of recent reconciles", () => {
    const at = (concurrency: number, averageMs: number) => {
      const f = new Flow(concurrency);
      f.averageMs = averageMs;
      return f.prefetch;
    };
    assert.equal(at(1, 5), 16, "capped");
    assert.equal(at(1, 50), 2);
    assert.equal(at(1, 150), 0);
    assert.equal(at(16, 1_000), 1);
    assert.equal(at(64, 0.1), 64, "capped at concurrency when it is above 16");
    assert.equal(at(16, 120_000), 0, "jobs of minutes: none ahead");
    assert.equal(at(16, Number.NaN), 0, "none before a reconcile has finished");
  });

  it("refills a non-empty queue in batches of a quarter of the window", () => {
    const f = new Flow(16);
    f.averageMs = 1;
    assert.equal(f.wanted(), 32);
    fill(f);
    assert.deepEqual([f.queued, f.running], [16, 16]);
    const wanted: number[] = [];
    for (let k = 1; k <= 8; k++) {
      // One reconcile ends and a queued event takes its slot: the queue shrinks by one.
      f.reconciled(1);
      f.returned();
      f.settled(true);
      while (f.canStart()) f.started();
      wanted.push(f.wanted());
    }
    assert.deepEqual(wanted, [0, 0, 0, 0, 0, 0, 0, 8], "no pull for less than a quarter of 32");
  });

  it("stops starting reconciles while too many events are settling", () => {
    const f = new Flow(1);
    assert.equal(f.maxSettling, MIN_SETTLING);
    assert.equal(new Flow(64).maxSettling, 128);
    f.averageMs = 1;
    for (let i = 0; i < MIN_SETTLING; i++) {
      fill(f);
      f.reconciled(1);
      f.returned();
    }
    assert.equal(f.settling, MIN_SETTLING);
    fill(f);
    assert.equal(f.running, 0, "no slot taken while settling is full");
    assert.ok(f.queued > 0);
    assert.equal(f.canStart(), false);
    f.settled(true);
    assert.equal(f.canStart(), true);
  });

  it("keeps a hung reconcile's slot: it is freed by returned(), not by settling", () => {
    const f = new Flow(2);
    fill(f);
    f.reconciled(PREFETCH_MS * 10);
    f.settled(true);
    assert.equal(f.running, 2, "settled but the code has not returned");
    assert.equal(f.wanted(), 0);
    f.returned();
    assert.equal(f.wanted(), 1);
  });

  it("keeps every count within its bound under any order of events (randomised)", () => {
    let seed = 42;
    const rand = (n: number) => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return seed % n;
    };
    for (const c of [1, 3, 16]) {
      const f = new Flow(c);
      const running: ("run" | "returned")[] = []; // reconciled, code returned or not
      let plain = 0; // started, not reconciled (skips, hand-backs)
      let settling = 0;
      for (let step = 0; step < 5_000; step++) {
        switch (rand(6)) {
          case 0:
            fill(f);
            break;
          case 1:
            if (f.running - running.length - plain > 0) plain++;
            break;
          case 2: {
            // A started event's reconcile ends.
            const unreconciled = f.running - running.length - plain;
            if (unreconciled > 0) {
              f.reconciled(rand(2) ? 1 : 500);
              running.push("run");
              settling++;
            }
            break;
          }
          case 3: {
            const i = running.indexOf("run");
            if (i >= 0) {
              running.splice(i, 1);
              f.returned();
            }
            break;
          }
          case 4:
            if (settling > 0) {
              settling--;
              f.settled(true);
            }
            break;
          case 5:
            if (plain > 0) {
              plain--;
              f.settled(false);
            }
            break;
        }
        assert.ok(f.running <= c, `running ${f.running} <= ${c}`);
        assert.ok(f.queued <= 2 * c, `queued ${f.queued} <= ${2 * c}`);
        assert.ok(f.settling <= f.maxSettling + c, `settling ${f.settling}`);
        assert.ok(f.queued >= 0 && f.running >= 0 && f.settling >= 0);
      }
    }
  });

  it("wakes a waiter on every change", async () => {
    const f = new Flow(1);
    const woke = f.changed();
    f.pulled();
    await woke;
    const again = f.changed();
    f.wake();
    await again;
  });
});
