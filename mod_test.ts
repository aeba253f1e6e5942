// The public surface: what mod.ts and testing.ts export is decided here, and
// the modules import each other one way only.
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import * as mod from "./mod.ts";
import * as testing from "./testing.ts";

describe("public API", () => {
  it("mod.ts exports exactly these values (types are checked by deno doc --lint)", () => {
    assert.deepEqual(Object.keys(mod).sort(), [
      "ApiNetworkError",
      "ApiTimeoutError",
      "AuthError",
      "Client",
      "ConfigError",
      "ConnectError",
      "ConsumerError",
      "ConveyorApiError",
      "ConveyorError",
      "ENV",
      "INSTRUMENTATION_SCOPE",
      "InvalidMessageError",
      "InvalidSpecError",
      "MESSAGES_STREAM",
      "METRICS",
      "OPERATIONS",
      "PermanentError",
      "PublishError",
      "RESULT_SUBJECT",
      "ReconcileTimeoutError",
      "ShutdownError",
      "StreamNotFoundError",
      "authFromEnv",
      "createIdentity",
      "defineDriver",
      "drain",
      "filterSubjects",
      "healthHandler",
      "parseDriverMessage",
      "parseDuration",
      "readSse",
      "resultMsgId",
      "serve",
      "startDriver",
    ]);
  });

  it("testing.ts exports exactly these values", () => {
    assert.deepEqual(Object.keys(testing).sort(), [
      "createConveyorStreams",
      "fetchNatsServer",
      "findNatsServer",
      "publishEvent",
      "readStream",
      "reconcileOnce",
      "startNatsServer",
      "startTestConveyor",
    ]);
  });

  it("has no import cycles among the modules", () => {
    const dir = fileURLToPath(new URL(".", import.meta.url));
    const ext = import.meta.url.endsWith(".js") ? ".js" : ".ts";
    const modules = readdirSync(dir).filter((f) =>
      f.endsWith(ext) && !f.endsWith(`_test${ext}`) && !f.endsWith(`.d${ext}`)
    );
    const graph = new Map<string, string[]>();
    for (const f of modules) {
      // Without comments: a JSDoc example may import the module itself.
      const text = readFileSync(`${dir}/${f}`, "utf8")
        .replace(/\/\*[\s\S]*?\*\//g, "")
        .replace(/^\s*\/\/.*$/gm, "");
      const deps = [...text.matchAll(/(?:from|import)\s*\(?\s*"\.\/([^"/]+)"/g)]
        .map((m) => m[1])
        .filter((d) => modules.includes(d));
      graph.set(f, [...new Set(deps)]);
    }
    assert.ok(graph.get(`manager${ext}`)!.length > 3, "the import reader sees imports");
    const state = new Map<string, "visiting" | "done">();
    const visit = (f: string, path: string[]) => {
      if (state.get(f) === "done") return;
      assert.notEqual(state.get(f), "visiting", `import cycle: ${[...path, f].join(" -> ")}`);
      state.set(f, "visiting");
      for (const d of graph.get(f)!) visit(d, [...path, f]);
      state.set(f, "done");
    };
    for (const f of modules) visit(f, []);
  });
});
