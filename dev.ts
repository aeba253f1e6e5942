#!/usr/bin/env node
/// <reference lib="esnext.disposable" preserve="true" />
/**
 * `conveyor-dev`: a local stand-in for Conveyor's NATS side, to run your own
 * driver against while you write it. It starts a `nats-server` with the three
 * streams the Conveyor server creates, prints the URL to give your driver,
 * then reads commands from standard input and prints every result and log
 * line drivers publish.
 *
 * ```sh
 * deno run -A jsr:@conveyor/driver/dev        # or: npx conveyor-dev
 * # in another terminal:
 * NATS_URL=nats://127.0.0.1:4222 deno run -A my_driver.ts
 * # back in the first one:
 * emit app web {"image":"node:22"}
 * emit app web {"image":"node:22"} event=process driver=builder
 * ```
 *
 * @example
 * ```ts
 * import { startDev } from "@conveyor/driver/dev";
 * await using dev = await startDev({ port: 4222 });
 * console.log(dev.url);
 * await dev.command('emit app web {"image":"node:22"}');
 * ```
 *
 * @module
 */
import { realpathSync } from "node:fs";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { createInterface } from "node:readline";
import { jetstreamManager } from "@nats-io/jetstream";
import { openNats } from "./_nats.ts";
import { startTestConveyor, type TestConveyor } from "./kit.ts";
import { LogEntrySchema, ResultEnvelopeSchema } from "./types.ts";
import * as v from "valibot";

/** Options of {@link startDev}. */
export interface DevOptions {
  /** The port of the NATS server. @default 4222 */
  port?: number;
  /** Where lines are written. @default standard output */
  write?: (line: string) => void;
  /** The `nats-server` binary; default: env `NATS_SERVER_BIN`, then PATH. */
  binary?: string;
}

/** A running {@link startDev}. */
export interface Dev extends AsyncDisposable {
  /** The NATS URL to give drivers (`NATS_URL`). */
  readonly url: string;
  /**
   * Runs one command line: `emit <type> <name> [spec JSON] [event=<e>]
   * [driver=<d>] [run=<uuid>]`, or `help`. Resolves to what it printed.
   */
  command(line: string): Promise<string>;
  /** Stops following and stops the server. */
  stop(): Promise<void>;
}

const HELP = [
  "commands:",
  "  emit <type> <name> [spec JSON] [event=<name>] [driver=<name>] [run=<uuid>]",
  "      publish an event as the Conveyor server does (to one driver with driver=)",
  "      (start the driver first: the messages stream keeps an event only for consumers",
  "      that exist when it is published, as on the Conveyor server)",
  "  help     this text",
  "  quit     stop the server",
].join("\n");

/**
 * Starts the local NATS with the Conveyor streams and follows every result
 * and log line published, writing one line for each.
 */
export async function startDev(options: DevOptions = {}): Promise<Dev> {
  const write = options.write ?? ((line: string) => process.stdout.write(line + "\n"));
  const port = options.port ?? 4222;
  const conveyor = await startTestConveyor({
    nats: { ...(options.binary ? { binary: options.binary } : {}), args: ["-p", String(port)] },
  });
  const following = new AbortController();
  const follow = followAll(conveyor, following.signal, write).catch((err) => {
    if (!following.signal.aborted) write(`error: stopped following: ${(err as Error).message}`);
  });
  let stopped: Promise<void> | undefined;
  const stop = () =>
    stopped ??= (async () => {
      following.abort();
      await follow;
      await conveyor.stop();
    })();
  return {
    url: conveyor.url,
    async command(line) {
      const out = await runCommand(conveyor, line);
      if (out) write(out);
      return out;
    },
    stop,
    [Symbol.asyncDispose]: stop,
  };
}

