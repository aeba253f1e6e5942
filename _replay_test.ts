import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { ReplayFilter } from "./_replay.ts";

describe("ReplayFilter", () => {
  it("holds at most its window of keys, however many events pass", () => {
    const filter = new ReplayFilter(1_000);
    filter.connected();
    for (let i = 0; i < 200_000; i++) {
      assert.equal(filter.admit(i, { group: `driver-${i % 7}`, time: i }), true);
    }
    assert.equal(filter.held, 1_000);
  });

  it("on a later connection drops what it yielded, inside the window by count, before it by time", () => {
    const filter = new ReplayFilter(10);
    filter.connected();
    for (let i = 0; i < 30; i++) filter.admit(i, { group: "a", time: i });
    filter.connected();
    // The replay: 30 old events (20 fell out of the window), then 3 new ones.
    const admitted = [];
    for (let i = 0; i < 33; i++) {
      if (filter.admit(i, { group: "a", time: i })) admitted.push(i);
    }
    assert.deepEqual(admitted, [30, 31, 32]);
  });

  it("lets a line repeated on purpose through, and drops only as many copies as it yielded", () => {
    const filter = new ReplayFilter(10);
    filter.connected();
    assert.equal(filter.admit(7, { group: "a", time: 1 }), true);
    assert.equal(filter.admit(7, { group: "a", time: 1 }), true);
    filter.connected();
    assert.equal(filter.admit(7, { group: "a", time: 1 }), false);
    assert.equal(filter.admit(7, { group: "a", time: 1 }), false);
    assert.equal(filter.admit(7, { group: "a", time: 1 }), true, "a third copy is new");
  });

  it("never drops by time on the first connection, nor an event without a time", () => {
    const filter = new ReplayFilter(2);
    filter.connected();
    // Group a's later events push its earlier ones out: on the first
    // connection, older times still come through (a replay sorted by group).
    for (const [h, t] of [[1, 10], [2, 11], [3, 12], [4, 1], [5, 2]]) {
      assert.equal(filter.admit(h, { group: "a", time: t }), true);
    }
    filter.connected();
    assert.equal(filter.admit(99, { group: "a", time: NaN }), true);
    assert.equal(filter.admit(100, { group: "b", time: 0 }), true, "another group's old time");
    assert.equal(filter.admit(1, { group: "a", time: 10 }), false, "before the mark");
  });
});
