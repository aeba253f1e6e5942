/**
 * A throw-away `nats-server` set up as the Conveyor server sets it up, and
 * helpers to publish events and read streams; re-exported by
 * `@conveyor/driver/testing`.
 *
 * @module
 */
import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdirSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { homedir, tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { headers as natsHeaders, type NatsConnection } from "@nats-io/transport-node";
import { openNats } from "./_nats.ts";
import { jetstream, jetstreamManager, RetentionPolicy, StorageType } from "@nats-io/jetstream";
import type { DriverMessage, Resource } from "./types.ts";

/** A running `nats-server` started by {@link startNatsServer}. */
export interface NatsServer extends AsyncDisposable {
  /** Client URL, e.g. `nats://127.0.0.1:41234`. */
  readonly url: string;
  /** The port it listens on (kept across {@link NatsServer.restart}). */
  readonly port: number;
  /**
   * With the `websocket` option, the WebSocket URL, e.g. `ws://127.0.0.1:41235`
   * (its port kept across {@link NatsServer.restart}); else undefined.
   */
  readonly wsUrl: string | undefined;
  /** Process id of the server. */
  readonly pid: number;
  /** JetStream store directory (removed by `stop`). */
  readonly storeDir: string;
  /** Stops the server (SIGTERM, then SIGKILL) and removes its store. */
  stop(): Promise<void>;
  /** Kills the server and starts it again on the same port and store. */
  restart(options?: { downtime?: number }): Promise<void>;
}

/** Options of {@link startNatsServer}. */
export interface NatsServerOptions {
  /** Path to the `nats-server` binary; default: env `NATS_SERVER_BIN`, the set-up cache, then PATH. */
  binary?: string;
  /** Extra command-line arguments. */
  args?: string[];
  /**
   * Also listen for WebSocket clients (plain `ws://`, on 127.0.0.1 and a
   * random port): what edge runtimes connect to. See {@link NatsServer.wsUrl}.
   * @default false
   */
  websocket?: boolean;
  /** How long to wait for the server to be ready, in ms. @default 10_000 */
  readyTimeout?: number;
  /**
   * When none is found, fetch one from Debian's archive with
   * {@link fetchNatsServer} (Debian and Ubuntu only).
   * @default true
   */
  fetch?: boolean;
}

/**
 * Finds a `nats-server` >= 2.10: env `NATS_SERVER_BIN`, the project's set-up
 * cache (`.cache/` of a clone), the user cache {@link fetchNatsServer} fills,
 * then PATH. Throws an error naming every way to provide one.
 *
 * @example
 * ```ts
 * import { findNatsServer } from "@conveyor/driver/testing";
 * console.log(findNatsServer()); // e.g. /usr/sbin/nats-server
 * ```
 */
export function findNatsServer(): string {
  const env = process.env.NATS_SERVER_BIN;
  if (env) return env;
  const candidates = [
    join(process.cwd(), ".cache", "nats-server", "usr", "sbin", "nats-server"),
    join(userCacheDir(), "nats-server", "usr", "sbin", "nats-server"),
  ];
  try {
    candidates.push(
      fileURLToPath(
        new URL("./.cache/nats-server/usr/sbin/nats-server", import.meta.url),
      ),
    );
  } catch { /* not a file: URL (bundled) */ }
  for (const c of candidates) if (existsSync(c) && recentEnough(c)) return c;
  const which = spawnSync("sh", ["-c", "command -v nats-server"], {
    encoding: "utf8",
  });
  const onPath = which.status === 0 ? which.stdout.trim() : "";
  if (onPath && recentEnough(onPath)) return onPath;
  throw new Error(
    "nats-server (>= 2.10, with JetStream) not found" +
      (onPath ? ` (${onPath} is older)` : "") +
      ": put one on PATH or set NATS_SERVER_BIN to its path. Get it from " +
      "https://github.com/nats-io/nats-server/releases, your package manager (Debian: trixie " +
      "or newer; bookworm's 2.9 is too old), or `go install " +
      "github.com/nats-io/nats-server/v2@latest`; on Debian and Ubuntu, fetchNatsServer() " +
      "(which startNatsServer tries) fetches one from Debian's archive into " +
      `${join(userCacheDir(), "nats-server")}.`,
  );
}

/** Where fetched binaries are kept: `$XDG_CACHE_HOME/conveyor-driver` or `~/.cache/conveyor-driver`. */
function userCacheDir(): string {
  const base = process.env.XDG_CACHE_HOME || join(homedir(), ".cache");
  return join(base, "conveyor-driver");
}

/** Whether `binary` runs and says it is nats-server 2.10 or later. */
function recentEnough(binary: string): boolean {
  const r = spawnSync(binary, ["--version"], { encoding: "utf8" });
  const m = /v?(\d+)\.(\d+)\.\d+/.exec(`${r.stdout ?? ""}${r.stderr ?? ""}`);
  if (!m) return false;
  const [major, minor] = [Number(m[1]), Number(m[2])];
  return major > 2 || (major === 2 && minor >= 10);
}

/**
 * Fetches `nats-server` from Debian's archive (suite trixie, else sid) with a
 * private apt configuration, leaving the machine's apt state alone, and
 * unpacks it into `cacheDir` (default `~/.cache/conveyor-driver`). Needs
 * `apt-get` and `dpkg` (Debian, Ubuntu) and access to deb.debian.org;
 * returns the binary's path, or throws saying what failed.
 *
 * @example
 * ```ts
 * import { fetchNatsServer } from "@conveyor/driver/testing";
 * const binary = fetchNatsServer(); // once; later findNatsServer() finds it
 * ```
 */
export function fetchNatsServer(options: { cacheDir?: string } = {}): string {
  const root = options.cacheDir ?? userCacheDir();
  const out = join(root, "nats-server");
  const binary = join(out, "usr", "sbin", "nats-server");
  if (existsSync(binary) && recentEnough(binary)) return binary;
  const work = join(root, "apt");
  const tried: string[] = [];
  try {
    for (const suite of ["trixie", "sid"]) {
      rmSync(work, { recursive: true, force: true });
      for (const d of ["lists/partial", "cache/archives/partial", "dl"]) {
        mkdirSync(join(work, d), { recursive: true });
      }
      const sources = join(work, "sources.list");
      writeFileSync(
        sources,
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] " +
          `http://deb.debian.org/debian ${suite} main\n`,
      );
      const opts = [
        `-oDir::Etc::SourceList=${sources}`,
        "-oDir::Etc::SourceParts=/dev/null",
        `-oDir::State::Lists=${join(work, "lists")}`,
        `-oDir::Cache=${join(work, "cache")}`,
        "-oDir::State::Status=/dev/null",
        "-oDebug::NoLocking=1",
        "-oAPT::Sandbox::User=root",
        "-qq",
      ];
      const update = spawnSync("apt-get", [...opts, "update"], { encoding: "utf8" });
      if (update.error || update.status !== 0) {
        tried.push(`apt-get update (${suite}): ${update.error?.message ?? update.stderr.trim()}`);
        continue;
      }
      const dir = join(work, "dl");
      const dl = spawnSync("apt-get", [...opts, "download", "nats-server"], {
        cwd: dir,
        encoding: "utf8",
      });
      const deb = readdirSync(dir).find((f) => f.endsWith(".deb"));
      if (dl.status !== 0 || !deb) {
        tried.push(`apt-get download nats-server (${suite}): ${dl.stderr.trim()}`);
        continue;
      }
      rmSync(out, { recursive: true, force: true });
      const x = spawnSync("dpkg", ["-x", join(dir, deb), out], { encoding: "utf8" });
      if (x.status === 0 && recentEnough(binary)) return binary;
      tried.push(`dpkg -x ${deb}: ${x.error?.message ?? x.stderr.trim()}`);
    }
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
  throw new Error(
    `cannot fetch nats-server from Debian's archive: ${tried.join("; ")}. Put a nats-server ` +
      ">= 2.10 on PATH or set NATS_SERVER_BIN.",
  );
}

function binaryOrFetch(options: NatsServerOptions): string {
  if (options.binary) return options.binary;
  try {
    return findNatsServer();
  } catch (notFound) {
    if (options.fetch === false) throw notFound;
    try {
      return fetchNatsServer();
    } catch (err) {
      throw new Error(`${(notFound as Error).message} ${(err as Error).message}`, {
        cause: err,
      });
    }
  }
}

async function launch(
  binary: string,
  port: number,
  storeDir: string,
  args: string[],
  readyTimeout: number,
  /** The WebSocket listener's port (-1: random), or undefined for none. */
  wsPort?: number,
) {
  const config = `${storeDir}.conf`;
  if (wsPort !== undefined) {
    writeFileSync(config, `websocket { listen: "127.0.0.1:${wsPort}", no_tls: true }\n`);
  }
  const child = spawn(binary, [
    "-a",
    "127.0.0.1",
    "-p",
    String(port),
    "-js",
    "-sd",
    storeDir,
    ...(wsPort !== undefined ? ["-c", config] : []),
    ...args,
  ], {
    stdio: ["ignore", "ignore", "pipe"],
  });
  let output = "";
  let actualWsPort: number | undefined;
  const actualPort = await new Promise<number>((resolve, reject) => {
    const timer = setTimeout(
      () =>
        fail(
          new Error(
            `nats-server not ready after ${readyTimeout} ms:\n${output}`,
          ),
        ),
      readyTimeout,
    );
    function fail(err: Error) {
      clearTimeout(timer);
      child.kill("SIGKILL");
      reject(err);
    }
    child.once("error", fail);
    child.once(
      "exit",
      (code) => fail(new Error(`nats-server exited with ${code}:\n${output}`)),
    );
    let listening = 0;
    child.stderr!.on("data", (chunk: Uint8Array) => {
      output += new TextDecoder().decode(chunk);
      const m = /Listening for client connections on [^\s]*:(\d+)/.exec(output);
      if (m) listening = Number(m[1]);
      const w = /Listening for websocket clients on [^\s]*:(\d+)/.exec(output);
      if (w) actualWsPort = Number(w[1]);
      if (wsPort !== undefined && actualWsPort === undefined) return;
      if (listening && /Server is ready/.test(output)) {
        clearTimeout(timer);
        child.removeAllListeners("exit");
        child.removeAllListeners("error");
        // Keep draining stderr so the server never blocks on a full pipe.
        child.stderr!.removeAllListeners("data");
        child.stderr!.resume();
        resolve(listening);
      }
    });
  });
  return { child, port: actualPort, wsPort: actualWsPort };
}

function killAndWait(
  child: ReturnType<typeof spawn>,
  signal: "SIGTERM" | "SIGKILL",
): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) {
    return Promise.resolve();
  }
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
 * Starts a `nats-server` with JetStream on 127.0.0.1, a random port and a
 * temporary store directory. Stop it with `stop()` or `await using`.
 *
 * @example
 * ```ts
 * import { startNatsServer } from "@conveyor/driver/testing";
 * await using nats = await startNatsServer();
 * console.log(nats.url);
 * ```
 */
