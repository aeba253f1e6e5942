// Shared helpers of the test files (not published).
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { jetstreamManager } from "@nats-io/jetstream";
import { createConveyorStreams, type NatsServer, startNatsServer } from "./testing.ts";

/** Polls `check` until it returns a truthy value or `timeout` ms pass. */
export async function waitFor<T>(
  check: () => T | Promise<T>,
  what: string,
  timeout = 15_000,
): Promise<NonNullable<T>> {
  const end = Date.now() + timeout;
  let last: T | undefined;
  while (Date.now() < end) {
    last = await check();
    if (last) return last as NonNullable<T>;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(
    `timed out after ${timeout} ms waiting for ${what} (last: ${JSON.stringify(last)})`,
  );
}

/** A nats-server with the Conveyor streams and a client connection. */
export interface Env extends AsyncDisposable {
  server: NatsServer;
  nc: NatsConnection;
  url: string;
}

export async function conveyorEnv(): Promise<Env> {
  const server = await startNatsServer();
  await createConveyorStreams(server.url);
  const nc = await connect({
    servers: server.url,
    maxReconnectAttempts: -1,
    reconnectTimeWait: 100,
  });
  return {
    server,
    nc,
    url: server.url,
    async [Symbol.asyncDispose]() {
      await nc.close().catch(() => {});
      await server.stop();
    },
  };
}

/** Delivered and acknowledged counts of a driver's consumer. */
export async function consumerState(nc: NatsConnection, name: string) {
  const jsm = await jetstreamManager(nc);
  const info = await jsm.consumers.info("messages", name);
  return {
    pending: info.num_pending,
    ackPending: info.num_ack_pending,
    redelivered: info.num_redelivered,
    delivered: info.delivered.consumer_seq,
    config: info.config,
  };
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
