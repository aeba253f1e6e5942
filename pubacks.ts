/**
 * Publishes that wait for the server's acknowledgement (JetStream publishes,
 * acks to be confirmed) through one inbox subscription.
 *
 * Why not `nc.request()` or `js.publish()`: in nats.js 3.x every successful
 * request also builds an `Error` with a stack trace (`RequestError
 * ("cancelled")`, to reject a promise already resolved), starts its own timer
 * and goes through the mux bookkeeping. At one log line, one result and one
 * ack per event that was a sixth of the driver's CPU (measured with
 * `deno run --cpu-prof`). Here a reply costs a map lookup; one sweep timer
 * expires what gets no answer.
 *
 * @module
 */
import { setImmediate } from "node:timers";
import {
  createInbox,
  headers as natsHeaders,
  type MsgHdrs,
  type NatsConnection,
  type Subscription,
} from "@nats-io/transport-node";

/** Options of one publish. */
export interface PublishAckOptions {
  /** `Nats-Msg-Id`: JetStream stores a message once per id within its duplicate window. */
  msgID?: string;
  /** Headers to send (the `Nats-Msg-Id` is added to them). */
  headers?: MsgHdrs;
  /** How long to wait for the acknowledgement, in ms. @default the instance's timeout */
  timeout?: number;
}

/** The server did not acknowledge a publish: an error reply, no responder, or no reply in time. */
export class PubAckError extends Error {
  /** `"timeout"`, `"no-responders"` (no stream, or its leader is being elected), or `"api"`. */
  readonly kind: "timeout" | "no-responders" | "api";
  /** Creates the error. */
  constructor(kind: "timeout" | "no-responders" | "api", message: string) {
    super(message);
    this.name = "PubAckError";
    this.kind = kind;
  }
}

interface Pending {
  resolve(): void;
  reject(err: Error): void;
  until: number;
}

const decoder = new TextDecoder();

/**
 * Sends messages with a reply subject and resolves each when the server
 * answers it: a JetStream `PubAck` (rejected on an API error), or any reply
 * to an ack sent to a delivery's reply subject (a replicated consumer answers
 * once the ack is committed).
 */
export class PubAcks {
  readonly #nc: NatsConnection;
  readonly #timeout: number;
  readonly #prefix: string;
  readonly #sub: Subscription;
  readonly #pending = new Map<string, Pending>();
  #next = 0;
  #sweep?: ReturnType<typeof setInterval>;
  /** Publishes of this turn of the event loop, sent together (one socket write). */
  #batch: (() => void)[] = [];

  /**
   * Subscribes to a fresh inbox on `nc` (under `inboxPrefix`, as the
   * connection's own, where permissions require one); `timeout` (ms) is the
   * default wait.
   */
  constructor(nc: NatsConnection, options: { timeout?: number; inboxPrefix?: string } = {}) {
    this.#nc = nc;
    this.#timeout = options.timeout ?? 5_000;
    this.#prefix = `${createInbox(options.inboxPrefix)}.`;
    this.#sub = nc.subscribe(`${this.#prefix}*`, {
      callback: (_err, msg) => {
        const token = msg.subject.slice(this.#prefix.length);
        const p = this.#pending.get(token);
        if (!p) return; // timed out already
        this.#pending.delete(token);
        if (msg.headers?.code === 503) {
          p.reject(new PubAckError("no-responders", `no responders for ${msg.subject}`));
          return;
        }
        const data = msg.data;
        // A PubAck is `{"stream":…}`; only an error reply needs parsing.
        if (data.length > 9 && data[2] === 0x65 /* e */) {
          const text = decoder.decode(data);
          if (text.startsWith('{"error"')) {
            let description = text;
            try {
              description = JSON.parse(text).error?.description ?? text;
            } catch { /* keep the text */ }
            p.reject(new PubAckError("api", description));
            return;
          }
        }
        p.resolve();
      },
    });
  }

  /**
   * Publishes `data` to `subject` and resolves when the server acknowledges
   * it. Rejects with `PubAckError`, or with what `publish` throws (a closed
   * connection, a payload over `max_payload`).
   */
  publish(subject: string, data: Uint8Array | string, opts: PublishAckOptions = {}): Promise<void> {
    const token = (this.#next++).toString(36);
    let headers = opts.headers;
    if (opts.msgID) {
      headers ??= natsHeaders();
      headers.set("Nats-Msg-Id", opts.msgID);
    }
    return new Promise<void>((resolve, reject) => {
      const entry = { resolve, reject, until: Date.now() + (opts.timeout ?? this.#timeout) };
      this.#pending.set(token, entry);
      this.#enqueue(() => {
        try {
          this.#nc.publish(subject, data, { reply: this.#prefix + token, headers });
        } catch (err) {
          this.#pending.delete(token);
          reject(err);
        }
      });
      this.#sweep ??= setInterval(() => this.#expire(), 250);
    });
  }

  /**
   * Publishes without waiting for an answer (a core NATS message), in the
   * same batch as the acknowledged ones, so the order of the two is kept.
   */
  send(subject: string, data: Uint8Array | string, headers?: MsgHdrs): void {
    this.#enqueue(() => {
      try {
        this.#nc.publish(subject, data, { headers });
      } catch {
        // Best effort by definition (live log streaming).
      }
    });
  }

  /**
   * nats.js writes to the socket once the microtasks queued before its
   * flush have run; the runtime's publishes come from many such turns (one
   * write and a half per event). Sent from one callback, they go out in one
   * write: a quarter of the driver's CPU was socket writes.
   */
  #enqueue(send: () => void): void {
    if (this.#batch.push(send) === 1) {
      setImmediate(() => {
        const batch = this.#batch;
        this.#batch = [];
        for (const f of batch) f();
      });
    }
  }

  /** Rejects what got no answer in time; stops the timer when nothing waits. */
  #expire(): void {
    const now = Date.now();
    for (const [token, p] of this.#pending) {
      if (p.until > now) continue;
      this.#pending.delete(token);
      p.reject(new PubAckError("timeout", "no acknowledgement in time"));
    }
    if (this.#pending.size === 0) {
      clearInterval(this.#sweep);
      this.#sweep = undefined;
    }
  }

  /** Publishes waiting for an answer. */
  get size(): number {
    return this.#pending.size;
  }

  /** Rejects everything pending and unsubscribes (publishes still queued are sent first). */
  close(): void {
    const batch = this.#batch;
    this.#batch = [];
    for (const f of batch) f();
    clearInterval(this.#sweep);
    this.#sweep = undefined;
    for (const p of this.#pending.values()) {
      p.reject(new PubAckError("timeout", "closed before an acknowledgement"));
    }
    this.#pending.clear();
    try {
      this.#sub.unsubscribe();
    } catch { /* closed already */ }
  }
}
