// The WebSocket write coalescing of the NATS connections (_nats.ts); its use
// against a real nats-server is every test of the ws stage.
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { coalesce, type SocketLike } from "./_nats.ts";

function fakeSocket() {
  const sent: string[] = [];
  const events: string[] = [];
  const socket: SocketLike = {
    readyState: 1,
    send(data) {
      const text = typeof data === "string"
        ? data
        : new TextDecoder().decode(data as ArrayBuffer | Uint8Array);
      sent.push(text);
      events.push(`send ${text}`);
    },
    close() {
      events.push("close");
    },
  };
  return { socket, sent, events };
}
const bytes = (s: string): ArrayBuffer => new TextEncoder().encode(s).buffer as ArrayBuffer;
const tick = () => new Promise<void>((r) => setTimeout(r, 0));

describe("coalesce (WebSocket writes)", () => {
  it("sends the binary writes of one tick as one frame, in order, at the end of the tick", async () => {
    const { socket, sent } = fakeSocket();
    const s = coalesce(socket);
    s.send(bytes("CONNECT {}\r\n"));
    s.send(bytes("PING\r\n"));
    assert.deepEqual(sent, [], "nothing leaves before the tick ends");
    await tick();
    assert.deepEqual(sent, ["CONNECT {}\r\nPING\r\n"]);
    s.send(bytes("PUB a 1\r\nx\r\n"));
    await tick();
    assert.deepEqual(sent, ["CONNECT {}\r\nPING\r\n", "PUB a 1\r\nx\r\n"]);
  });

  it("sends what a caller passed, even if the caller reuses its buffer at once", async () => {
    const { socket, sent } = fakeSocket();
    const s = coalesce(socket);
    const buf = new Uint8Array(new TextEncoder().encode("PING\r\n"));
    s.send(buf.buffer);
    buf.set(new TextEncoder().encode("XXXX"));
    const view = new TextEncoder().encode("__PONG\r\n__").subarray(2, 8);
    s.send(view);
    await tick();
    assert.deepEqual(sent, ["PING\r\nPONG\r\n"]);
  });

  it("writes what is pending before a close, and before a text frame", async () => {
    const { socket, events } = fakeSocket();
    const s = coalesce(socket);
    s.send(bytes("a"));
    s.send("text");
    s.send(bytes("b"));
    s.close();
    await tick();
    assert.deepEqual(events, ["send a", "send text", "send b", "close"]);
  });

  it("drops what is pending once the socket is no longer open, as the socket would", async () => {
    const { socket, sent } = fakeSocket();
    const s = coalesce(socket);
    s.send(bytes("late"));
    (socket as { readyState: number }).readyState = 3;
    await tick();
    assert.deepEqual(sent, []);
  });
});
