/**
 * The runtime's metrics scraped by Prometheus: the OpenTelemetry Prometheus
 * exporter serves `/metrics` (port `METRICS_PORT`, default 9464) for a driver
 * against a local nats-server. After three events, the example scrapes itself
 * once and prints the runtime's series.
 *
 *     npm run example:prometheus
 *     deno run -A examples/prometheus.ts
 *
 * A scrape job for it:
 *
 *     scrape_configs:
 *       - job_name: conveyor-drivers
 *         static_configs: [{ targets: ["driver-host:9464"] }]
 *
 * @module
 */
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import process from "node:process";
import { PrometheusExporter } from "@opentelemetry/exporter-prometheus";
import { MeterProvider } from "@opentelemetry/sdk-metrics";
import { startDriver } from "../mod.ts";
import { createConveyorStreams, publishEvent, startNatsServer } from "../testing.ts";

// The exporter is a metric reader; its request handler is mounted on a
// server of our own, so the port can be chosen freely (0: any).
const exporter = new PrometheusExporter({ preventServerStart: true });
const meterProvider = new MeterProvider({ readers: [exporter] });
const server = createServer((req, res) => {
  if (req.url === "/metrics") return exporter.getMetricsRequestHandler(req, res);
  res.statusCode = 404;
  res.end();
});
await new Promise<void>((r) =>
  server.listen(Number(process.env.METRICS_PORT ?? 9464), "127.0.0.1", r)
);
const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/metrics`;
console.log(`metrics on ${url}`);

await using nats = await startNatsServer();
await createConveyorStreams(nats.url);
const running = await startDriver({
  name: "scraped",
  resources: ["pipeline"],
  reconcile({ resource }) {
    if (resource.name === "broken") return { success: false, message: "tests failed" };
  },
}, {
  servers: nats.url,
  handleSignals: false,
  configureLogging: false,
  // Or register it globally before the driver starts: metrics.setGlobalMeterProvider().
  telemetry: { meterProvider },
});
for (const name of ["web", "api", "broken"]) {
  await publishEvent(nats.url, { resource: "pipeline", name });
}
while (running.stats().succeeded + running.stats().failed < 3) {
  await new Promise((r) => setTimeout(r, 20));
}

const text = await (await fetch(url)).text();
// The runtime's series, histogram buckets left out for brevity.
const series = text.split("\n").filter((l) => /^(# (HELP|TYPE) )?conveyor_/.test(l));
console.log(series.filter((l) => !l.includes("_bucket{")).join("\n"));
await running.stop();
server.close();
await meterProvider.shutdown();