async function runCommand(conveyor: TestConveyor, line: string): Promise<string> {
  const words = line.trim();
  if (words === "") return "";
  if (words === "help") return HELP;
  const m = /^emit\s+(\S+)\s+(\S+)(.*)$/.exec(words);
  if (!m) return `unknown command: ${words}\n${HELP}`;
  const [, type, name, rest] = m;
  const options: Record<string, string> = {};
  let specText = rest.trim();
  for (;;) {
    const opt = /\s*\b(event|driver|run)=(\S+)\s*$/.exec(specText);
    if (!opt) break;
    options[opt[1]] = opt[2];
    specText = specText.slice(0, opt.index).trim();
  }
  let spec: unknown = {};
  if (specText) {
    try {
      spec = JSON.parse(specText);
    } catch (err) {
      return `error: the spec is not JSON (${(err as Error).message}): ${specText}`;
    }
  }
  try {
    const e = await conveyor.emit({ resource: type, name, spec }, {
      ...(options.event ? { event: options.event } : {}),
      ...(options.driver ? { driver: options.driver } : {}),
      ...(options.run ? { runId: options.run } : {}),
    });
    return `emitted ${e.message.event} ${type}/${name} run ${e.message.run_id} on ${e.subject}`;
  } catch (err) {
    return `error: ${(err as Error).message}`;
  }
}

/** Writes every result and log line stored from now on, polling the streams. */
async function followAll(
  conveyor: TestConveyor,
  signal: AbortSignal,
  write: (line: string) => void,
): Promise<void> {
  const nc = await openNats({ servers: conveyor.url });
  signal.addEventListener("abort", () => void nc.close().catch(() => {}), { once: true });
  const jsm = await jetstreamManager(nc);
  const next: Record<string, number> = { "pipeline-engine": 1, "logs-engine": 1 };
  while (!signal.aborted) {
    let progressed = false;
    for (const stream of Object.keys(next)) {
      const m = await jsm.streams.getMessage(stream, { seq: next[stream] }).catch(() => null);
      if (!m) {
        const { last_seq } = (await jsm.streams.info(stream)).state;
        if (
          last_seq >= next[stream] &&
          !(await jsm.streams.getMessage(stream, { seq: next[stream] }).catch(() => null))
        ) {
          next[stream]++; // deleted
        }
        continue;
      }
      next[stream]++;
      progressed = true;
      write(describe(stream, m.json()));
    }
    if (!progressed) await new Promise((r) => setTimeout(r, 50));
  }
}

function describe(stream: string, json: unknown): string {
  if (stream === "pipeline-engine") {
    const r = v.safeParse(ResultEnvelopeSchema, json);
    if (!r.success) return `result (not one the server accepts): ${JSON.stringify(json)}`;
    const { driverresult: d, run_id } = r.output;
    const data = d.data === undefined || d.data === null ? "" : ` ${JSON.stringify(d.data)}`;
    return `result run ${run_id} ${d.driver} ${d.success ? "ok" : "FAILED"}: ${d.message}${data}`;
  }
  const l = v.safeParse(LogEntrySchema, json);
  if (!l.success) return `log (not one the server accepts): ${JSON.stringify(json)}`;
  return `log    run ${l.output.runid} ${l.output.driver}: ${l.output.message}`;
}

/** The command line: `conveyor-dev [--port N]`. */
export async function main(args: readonly string[] = process.argv.slice(2)): Promise<void> {
  const i = args.indexOf("--port");
  const port = i >= 0 ? Number(args[i + 1]) : Number(process.env.CONVEYOR_DEV_PORT ?? 4222);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new Error(`--port must be a port number, got ${args[i + 1]}`);
  }
  const dev = await startDev({ port });
  const say = (s: string) => process.stdout.write(s + "\n");
  say(`conveyor-dev: NATS with the Conveyor streams at ${dev.url}`);
  say(`run your driver with NATS_URL=${dev.url}`);
  say(`${HELP}`);
  const rl = createInterface({ input: process.stdin });
  const done = new Promise<void>((resolve) => {
    rl.on("close", resolve);
    process.once("SIGINT", () => rl.close());
    process.once("SIGTERM", () => rl.close());
  });
  rl.on("line", (line) => {
    if (line.trim() === "quit") rl.close();
    else void dev.command(line);
  });
  await done;
  await dev.stop();
}

// Run as a program (deno run, bun run, node, npx conveyor-dev), not when imported.
const meta = import.meta as ImportMeta & { main?: boolean };
const invoked = meta.main ?? isMainOnNode();

function isMainOnNode(): boolean {
  try {
    // npx runs a symlink in node_modules/.bin: compare the real paths.
    return process.argv[1] !== undefined &&
      realpathSync(process.argv[1]) === realpathSync(fileURLToPath(import.meta.url));
  } catch {
    return false;
  }
}
if (invoked) {
  main().catch((err) => {
    process.stderr.write(`conveyor-dev: ${(err as Error).message}\n`);
    process.exit(1);
  });
}
