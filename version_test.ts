// One version for JSR and npm (scripts/version.mjs): deno.json, package.json
// and CHANGELOG.md agree, and a bump moves all three.
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
// The npm build's copy of this test runs from npm/, one level below the sources.
const repoUrl = new URL(import.meta.url.endsWith(".js") ? ".." : ".", import.meta.url);
const repo = fileURLToPath(repoUrl);
const { bump, nextVersion, versionProblems }: typeof import("./scripts/version.mjs") = await import(
  new URL("./scripts/version.mjs", repoUrl.href.replace(/\/?$/, "/")).href
);

describe("one version", () => {
  it("deno.json, package.json and CHANGELOG.md agree in this repository", () => {
    assert.deepEqual(versionProblems(), []);
  });

  it("computes the next version", () => {
    assert.equal(nextVersion("0.1.0", "patch"), "0.1.1");
    assert.equal(nextVersion("0.1.9", "minor"), "0.2.0");
    assert.equal(nextVersion("1.2.3", "major"), "2.0.0");
    assert.equal(nextVersion("1.2.3", "1.4.0-rc.1"), "1.4.0-rc.1");
    assert.throws(() => nextVersion("1.2.3", "next"), /expected patch, minor, major or X\.Y\.Z/);
  });

  it("bumps deno.json and package.json together and dates the Unreleased section", () => {
    const dir = mkdtempSync(join(tmpdir(), "conveyor-version-"));
    try {
      for (const f of ["deno.json", "package.json", "CHANGELOG.md"]) {
        copyFileSync(join(repo, f), join(dir, f));
      }
      const before = JSON.parse(readFileSync(join(dir, "deno.json"), "utf8")).version;
      const next = bump("minor", "2026-12-01", dir);
      assert.equal(next, nextVersion(before, "minor"));
      for (const f of ["deno.json", "package.json"]) {
        assert.equal(JSON.parse(readFileSync(join(dir, f), "utf8")).version, next, f);
      }
      const changelog = readFileSync(join(dir, "CHANGELOG.md"), "utf8");
      assert.match(changelog, new RegExp(`## Unreleased\\n\\n## ${next} - 2026-12-01\\n`));
      assert.deepEqual(versionProblems(dir), []);
      // Nothing new under Unreleased: no release.
      assert.throws(() => bump("patch", "2026-12-02", dir), /Unreleased section is empty/);
      // A version changed by hand in one place only is caught.
      writeFileSync(
        join(dir, "package.json"),
        readFileSync(join(dir, "package.json"), "utf8").replace(
          `"version": "${next}"`,
          '"version": "9.9.9"',
        ),
      );
      assert.match(
        versionProblems(dir).join(),
        /package\.json version 9\.9\.9 is not deno\.json's/,
      );
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