export async function startNatsServer(
  options: NatsServerOptions = {},
): Promise<NatsServer> {
  const binary = binaryOrFetch(options);
  const args = options.args ?? [];
  const readyTimeout = options.readyTimeout ?? 10_000;
  const storeDir = await mkdtemp(join(tmpdir(), "conveyor-nats-"));
  let { child, port, wsPort } = await launch(
    binary,
    -1,
    storeDir,
    args,
    readyTimeout,
    options.websocket ? -1 : undefined,
  );
  let stopped = false;
  const server: NatsServer = {
    get url() {
      return `nats://127.0.0.1:${port}`;
    },
    get port() {
      return port;
    },
    get wsUrl() {
      return wsPort === undefined ? undefined : `ws://127.0.0.1:${wsPort}`;
    },
    get pid() {
      return child.pid!;
    },
    storeDir,
    async stop() {
      if (stopped) return;
      stopped = true;
      await killAndWait(child, "SIGTERM");
      await rm(storeDir, { recursive: true, force: true });
      await rm(`${storeDir}.conf`, { force: true });
    },
    async restart(opts = {}) {
      await killAndWait(child, "SIGKILL");
      if (opts.downtime) await new Promise((r) => setTimeout(r, opts.downtime));
      ({ child } = await launch(binary, port, storeDir, args, readyTimeout, wsPort));
    },
    [Symbol.asyncDispose]() {
      return this.stop();
    },
  };
  return server;
}

