/**
 * `isMain(import.meta)`: whether a module is the program being run, rather
 * than imported (by its test, say). The examples serve their driver only
 * then.
 *
 * @module
 */
import { realpathSync } from "node:fs";
import process from "node:process";
import { fileURLToPath } from "node:url";

/**
 * `import.meta.main` where the runtime has it (Deno, Bun, Node 24+); on older
 * Node, whether the entry script (`process.argv[1]`, symlinks resolved, as
 * in `import.meta.url`) is this module's file.
 */
export function isMain(meta: ImportMeta): boolean {
  const main = (meta as ImportMeta & { main?: boolean }).main;
  if (typeof main === "boolean") return main;
  try {
    return realpathSync(process.argv[1] ?? "") === fileURLToPath(meta.url);
  } catch {
    return false;
  }
}
