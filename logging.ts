/**
 * Console output when the application has not set LogTape up. A library must
 * not take over logging, so this only acts when LogTape has no configuration.
 *
 * @module
 */
import { configure, getConfig, getConsoleSink } from "@logtape/logtape";
import type { ResolvedOptions } from "./options.ts";

/**
 * Configures a console sink for `["conveyor"]` at `CONVEYOR_LOG_LEVEL` unless
 * LogTape is configured already or `configureLogging` is false.
 */
export async function ensureLogging(
  o: Pick<ResolvedOptions, "configureLogging" | "logLevel">,
): Promise<void> {
  if (!o.configureLogging || getConfig() !== null) return;
  try {
    await configure({
      sinks: { console: getConsoleSink() },
      loggers: [
        { category: ["conveyor"], lowestLevel: o.logLevel, sinks: ["console"] },
        {
          category: ["logtape", "meta"],
          lowestLevel: "warning",
          sinks: ["console"],
        },
      ],
    });
  } catch {
    // Configured concurrently by someone else: theirs wins.
  }
}
