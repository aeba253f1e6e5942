/**
 * Test helpers for a clustered JetStream (not published): an N-node
 * nats-server cluster on 127.0.0.1 whose nodes can be killed with SIGKILL and
 * restarted on the same ports and store, the Conveyor streams replicated as a
 * clustered Conveyor server creates them, and look-ups of stream leaders,
 * consumer leaders and the node a client is on. Runs on Deno, Bun and Node
 * (node:child_process, node:net, fetch).
 *
 * @example
 * ```ts
 * await using cluster = await startNatsCluster();
 * await createConveyorStreamsClustered(cluster.urls.join(","));
 * await using running = await startDriver(driver, { servers: cluster.urls, handleSignals: false });
 * const on = await clientNode(cluster, `conveyor-driver:${driver.name}`);
 * await cluster.node(on!).kill();
 * await cluster.node(on!).restart();
 * ```
 *
 * @module
 */
import { spawn } from "node:child_process";
import { createWriteStream, type WriteStream } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { jetstreamManager, RetentionPolicy, StorageType } from "@nats-io/jetstream";
import { findNatsServer, type Target } from "./testing.ts";

/** One node of a {@link NatsCluster}. */
export interface ClusterNode {
  /** Its `server_name`: `n1`, `n2`, … (what `nc.info?.server_name` and stream leaders report). */
  readonly name: string;
  /** Client URL, e.g. `nats://127.0.0.1:41234`; the same after {@link ClusterNode.restart}. */
  readonly url: string;
  /** Client port. */
  readonly port: number;
  /** Route (cluster) port. */
  readonly clusterPort: number;
  /** HTTP monitoring URL (`/jsz`, `/connz`, …), e.g. to see which node a client is on. */
  readonly monitorUrl: string;
  /** Process id of the current process (changes on restart; -1 once killed). */
  readonly pid: number;
  /** JetStream store directory, kept across kill and restart. */
  readonly storeDir: string;
  /** Whether the process is running. */
  readonly running: boolean;
  /** Kills the node with SIGKILL (no clean shutdown, no snapshot) and waits for its exit. */
  kill(): Promise<void>;
  /**
   * Starts the node again on the same ports and store (killing it first when
   * it still runs) and waits until its JetStream API answers through it and
   * the meta leader counts it as a current peer. Its streams may still be
   * catching up: see {@link waitForStreamsCurrent}.
   */
  restart(): Promise<void>;
}

/** A cluster started by {@link startNatsCluster}. */
export interface NatsCluster extends AsyncDisposable {
  /** Client URLs of all nodes: pass them all as `servers` so clients fail over. */
  readonly urls: string[];
  /** The nodes, `n1` first. */
  readonly nodes: ClusterNode[];
  /** The node of that `server_name`. */
  node(name: string): ClusterNode;
  /** Stops every node (SIGTERM, then SIGKILL) and removes their stores. */
  stop(): Promise<void>;
}

