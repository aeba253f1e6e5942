// One version for JSR and npm: deno.json's "version" is the source of truth
// (scripts/build_npm.mjs copies it into the npm package); package.json keeps
// the same value, and CHANGELOG.md has a section for it.
//
//   node scripts/version.mjs              checks that the three agree (exit 1 if not)
//   node scripts/version.mjs patch|minor|major|X.Y.Z
//                                         sets the version in deno.json and package.json
//                                         and turns "## Unreleased" into "## X.Y.Z - <date>"
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const repo = join(dirname(fileURLToPath(import.meta.url)), "..");
const filesOf = (root) => ({
  deno: join(root, "deno.json"),
  pkg: join(root, "package.json"),
  changelog: join(root, "CHANGELOG.md"),
});
const read = (f) => readFileSync(f, "utf8");
const json = (f) => JSON.parse(read(f));
const SEMVER = /^(\d+)\.(\d+)\.(\d+)(?:-[0-9A-Za-z.-]+)?$/;

/** What disagrees, as sentences; empty when the three agree. */
export function versionProblems(root = repo) {
  const files = filesOf(root);
  const deno = json(files.deno).version;
  const pkg = json(files.pkg).version;
  const problems = [];
  if (!SEMVER.test(deno ?? "")) {
    problems.push(`deno.json version ${JSON.stringify(deno)} is not semver`);
  }
  if (pkg !== deno) problems.push(`package.json version ${pkg} is not deno.json's ${deno}`);
  const changelog = read(files.changelog);
  const released = [...changelog.matchAll(/^## (\d+\.\d+\.\d+\S*) - \d{4}-\d{2}-\d{2}$/gm)].map((
    m,
  ) => m[1]);
  if (!/^## Unreleased$/m.test(changelog)) {
    problems.push('CHANGELOG.md has no "## Unreleased" section');
  }
  // Before the first release, 0.1.0 is the working version; after it, the
  // newest section must be deno.json's version.
  if (released.length > 0 && released[0] !== deno) {
    problems.push(`CHANGELOG.md's newest release is ${released[0]}, deno.json says ${deno}`);
  }
  return problems;
}

/** The version after `current` for `how` (patch, minor, major, or an explicit X.Y.Z). */
export function nextVersion(current, how) {
  if (SEMVER.test(how)) return how;
  const m = SEMVER.exec(current);
  if (!m) throw new Error(`current version ${current} is not semver`);
  const [major, minor, patch] = m.slice(1, 4).map(Number);
  if (how === "patch") return `${major}.${minor}.${patch + 1}`;
  if (how === "minor") return `${major}.${minor + 1}.0`;
  if (how === "major") return `${major + 1}.0.0`;
  throw new Error(`expected patch, minor, major or X.Y.Z, got ${how}`);
}

/** Sets the version everywhere and dates the Unreleased section; returns it. */
export function bump(how, today = new Date().toISOString().slice(0, 10), root = repo) {
  const files = filesOf(root);
  const problems = versionProblems(root);
  if (problems.length > 0) throw new Error(`fix these first: ${problems.join("; ")}`);
  const current = json(files.deno).version;
  const next = nextVersion(current, how);
  const changelog = read(files.changelog);
  const unreleased = /^## Unreleased\n([\s\S]*?)(?=^## |(?![\s\S]))/m.exec(changelog);
  if (!unreleased || unreleased[1].trim() === "") {
    throw new Error("CHANGELOG.md's Unreleased section is empty: say what changed first");
  }
  writeFileSync(
    files.changelog,
    changelog.replace(/^## Unreleased\n/m, `## Unreleased\n\n## ${next} - ${today}\n`),
  );
  for (const f of [files.deno, files.pkg]) {
    // Only the "version" line changes, so the files keep their formatting.
    writeFileSync(f, read(f).replace(/("version":\s*")[^"]*(")/, `$1${next}$2`));
  }
  return next;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const how = process.argv[2];
  try {
    if (how === undefined) {
      const problems = versionProblems();
      for (const p of problems) process.stderr.write(`version: ${p}\n`);
      if (problems.length > 0) process.exit(1);
      process.stdout.write(
        `version: ${
          json(filesOf(repo).deno).version
        } (deno.json, package.json, CHANGELOG.md agree)\n`,
      );
    } else {
      process.stdout.write(`version: ${bump(how)}\n`);
    }
  } catch (err) {
    process.stderr.write(`version: ${err.message}\n`);
    process.exit(1);
  }
}