/**
 * An open nats.js connection, as `connect` of `@nats-io/transport-node` (or
 * `wsconnect`) returns it. Only its outline is declared here, so that these
 * docs stand alone; pass the `NatsConnection` itself.
 */
export interface OpenConnection {
  /** True once the connection is closed. */
  isClosed(): boolean;
  /** Flushes pending messages to the server. */
  flush(): Promise<void>;
  /** Closes the connection. */
  close(): Promise<void>;
}

/**
 * Where to talk to NATS: a server URL (`nats://`, or `ws://` where there is a
 * global WebSocket), or an open connection to reuse (left open).
 */
export type Target = string | OpenConnection;

async function withConnection<T>(
  target: Target,
  fn: (nc: NatsConnection) => Promise<T>,
): Promise<T> {
  // A caller's connection is a nats.js NatsConnection; OpenConnection only outlines it.
  if (typeof target !== "string") return fn(target as NatsConnection);
  const nc = await openNats({ servers: target });
  try {
    return await fn(nc);
  } finally {
    await nc.close();
  }
}

/**
 * Creates the streams the Conveyor server creates at start-up: `messages`
 * (Interest), `pipeline-engine` and `logs-engine` (WorkQueue). Idempotent.
 */
export function createConveyorStreams(target: Target): Promise<void> {
  return withConnection(target, async (nc) => {
    const jsm = await jetstreamManager(nc);
    const streams = [
      {
        name: "messages",
        subjects: ["resources.>", "events.>", "drivers.>"],
        retention: RetentionPolicy.Interest,
      },
      {
        name: "pipeline-engine",
        subjects: ["pipelines.>"],
        retention: RetentionPolicy.Workqueue,
      },
      {
        name: "logs-engine",
        subjects: ["logs.>"],
        retention: RetentionPolicy.Workqueue,
      },
    ];
    for (const s of streams) {
      try {
        await jsm.streams.info(s.name);
      } catch {
        await jsm.streams.add({ ...s, storage: StorageType.File });
      }
    }
  });
}

