#!/usr/bin/env node
// Builds the npm package into npm/ from the same .ts sources that Deno and Bun
// run directly (a replacement for Deno's dnt), and with --test runs the built
// tests on Node.
//
//   node scripts/build_npm.mjs                 build npm/
//   node scripts/build_npm.mjs --test          build, then run npm/*_test.js and
//                                              npm/examples/*_test.js on Node
//   node scripts/build_npm.mjs --test -- ARGS  ... passing ARGS to `node --test`
//                                              (e.g. --test-name-pattern=shutdown)
//   node scripts/build_npm.mjs --test --files=faults_test,cluster_test
//                                              ... only those test files
//
// The compiler settings are in tsconfig.build.json; the published entry points
// and the version come from deno.json, the dependencies from package.json, so
// the three never drift. Quiet on success, apart from the test runner's output.
import { spawn } from "node:child_process";
import {
  cpSync,
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { builtinModules } from "node:module";
import { dirname, join, relative, resolve, sep } from "node:path";
import process from "node:process";
import ts from "typescript";

const root = resolve(import.meta.dirname, "..");
const outDir = join(root, "npm");
const tsconfigPath = join(root, "tsconfig.build.json");
/** Folders of npm/ whose *_test.js files `--test` runs ("" is npm/ itself). */
const testDirs = ["", "examples"];
/** Non-TS folders the tests read at runtime, copied next to the built modules. */
const assetDirs = ["schemas", "testdata"];
/** Top-level files shipped with the package when present. */
const extraFiles = ["README.md", "LICENSE", "LICENSE.md", "LICENSE.txt"];
/** Modules that only the tests use: built, but never published. */
const isTestModule = (rel) =>
  /(^|\/)[^/]*_test\.ts$/.test(rel) || /(^|\/)test_[a-z_]+\.ts$/.test(rel) ||
  /^testdata\//.test(rel);
/** Sources compiled by tsc, hence not copied as assets (.d.ts files are copied). */
const isCompiledSource = (name) => /\.[cm]?tsx?$/.test(name) && !/\.d\.[cm]?ts$/.test(name);

class BuildError extends Error {}

function fail(msg) {
  throw new BuildError(msg);
}

function readJson(path) {
  try {
    return JSON.parse(readFileSync(path, "utf8"));
  } catch (err) {
    fail(`cannot read ${relative(root, path)}: ${err.message}`);
  }
}

const toPosix = (p) => p.split(sep).join("/");
/** "./mod.ts" -> "mod" (path relative to the root, without extension). */
const stem = (p) => toPosix(relative(root, resolve(root, p))).replace(/\.[cm]?tsx?$/, "");

function parseArgs(argv) {
  const dd = argv.indexOf("--");
  const own = dd < 0 ? argv : argv.slice(0, dd);
  const passthrough = dd < 0 ? [] : argv.slice(dd + 1);
  const opts = { test: false, passthrough, files: undefined };
  for (const a of own) {
    if (a === "--test") opts.test = true;
    else if (a.startsWith("--files=")) opts.files = a.slice(8).split(",").filter(Boolean);
    else if (a === "-h" || a === "--help") {
      process.stdout.write(
        "usage: node scripts/build_npm.mjs [--test [--files=a_test,b_test]] [-- <node --test arguments>]\n",
      );
      process.exit(0);
    } else fail(`unknown argument ${a} (usage: node scripts/build_npm.mjs [--test] [-- ARGS])`);
  }
  return opts;
}

/** deno.json "exports" as [subpath, source file relative to the root]. */
function entryPoints(deno) {
  let exp = deno.exports;
  if (typeof exp === "string") exp = { ".": exp };
  if (!exp || typeof exp !== "object" || Object.keys(exp).length === 0) {
    fail('deno.json has no "exports"');
  }
  return Object.entries(exp).map(([sub, file]) => {
    if (typeof file !== "string" || !/\.tsx?$/.test(file)) {
      fail(`deno.json exports["${sub}"] must name a .ts file, not ${JSON.stringify(file)}`);
    }
    const abs = resolve(root, file);
    if (!existsSync(abs)) fail(`deno.json exports["${sub}"]: ${file} does not exist`);
    return [sub, abs];
  });
}

const formatHost = {
  getCanonicalFileName: (f) => f,
  getCurrentDirectory: () => root,
  getNewLine: () => "\n",
};

function reportDiagnostics(diags) {
  const fmt = process.stderr.isTTY ? ts.formatDiagnosticsWithColorAndContext : ts.formatDiagnostics;
  process.stderr.write(fmt(diags, formatHost));
}

/** "./x.ts" -> "./x.js" for relative specifiers naming a TS source; else undefined. */
function rewrittenSpecifier(spec) {
  if (!/^\.\.?\//.test(spec) || /\.d\.[cm]?ts$/.test(spec)) return undefined;
  const m = /\.([cm]?)tsx?$/.exec(spec);
  return m ? spec.slice(0, m.index) + `.${m[1]}js` : undefined;
}

/**
 * A transformer completing `rewriteRelativeImportExtensions`, which in
 * TypeScript 5.9 (a) skips a dynamic `import("./x.ts")` in a block that uses
 * `await using` once that is downlevelled (as for decorators, see
 * microsoft/TypeScript#63287) and (b) leaves `./x.ts` in the emitted .d.ts
 * files (microsoft/TypeScript#61037), which older TypeScript versions and
 * other tools cannot resolve. Runs `before` the built-in transforms for the
 * JS (dynamic imports only: tsc rewrites the static ones itself) and
 * `afterDeclarations` for the .d.ts (every specifier).
 */
function rewriteSpecifiers(declarations) {
  return (context) => {
    const f = context.factory;
    const lit = (node) => {
      const to = node && ts.isStringLiteralLike(node) ? rewrittenSpecifier(node.text) : undefined;
      return to === undefined ? undefined : f.createStringLiteral(to);
    };
    const visit = (node) => {
      if (
        ts.isCallExpression(node) && node.expression.kind === ts.SyntaxKind.ImportKeyword
      ) {
        const to = lit(node.arguments[0]);
        if (to) {
          node = f.updateCallExpression(node, node.expression, node.typeArguments, [
            to,
            ...node.arguments.slice(1),
          ]);
        }
      } else if (declarations && ts.isImportDeclaration(node)) {
        const to = lit(node.moduleSpecifier);
        if (to) {
          node = f.updateImportDeclaration(
            node,
            node.modifiers,
            node.importClause,
            to,
            node.attributes,
          );
        }
      } else if (declarations && ts.isExportDeclaration(node)) {
        const to = lit(node.moduleSpecifier);
        if (to) {
          node = f.updateExportDeclaration(
            node,
            node.modifiers,
            node.isTypeOnly,
            node.exportClause,
            to,
            node.attributes,
          );
        }
      } else if (
        declarations && ts.isImportTypeNode(node) && ts.isLiteralTypeNode(node.argument)
      ) {
        const to = lit(node.argument.literal);
        if (to) {
          node = f.updateImportTypeNode(
            node,
            f.updateLiteralTypeNode(node.argument, to),
            node.attributes,
            node.qualifier,
            node.typeArguments,
            node.isTypeOf,
          );
        }
      }
      return ts.visitEachChild(node, visit, context);
    };
    return (sf) => (ts.isBundle(sf) ? sf : ts.visitEachChild(sf, visit, context));
  };
}

/** Compiles tsconfig.build.json's files plus the entry points into npm/. */
function compile(entries) {
  const parsed = ts.getParsedCommandLineOfConfigFile(tsconfigPath, {}, {
    ...ts.sys,
    onUnRecoverableConfigFileDiagnostic: (d) => {
      reportDiagnostics([d]);
      fail(`cannot read ${relative(root, tsconfigPath)}`);
    },
  });
  if (parsed.errors.length) {
    reportDiagnostics(parsed.errors);
    fail(`invalid ${relative(root, tsconfigPath)}`);
  }
  const options = { ...parsed.options, outDir, noEmit: false, noEmitOnError: true };
  const rootNames = [...new Set([...parsed.fileNames, ...entries.map(([, f]) => f)])];
  const program = ts.createProgram({
    rootNames,
    options,
    projectReferences: parsed.projectReferences,
  });
  const diags = ts.getPreEmitDiagnostics(program);
  const errors = diags.filter((d) => d.category === ts.DiagnosticCategory.Error);
  if (diags.length) reportDiagnostics(diags);
  if (errors.length) fail(`tsc reported ${errors.length} error(s); nothing emitted`);
  const emitted = program.emit(undefined, undefined, undefined, false, {
    before: [rewriteSpecifiers(false)],
    afterDeclarations: [rewriteSpecifiers(true)],
  });
  if (emitted.emitSkipped || emitted.diagnostics.length) {
    reportDiagnostics(emitted.diagnostics);
    fail("tsc failed to emit");
  }
  return program;
}

/**
 * The local modules reachable from the entry points (relative to the root,
 * without extension) and the bare specifiers they import.
 */
function publishedGraph(program, entries) {
  const seen = new Set();
  const bare = new Map(); // package name -> first importer
  const queue = entries.map(([, f]) => f);
  while (queue.length) {
    const file = queue.pop();
    if (seen.has(file)) continue;
    seen.add(file);
    const sf = program.getSourceFile(file);
    if (!sf) fail(`${relative(root, file)} is not part of the build`);
    for (const imp of ts.preProcessFile(sf.text, true, true).importedFiles) {
      const spec = imp.fileName;
      if (spec.startsWith(".") || spec.startsWith("/")) {
        const target = resolve(dirname(file), spec);
        if (!existsSync(target)) fail(`${relative(root, file)}: cannot find ${spec}`);
        if (/\.[cm]?tsx?$/.test(target)) queue.push(target);
      } else if (!spec.startsWith("node:") && !builtinModules.includes(spec)) {
        const name = spec.startsWith("@")
          ? spec.split("/").slice(0, 2).join("/")
          : spec.split("/")[0];
        if (!bare.has(name)) bare.set(name, relative(root, file));
      }
    }
  }
  const modules = [...seen].map((f) => toPosix(relative(root, f)));
  const tests = modules.filter(isTestModule);
  if (tests.length) fail(`published modules import test-only module(s): ${tests.join(", ")}`);
  return { modules: modules.map(stem).sort(), bare };
}

function writePackageJson(deno, pkg, entries, graph) {
  if (!deno.version) fail('deno.json has no "version"');
  const deps = pkg.dependencies ?? {};
  for (const [name, importer] of graph.bare) {
    if (!(name in deps)) {
      fail(`${importer} imports "${name}", which is not in package.json "dependencies"`);
    }
  }
  const exports = {};
  for (const [sub, file] of entries) {
    const s = stem(file);
    for (const ext of [".js", ".d.ts"]) {
      if (!existsSync(join(outDir, s + ext))) fail(`build did not produce npm/${s}${ext}`);
    }
    // The declarations use AsyncDisposable: each entry point pulls in the lib
    // that declares it, so that a consumer whose tsconfig has no "lib" (or an
    // older one) still type-checks, on TypeScript 5 and 7. tsc keeps the
    // source's directive in some files only, so it is ensured here.
    const dts = join(outDir, s + ".d.ts");
    const text = readFileSync(dts, "utf8");
    if (!text.includes('<reference lib="esnext.disposable"')) {
      const shebang = text.startsWith("#!") ? text.slice(0, text.indexOf("\n") + 1) : "";
      writeFileSync(
        dts,
        `${shebang}/// <reference lib="esnext.disposable" />\n${text.slice(shebang.length)}`,
      );
    }
    exports[sub] = { types: `./${s}.d.ts`, default: `./${s}.js` };
  }
  const main = exports["."];
  const files = [
    ...graph.modules.flatMap((m) => [`${m}.js`, `${m}.d.ts`]),
    ...extraFiles.filter((f) => existsSync(join(root, f))),
  ];
  const out = {
    name: deno.name ?? pkg.name,
    version: deno.version,
    description: pkg.description,
    license: deno.license ?? pkg.license,
    type: "module",
    ...(main ? { main: main.default, types: main.types } : {}),
    exports,
    ...(exports["./dev"] ? { bin: { "conveyor-dev": exports["./dev"].default } } : {}),
    files,
    // Checked against every runtime dependency by scripts/check_package.mjs.
    engines: pkg.engines ?? { node: ">=20.16" },
    dependencies: deps,
  };
  for (const k of ["repository", "homepage", "bugs", "keywords", "author"]) {
    if (pkg[k] !== undefined) out[k] = pkg[k];
  }
  writeFileSync(join(outDir, "package.json"), JSON.stringify(out, null, 2) + "\n");
}

function copyAssets() {
  for (const d of assetDirs) {
    const src = join(root, d);
    if (!existsSync(src)) continue;
    cpSync(src, join(outDir, d), {
      recursive: true,
      filter: (from) => !isCompiledSource(from),
    });
  }
  for (const f of extraFiles) {
    const src = join(root, f);
    if (existsSync(src)) cpSync(src, join(outDir, f));
  }
}

function build() {
  const deno = readJson(join(root, "deno.json"));
  const pkg = readJson(join(root, "package.json"));
  const entries = entryPoints(deno);
  rmSync(outDir, { recursive: true, force: true });
  mkdirSync(outDir, { recursive: true });
  const program = compile(entries);
  const graph = publishedGraph(program, entries);
  copyAssets();
  writePackageJson(deno, pkg, entries, graph);
}

/** Runs the built tests with `node --test`; resolves to the exit code. */
function runTests(passthrough, files) {
  // npm/*_test.js and npm/examples/*_test.js; --files names either
  // "a_test" or "examples/a_test".
  const tests = testDirs.flatMap((dir) =>
    existsSync(join(outDir, dir))
      ? readdirSync(join(outDir, dir)).map((f) => (dir ? `${dir}/${f}` : f))
      : []
  ).filter((f) => {
    const name = f.slice(0, -3);
    return f.endsWith("_test.js") &&
      (!files || files.includes(name) || files.includes(name.split("/").pop()));
  }).sort();
  if (tests.length === 0) fail("no npm/*_test.js to run");
  // The spec reporter reads better than TAP, which Node picks when its output
  // is piped (as scripts/test.mjs does); unless ARGS choose a reporter.
  const reporter = passthrough.some((a) => a.startsWith("--test-reporter"))
    ? []
    : ["--test-reporter=spec"];
  // Node 20 does not expand globs in `node --test` arguments: list the files.
  const args = [
    "--test",
    "--test-concurrency=1",
    "--test-timeout=120000",
    ...reporter,
    ...passthrough,
    ...tests.map((f) => toPosix(relative(root, join(outDir, f)))),
  ];
  const child = spawn(process.execPath, args, { cwd: root, stdio: "inherit" });
  const forward = (sig) => child.kill(sig);
  process.on("SIGINT", forward);
  process.on("SIGTERM", forward);
  return new Promise((res) => {
    child.on("error", (err) => {
      process.stderr.write(`build_npm: cannot run node --test: ${err.message}\n`);
      res(1);
    });
    child.on("exit", (code, signal) => {
      if (signal) process.stderr.write(`build_npm: node --test killed by ${signal}\n`);
      res(code ?? 1);
    });
  });
}

try {
  const opts = parseArgs(process.argv.slice(2));
  build();
  if (opts.test) process.exitCode = await runTests(opts.passthrough, opts.files);
} catch (err) {
  if (err instanceof BuildError) process.stderr.write(`build_npm: ${err.message}\n`);
  else process.stderr.write(`build_npm: ${err?.stack ?? err}\n`);
  process.exitCode = 1;
}
