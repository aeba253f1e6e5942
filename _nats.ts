/**
 * Internal: every NATS connection this package opens, over TCP or WebSocket.
 *
 * nats.js v3 keeps its transport in one module-wide slot: each `connect()`
 * (TCP) or `wsconnect()` (WebSocket) call sets it, and every connection of
 * the process reconnects with whatever it holds then. A WebSocket driver
 * whose process later opens a TCP connection (a test helper, say) would
 * never get back after a NATS restart; the reverse breaks the TCP one. So a
 * connection over one transport is refused, with a reason, while one over
 * the other is open.
 *
 * WebSocket writes made in one tick go out as one frame: nats.js sends its
 * CONNECT and PING as two, and Deno's WebSocket leaves Nagle's algorithm on,
 * so the second waited for the server's delayed ACK (some 40 ms, at every
 * connect; see {@link coalescingSocket}).
 *
 * @module
 */
import { connect, type NatsConnection, type NodeConnectionOptions } from "@nats-io/transport-node";
import { wsconnect, type WsSocketFactory } from "@nats-io/nats-core";
import { ConfigError } from "./errors.ts";

/** How a connection reaches NATS. */
export type Transport = "tcp" | "ws";

const open: Record<Transport, number> = { tcp: 0, ws: 0 };
const label: Record<Transport, string> = { tcp: "TCP (nats://, tls://)", ws: "WebSocket" };

/**
 * The transport of `servers`: `ws` when they are ws:// or wss:// URLs. A mix,
 * or WebSocket where the runtime has none, is a `ConfigError`.
 */
export function transportOf(servers: readonly string[]): Transport {
  const ws = servers.filter((s) => /^wss?:\/\//i.test(s));
  if (ws.length === 0) return "tcp";
  if (ws.length < servers.length) {
    throw new ConfigError(
      "servers",
      `servers mixes WebSocket (ws://, wss://) and TCP URLs, which one connection cannot use ` +
        `together: ${servers.join(", ")}`,
    );
  }
  if (typeof globalThis.WebSocket !== "function") {
    throw new ConfigError(
      "servers",
      "ws:// and wss:// servers need a global WebSocket (Deno, Bun, Node 22 and later, edge " +
        "runtimes); this runtime has none: use nats:// or tls://",
    );
  }
  return "ws";
}

/**
 * Opens a connection over the transport its servers name; refused with a
 * `ConfigError` while this package holds one open over the other.
 */
export async function openNats(
  options: NodeConnectionOptions & { servers: string | string[] },
): Promise<NatsConnection> {
  const servers = typeof options.servers === "string" ? [options.servers] : options.servers;
  const kind = transportOf(servers);
  const other: Transport = kind === "ws" ? "tcp" : "ws";
  if (open[other] > 0) {
    throw new ConfigError(
      "servers",
      `cannot open a NATS connection over ${label[kind]} while this process has ${
        open[other]
      } open over ${label[other]}: nats.js keeps one transport per process, and every ` +
        `connection reconnects with the last one opened. Use one transport per process ` +
        `(with the testing kit: startTestConveyor({ websocket: true }) for a ws:// driver)`,
    );
  }
  // Counted before the (asynchronous) connect, so two racing opens see each other.
  open[kind]++;
  let nc: NatsConnection;
  try {
    nc = kind === "ws"
      ? await wsconnect({ wsFactory: coalescingSocket, ...options })
      : await connect(options);
  } catch (err) {
    open[kind]--;
    throw err;
  }
  void nc.closed().then(() => open[kind]--);
  return nc;
}

/**
 * A WebSocket whose `send` calls within one tick are joined into one frame,
 * written at the end of the tick (and before a `close`). Measured on Deno
 * 2.9 against a local nats-server: CONNECT and PING as two frames took
 * 45 ms to the PONG, as one 0.5 ms; `startDriver` over ws:// went from 63 to
 * 21 ms.
 */
export const coalescingSocket: WsSocketFactory = (url) =>
  Promise.resolve({ socket: coalesce(new WebSocket(url)), encrypted: /^wss:/i.test(url) });

/** The part of a WebSocket {@link coalesce} touches. */
export type SocketLike = Pick<WebSocket, "send" | "close" | "readyState">;

/** Makes `socket`'s binary sends of one tick leave as one, in order (see {@link coalescingSocket}). */
export function coalesce<S extends SocketLike>(socket: S): S {
  const send = socket.send.bind(socket);
  const close = socket.close.bind(socket);
  let pending: Uint8Array<ArrayBuffer>[] = [];
  const flush = () => {
    if (pending.length === 0) return;
    const frames = pending;
    pending = [];
    // 1 is OPEN; a socket closed meanwhile drops them, as its own send would.
    if (socket.readyState !== 1) return;
    if (frames.length === 1) return send(frames[0]);
    const joined = new Uint8Array(frames.reduce((n, f) => n + f.byteLength, 0));
    let at = 0;
    for (const f of frames) {
      joined.set(f, at);
      at += f.byteLength;
    }
    send(joined);
  };
  socket.send = (data) => {
    // nats.js sends ArrayBuffers; copied, since the frame leaves after this returns.
    const bytes = data instanceof ArrayBuffer
      ? new Uint8Array(data.slice(0))
      : ArrayBuffer.isView(data)
      ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength).slice()
      : undefined;
    if (!bytes) {
      flush();
      return send(data);
    }
    if (pending.push(bytes) === 1) queueMicrotask(flush);
  };
  socket.close = (code, reason) => {
    flush();
    close(code, reason);
  };
  return socket;
}
