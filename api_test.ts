// The client-only entry, @conveyor/driver/client (api.ts), as a Web-only
// runtime gets it: bundled with no Node built-ins to resolve, then run in a
// JavaScript context that holds the Web globals and nothing else.
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { builtinModules } from "node:module";
import { fileURLToPath } from "node:url";
import vm from "node:vm";
import { X509Certificate } from "node:crypto";
import * as esbuild from "esbuild";
import { decodeProtectedHeader } from "jose";
import { startTestApiServer } from "./test_api_server.ts";
import { makeTestPki } from "./test_pki.ts";
import type * as Api from "./api.ts";

// The source beside this test: api.ts here, api.js in the npm build (tested there too).
const entry = ["api.ts", "api.js"]
  .map((f) => fileURLToPath(new URL(f, import.meta.url)))
  .find((f) => existsSync(f))!;

const builtins = new Set(builtinModules.flatMap((m) => [m, `node:${m}`]));

interface Bundle {
  code: string;
  /** Every module the bundle holds, as esbuild names them. */
  inputs: string[];
  /** Imports a Web-only runtime cannot satisfy, as "specifier (from importer)". */
  refused: string[];
}

/**
 * Bundles the entry for a platform with no built-in modules ("neutral"),
 * resolving the "worker" and "browser" conditions of the dependencies, as an
 * edge bundler does. Every Node built-in and the TCP transport is refused,
 * static or dynamic `import()` alike.
 */
async function bundle(format: "esm" | "iife"): Promise<Bundle> {
  const refused: string[] = [];
  const result = await esbuild.build({
    entryPoints: [entry],
    bundle: true,
    write: false,
    metafile: true,
    platform: "neutral",
    format,
    globalName: format === "iife" ? "conveyor" : undefined,
    target: "es2022",
    mainFields: ["module", "main"],
    conditions: ["worker", "browser"],
    logLevel: "silent",
    plugins: [{
      name: "web-only",
      setup(build) {
        build.onResolve({ filter: /.*/ }, (args) => {
          const id = args.path;
          if (builtins.has(id) || id.startsWith("node:") || id === "@nats-io/transport-node") {
            refused.push(`${id} (from ${args.importer.replace(/.*node_modules\//, "")})`);
            return { path: id, external: true };
          }
          return undefined;
        });
      },
    }],
  });
  return {
    code: result.outputFiles[0].text,
    inputs: Object.keys(result.metafile.inputs),
    refused,
  };
}

/** A context with the Web platform's globals only: no process, require, Deno or Bun. */
function webContext(): vm.Context {
  const g = globalThis as Record<string, unknown>;
  const names = [
    "fetch",
    "Request",
    "Response",
    "Headers",
    "URL",
    "URLSearchParams",
    "AbortController",
    "AbortSignal",
    "TextEncoder",
    "TextDecoder",
    "ReadableStream",
    "WritableStream",
    "TransformStream",
    "DOMException",
    "Event",
    "EventTarget",
    "crypto",
    "setTimeout",
    "clearTimeout",
    "setInterval",
    "clearInterval",
    "queueMicrotask",
    "structuredClone",
    "atob",
    "btoa",
    "console",
    "performance",
  ];
  return vm.createContext(Object.fromEntries(names.map((n) => [n, g[n]])));
}

async function load(): Promise<{ api: typeof Api; context: vm.Context }> {
  const { code, refused } = await bundle("iife");
  assert.deepEqual(refused, []);
  const context = webContext();
  vm.runInContext(code, context, { filename: "conveyor-client.js" });
  return { api: context.conveyor as typeof Api, context };
}

describe("@conveyor/driver/client in a Web-only runtime", () => {
  it("bundles without a Node built-in, the TCP transport or anything of NATS", async () => {
    const { code, inputs, refused } = await bundle("esm");
    assert.deepEqual(refused, [], "imports a Web-only runtime cannot resolve");
    assert.deepEqual(inputs.filter((i) => /@nats-io|node_modules\/nats/.test(i)), []);
    assert.ok(!/\brequire\(/.test(code), "the bundle calls require()");
    // The driver runtime is not in it either: only the client's own modules.
    const own = inputs.filter((i) => !i.includes("node_modules")).map((i) =>
      i.replace(/.*\//, "").replace(/\.[jt]s$/, "")
    ).sort();
    assert.deepEqual(own, [
      "_replay",
      "_util",
      "_x509",
      "api",
      "auth",
      "client",
      "errors",
      "sse",
      "types",
    ]);
  });

  it("loads where there is no process, require, Deno or Bun", async () => {
    const { api, context } = await load();
    assert.equal(
      vm.runInContext(
        "[typeof process, typeof require, typeof Deno, typeof Bun, typeof module].join()",
        context,
      ),
      "undefined,undefined,undefined,undefined,undefined",
    );
    assert.equal(typeof api.Client, "function");
    assert.equal(typeof api.createIdentity, "function");
    assert.equal(typeof api.ConveyorApiError, "function");
  });

  it("calls the API with a certificate identity given as PEM text, signing with Web Crypto", async () => {
    const { api } = await load();
    await using pki = await makeTestPki();
    const leaf = pki.leaves.p256;
    const leafDer = new X509Certificate(leaf.cert.pem).raw.toString("base64");
    await using server = await startTestApiServer({
      auth: (t) => {
        try {
          return decodeProtectedHeader(t).x5c?.[0] === leafDer;
        } catch {
          return false;
        }
      },
    });
    const identity = await api.createIdentity({
      cert: leaf.cert.pem,
      key: leaf.keys.pkcs8.pem,
      ca: pki.ca.cert.pem,
    });
    const client = new api.Client({ baseUrl: server.url, auth: identity });
    assert.equal((await client.health()).status, "healthy");
    await client.createResourceDefinition({
      name: "app",
      version: "1.0.0",
      schema: { type: "object" },
    });
    const { runid } = await client.createResource({ name: "web", resource: "app", spec: {} });
    assert.match(runid, /^[0-9a-f-]{36}$/);
    assert.equal((await client.getResource("app", "web")).name, "web");
    assert.match(server.requests.at(-1)!.headers.authorization ?? "", /^Bearer ey/);

    // Its errors are the entry's own classes, with the server's status.
    const missing = await client.getResource("app", "nope").catch((e) => e);
    assert.ok(missing instanceof api.ConveyorApiError, `${missing}`);
    assert.equal(missing.notFound, true);
  });

  it("streams a run's logs over SSE", async () => {
    const { api } = await load();
    await using server = await startTestApiServer();
    const client = new api.Client({ baseUrl: server.url, auth: false });
    const runId = crypto.randomUUID();
    const ac = new AbortController();
    const seen: string[] = [];
    const reading = (async () => {
      for await (const line of client.streamPipelineLogs({ runId, signal: ac.signal })) {
        seen.push(line.message);
        if (seen.length === 2) ac.abort();
      }
    })();
    await server.waitForStreams(1);
    for (const message of ["first", "second"]) {
      server.pushLog({
        driver: "edge",
        runid: runId,
        timestamp: new Date().toISOString(),
        message,
      });
    }
    await reading;
    assert.deepEqual(seen, ["first", "second"]);
  });

  it("refuses certificate files, for want of a file system, with an AuthError that says what to do", async () => {
    const { api } = await load();
    const err = await api.createIdentity({ certFile: "/etc/conveyor/client.crt" }).catch((e) => e);
    assert.ok(err instanceof api.AuthError, `${err}`);
    assert.match(err.message, /cannot read client certificate file \/etc\/conveyor\/client\.crt/);
    assert.match(err.message, /no file system.*PEM text/);
  });
});