/** Options of {@link startNatsCluster}. */
export interface NatsClusterOptions {
  /** Number of nodes. @default 3 */
  size?: number;
  /** `--cluster_name`. @default "conveyor-test" */
  clusterName?: string;
  /** Path to `nats-server` (>= 2.10). @default {@link findNatsServer} */
  binary?: string;
  /** Extra command-line arguments for every node, e.g. `["-D"]`. */
  args?: string[];
  /** How long to wait for a node to start, and for the meta leader, in ms. @default 20_000 */
  readyTimeout?: number;
  /**
   * A directory to append each node's log to (`<name>.log`, across
   * restarts): useful evidence after a failure. By default logs are dropped.
   */
  logDir?: string;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/**
 * Free TCP ports on 127.0.0.1. All are held open until all are known, so the
 * same port is not handed out twice; the OS may still reuse one before the
 * server binds it, which is rare enough for tests.
 */
async function freePorts(n: number): Promise<number[]> {
  const servers = await Promise.all(
    Array.from(
      { length: n },
      () =>
        new Promise<ReturnType<typeof createServer>>((resolve, reject) => {
          const s = createServer();
          s.once("error", reject);
          s.listen(0, "127.0.0.1", () => resolve(s));
        }),
    ),
  );
  const ports = servers.map((s) => (s.address() as { port: number }).port);
  await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
  return ports;
}

type Child = ReturnType<typeof spawn>;

/** Spawns one node and resolves once it logs "Server is ready" (as testing.ts's `launch`). */
function launchNode(
  binary: string,
  args: string[],
  readyTimeout: number,
  log: WriteStream | undefined,
): Promise<Child> {
  const child = spawn(binary, args, { stdio: ["ignore", "ignore", "pipe"] });
  let output = "";
  let ready = false;
  return new Promise<Child>((resolve, reject) => {
    const timer = setTimeout(
      () => fail(new Error(`nats-server not ready after ${readyTimeout} ms:\n${output}`)),
      readyTimeout,
    );
    function fail(err: Error) {
      clearTimeout(timer);
      child.kill("SIGKILL");
      reject(err);
    }
    child.once("error", fail);
    child.once("exit", (code) => fail(new Error(`nats-server exited with ${code}:\n${output}`)));
    const decoder = new TextDecoder();
    child.stderr!.on("data", (chunk: Uint8Array) => {
      log?.write(chunk);
      if (ready) return;
      output += decoder.decode(chunk);
      if (/Server is ready/.test(output)) {
        clearTimeout(timer);
        child.removeAllListeners("exit");
        child.removeAllListeners("error");
        // Keep reading stderr (into the log, if any) so the server never
        // blocks on a full pipe; stop collecting it in memory.
        ready = true;
        output = "";
        resolve(child);
      }
    });
  });
}

function exited(child: Child): boolean {
  return child.exitCode !== null || child.signalCode !== null;
}

function killAndWait(child: Child, signal: "SIGTERM" | "SIGKILL"): Promise<void> {
  if (exited(child)) return Promise.resolve();
  return new Promise((resolve) => {
    const t = setTimeout(() => child.kill("SIGKILL"), 5_000);
    child.once("exit", () => {
      clearTimeout(t);
      resolve();
    });
    child.kill(signal);
  });
}

/**
 * Resolves once `$JS.API.INFO`, sent through the node at `url`, is answered
 * without an error. In a cluster only the meta leader answers it, and a node
 * without a meta leader answers 10008 ("JetStream system temporarily
 * unavailable"), so success means: a meta leader is elected and this node
 * reaches it.
 */
export async function waitForJetStream(url: string, timeout = 20_000): Promise<void> {
  const end = Date.now() + timeout;
  let last = "no answer";
  while (Date.now() < end) {
    let nc: NatsConnection | undefined;
    try {
      // Only this node: a client that follows cluster updates could ask another.
      nc = await connect({
        servers: url,
        reconnect: false,
        ignoreClusterUpdates: true,
        timeout: 2_000,
      });
      const r = await nc.request("$JS.API.INFO", "", { timeout: 1_000 });
      const body = r.json<{ error?: { description?: string } }>();
      if (!body.error) return;
      last = body.error.description ?? JSON.stringify(body.error);
    } catch (err) {
      last = String(err);
    } finally {
      await nc?.close().catch(() => {});
    }
    await sleep(100);
  }
  throw new Error(`JetStream not available through ${url} after ${timeout} ms: ${last}`);
}

interface Jsz {
  meta_cluster?: {
    leader?: string;
    replicas?: { name: string; current?: boolean; offline?: boolean }[];
  };
}

/**
 * Resolves once the JetStream meta leader (read from the nodes' `/jsz`)
 * counts every other running node as a current, online peer.
 */
export async function waitForMetaGroup(
  nodes: readonly Pick<ClusterNode, "name" | "monitorUrl" | "running">[],
  timeout = 20_000,
): Promise<void> {
  const end = Date.now() + timeout;
  let last = "no answer";
  while (Date.now() < end) {
    const up = nodes.filter((n) => n.running);
    for (const n of up) {
      try {
        const jsz = await (await fetch(`${n.monitorUrl}/jsz`)).json() as Jsz;
        const meta = jsz.meta_cluster;
        last = `${n.name}: ${JSON.stringify(meta)}`;
        if (meta?.leader !== n.name) continue;
        const current = new Set(
          (meta.replicas ?? []).filter((r) => r.current && !r.offline).map((r) => r.name),
        );
        if (up.every((x) => x.name === n.name || current.has(x.name))) return;
      } catch (err) {
        last = `${n.name}: ${err}`;
      }
    }
    await sleep(100);
  }
  throw new Error(`JetStream meta group incomplete after ${timeout} ms: ${last}`);
}

/**
 * Starts an N-node nats-server cluster with JetStream on 127.0.0.1: each node
 * on free client and route ports, with its own temporary store, `--server_name`
 * `n1`…`nN`, routes to all the others. Resolves once the JetStream meta leader
 * is elected and every node reaches it. Stop it with `stop()` or `await using`.
 *
 * A start whose meta group does not complete within `readyTimeout` is retried
 * from scratch, up to three times.
 *
 * nats-server 2.10 needs no configuration file for this: `--server_name`,
 * `--cluster_name`, `--cluster` and `--routes` on the command line are enough
 * for a JetStream cluster.
 *
 * @example
 * ```ts
 * await using cluster = await startNatsCluster();
 * const nc = await connect({ servers: cluster.urls });
 * await createConveyorStreamsClustered(nc);
 * await cluster.node(await streamLeader(nc, "messages")).kill();
 * ```
 */
export async function startNatsCluster(options: NatsClusterOptions = {}): Promise<NatsCluster> {
  const size = options.size ?? 3;
  if (!Number.isInteger(size) || size < 1) throw new Error(`bad cluster size ${size}`);
  // Now and then (about 1 start in 40 here) nodes started together settle on
  // a meta group that does not take in the last node for a long time: start
  // afresh (new ports and stores) rather than fail the test.
  for (let attempt = 1;; attempt++) {
    try {
      return await startOnce(size, options);
    } catch (err) {
      if (attempt >= 3 || !/meta group incomplete|not available through/.test(String(err))) {
        throw err;
      }
    }
  }
}

async function startOnce(size: number, options: NatsClusterOptions): Promise<NatsCluster> {
  const binary = options.binary ?? findNatsServer();
  const clusterName = options.clusterName ?? "conveyor-test";
  const readyTimeout = options.readyTimeout ?? 20_000;
  const ports = await freePorts(3 * size);
  const clientPorts = ports.slice(0, size);
  const routePorts = ports.slice(size, 2 * size);
  const monitorPorts = ports.slice(2 * size);
  const routes = routePorts.map((p) => `nats://127.0.0.1:${p}`).join(",");
  const nodes: (ClusterNode & { stop(): Promise<void> })[] = [];

  async function makeNode(i: number) {
    const name = `n${i + 1}`;
    const storeDir = await mkdtemp(join(tmpdir(), `conveyor-nats-${name}-`));
    const log = options.logDir
      ? createWriteStream(join(options.logDir, `${name}.log`), { flags: "a" })
      : undefined;
    const args = [
      "-a",
      "127.0.0.1",
      "-p",
      String(clientPorts[i]),
      "-m",
      String(monitorPorts[i]),
      "-js",
      "-sd",
      storeDir,
      "--server_name",
      name,
      "--cluster_name",
      clusterName,
      "--cluster",
      `nats://127.0.0.1:${routePorts[i]}`,
      // Its own route URL in the list is fine: the server skips itself.
      "--routes",
      routes,
      ...(options.args ?? []),
    ];
    log?.write(`\n---- start of ${name} at ${new Date().toISOString()} ----\n`);
    let child: Child | undefined = await launchNode(binary, args, readyTimeout, log);
    let stopped = false;
    const node = {
      name,
      url: `nats://127.0.0.1:${clientPorts[i]}`,
      port: clientPorts[i],
      clusterPort: routePorts[i],
      monitorUrl: `http://127.0.0.1:${monitorPorts[i]}`,
      storeDir,
      get pid() {
        return child && !exited(child) ? child.pid! : -1;
      },
      get running() {
        return child !== undefined && !exited(child);
      },
      async kill() {
        if (child) await killAndWait(child, "SIGKILL");
      },
      async restart() {
        if (stopped) throw new Error(`node ${name} was stopped`);
        if (child) await killAndWait(child, "SIGKILL");
        log?.write(`\n---- restart of ${name} at ${new Date().toISOString()} ----\n`);
        child = await launchNode(binary, args, readyTimeout, log);
        await waitForJetStream(node.url, readyTimeout);
        await waitForMetaGroup(nodes, readyTimeout);
      },
      async stop() {
        if (stopped) return;
        stopped = true;
        if (child) await killAndWait(child, "SIGTERM");
        log?.end();
        await rm(storeDir, { recursive: true, force: true });
      },
    };
    return node;
  }

  try {
    // Started together: each node retries its routes until the others listen.
    nodes.push(...await Promise.all(Array.from({ length: size }, (_, i) => makeNode(i))));
    await Promise.all(nodes.map((n) => waitForJetStream(n.url, readyTimeout)));
    // A meta leader alone is not enough: until it counts every peer as
    // current, creating an R3 stream fails with "no suitable peers".
    await waitForMetaGroup(nodes, readyTimeout);
  } catch (err) {
    await Promise.all(nodes.map((n) => n.stop()));
    throw err;
  }
  let stopping: Promise<void> | undefined;
  const cluster: NatsCluster = {
    urls: nodes.map((n) => n.url),
    nodes,
    node(name: string): ClusterNode {
      const n = nodes.find((x) => x.name === name);
      if (!n) throw new Error(`no node named ${name}`);
      return n;
    },
    stop() {
      stopping ??= Promise.all(nodes.map((n) => n.stop())).then(() => {});
      return stopping;
    },
    [Symbol.asyncDispose]() {
      return this.stop();
    },
  };
  return cluster;
}

async function withConnection<T>(
  target: Target,
  fn: (nc: NatsConnection) => Promise<T>,
): Promise<T> {
  if (typeof target !== "string") return fn(target as NatsConnection);
  const nc = await connect({ servers: target.split(",") });
  try {
    return await fn(nc);
  } finally {
    await nc.close();
  }
}

/**
 * Creates the three Conveyor streams (as `createConveyorStreams` in
 * testing.ts) with `num_replicas` replicas, as a Conveyor server on a
 * JetStream cluster has them. Idempotent. A string target may list several
 * URLs separated by commas.
 */
export function createConveyorStreamsClustered(target: Target, replicas = 3): Promise<void> {
  return withConnection(target, async (nc) => {
    const jsm = await jetstreamManager(nc);
    const streams = [
      {
        name: "messages",
        subjects: ["resources.>", "events.>", "drivers.>"],
        retention: RetentionPolicy.Interest,
      },
      { name: "pipeline-engine", subjects: ["pipelines.>"], retention: RetentionPolicy.Workqueue },
      { name: "logs-engine", subjects: ["logs.>"], retention: RetentionPolicy.Workqueue },
    ];
    for (const s of streams) {
      try {
        await jsm.streams.info(s.name);
      } catch {
        await jsm.streams.add({ ...s, storage: StorageType.File, num_replicas: replicas });
      }
    }
  });
}

/** Polls `look` until it names a leader; look-ups time out while a group elects one. */
async function pollLeader(
  target: Target,
  what: string,
  timeout: number,
  look: (nc: NatsConnection) => Promise<string | undefined>,
): Promise<string> {
  return await withConnection(target, async (nc) => {
    const end = Date.now() + timeout;
    let last = "no leader";
    while (Date.now() < end) {
      try {
        const leader = await look(nc);
        if (leader) return leader;
      } catch (err) {
        last = String(err);
      }
      await sleep(100);
    }
    throw new Error(`no leader of ${what} after ${timeout} ms: ${last}`);
  });
}

/**
 * The `server_name` of a stream's leader. Waits up to `timeout` ms while the
 * stream elects one (e.g. right after its leader was killed).
 */
export function streamLeader(target: Target, stream: string, timeout = 15_000): Promise<string> {
  return pollLeader(target, `stream ${stream}`, timeout, async (nc) => {
    const jsm = await jetstreamManager(nc, { timeout: 2_000, checkAPI: false });
    return (await jsm.streams.info(stream)).cluster?.leader || undefined;
  });
}

/** The `server_name` of a consumer's leader; waits like {@link streamLeader}. */
export function consumerLeader(
  target: Target,
  stream: string,
  consumer: string,
  timeout = 15_000,
): Promise<string> {
  return pollLeader(target, `consumer ${stream} > ${consumer}`, timeout, async (nc) => {
    const jsm = await jetstreamManager(nc, { timeout: 2_000, checkAPI: false });
    return (await jsm.consumers.info(stream, consumer)).cluster?.leader || undefined;
  });
}

/** The `server_name` of the node a connection is on now (undefined while disconnected). */
export function connectedServer(nc: NatsConnection): string | undefined {
  return nc.isClosed() ? undefined : nc.info?.server_name;
}

/**
 * The `server_name` of the node a client is connected to, found by its
 * connection name in the nodes' `/connz` (for a client whose connection is
 * not at hand, e.g. a driver's: `conveyor-driver:<name>`); undefined when no
 * running node lists it.
 */
export async function clientNode(
  cluster: Pick<NatsCluster, "nodes">,
  connectionName: string,
): Promise<string | undefined> {
  for (const n of cluster.nodes.filter((x) => x.running)) {
    try {
      const res = await fetch(`${n.monitorUrl}/connz?limit=100000`);
      const connz = await res.json() as { connections?: { name?: string }[] };
      if (connz.connections?.some((c) => c.name === connectionName)) return n.name;
    } catch { /* a node starting or stopping */ }
  }
  return undefined;
}

/**
 * Waits until each stream has a leader and all its replicas are current
 * (e.g. after a restarted node caught up), or `timeout` ms pass.
 */
export async function waitForStreamsCurrent(
  target: Target,
  streams: string[],
  timeout = 30_000,
): Promise<void> {
  await withConnection(target, async (nc) => {
    const jsm = await jetstreamManager(nc, { timeout: 2_000, checkAPI: false });
    const end = Date.now() + timeout;
    let last = "";
    while (Date.now() < end) {
      try {
        const infos = await Promise.all(streams.map((s) => jsm.streams.info(s)));
        const lagging = infos.filter((i) =>
          !i.cluster?.leader || (i.cluster.replicas ?? []).some((r) => !r.current || r.offline)
        );
        if (lagging.length === 0) return;
        last = lagging.map((i) => `${i.config.name}: ${JSON.stringify(i.cluster)}`).join("; ");
      } catch (err) {
        last = String(err);
      }
      await sleep(200);
    }
    throw new Error(`streams not current after ${timeout} ms: ${last}`);
  });
}