/** An event to publish with {@link publishEvent}. */
export interface EventInit {
  /** Resource type, e.g. `"pipeline"`. */
  resource: string;
  /** Resource name. */
  name: string;
  /** Resource spec. @default {} */
  spec?: unknown;
  /** Resource metadata. @default { version: "1" } */
  metadata?: Record<string, string>;
  /** Pipeline of the resource. */
  pipeline?: string;
  /** Event name. @default "create" */
  event?: string;
  /** Run id. @default a new UUID */
  runId?: string;
  /** Message id. @default a new UUID */
  id?: string;
  /**
   * Address the event to one driver, as the pipeline engine does for its
   * steps (`drivers.{driver}.resources.{type}`) instead of `resources.{type}`.
   */
  driver?: string;
  /** NATS headers to send with it, e.g. a W3C `traceparent`. */
  headers?: Record<string, string>;
}

/** What {@link publishEvent} published. */
export interface PublishedEvent {
  /** The subject it went to. */
  subject: string;
  /** The message as sent (payload decoded here for convenience). */
  message: DriverMessage;
  /** Its sequence in the `messages` stream. */
  seq: number;
}

/**
 * Publishes a DriverMessage exactly as the Conveyor server does: `payload`
 * encoded as a JSON string, on `resources.{type}` (or
 * `drivers.{driver}.resources.{type}` when `driver` is given).
 */
export function publishEvent(
  target: Target,
  init: EventInit,
): Promise<PublishedEvent> {
  return withConnection(target, async (nc) => {
    const resource: Resource = {
      id: crypto.randomUUID(),
      name: init.name,
      resource: init.resource,
      ...(init.pipeline ? { pipeline: init.pipeline } : {}),
      metadata: init.metadata ?? { version: "1" },
      spec: init.spec ?? {},
    };
    const message: DriverMessage = {
      event: init.event ?? "create",
      id: init.id ?? crypto.randomUUID(),
      run_id: init.runId ?? crypto.randomUUID(),
      payload: resource,
    };
    const subject = init.driver
      ? `drivers.${init.driver}.resources.${init.resource}`
      : `resources.${init.resource}`;
    const wire = { ...message, payload: JSON.stringify(resource) };
    let headers;
    if (init.headers) {
      headers = natsHeaders();
      for (const [k, v] of Object.entries(init.headers)) headers.set(k, v);
    }
    const ack = await jetstream(nc).publish(subject, JSON.stringify(wire), { headers });
    return { subject, message, seq: ack.seq };
  });
}

/** One message read back by {@link readStream}. */
export interface StoredMessage {
  /** Subject it was published on. */
  subject: string;
  /** Stream sequence. */
  seq: number;
  /** Decoded JSON body. */
  json: unknown;
  /** NATS headers, as a plain object (first value of each). */
  headers: Record<string, string>;
}

/**
 * Reads every message stored in a stream, optionally only those on
 * `subject`, without consuming them (direct reads by sequence).
 */
export function readStream(
  target: Target,
  stream: string,
  subject?: string,
): Promise<StoredMessage[]> {
  return withConnection(target, async (nc) => {
    const jsm = await jetstreamManager(nc);
    const info = await jsm.streams.info(stream);
    const out: StoredMessage[] = [];
    for (
      let seq = info.state.first_seq;
      seq <= info.state.last_seq && info.state.messages > 0;
      seq++
    ) {
      const m = await jsm.streams.getMessage(stream, { seq }).catch(() => null);
      if (!m) continue;
      if (subject && m.subject !== subject) continue;
      const headers: Record<string, string> = {};
      for (const [k, v] of m.header ?? []) headers[k] = v[0];
      out.push({ subject: m.subject, seq: m.seq, json: m.json(), headers });
    }
    return out;
  });
}
