import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import process from "node:process";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { AuthError, ConnectError, createIdentity, startDriver } from "./mod.ts";
import { createConveyorStreams, publishEvent, readStream, startNatsServer } from "./testing.ts";
import type { NatsServer } from "./testing.ts";
import { makeTestPki, type TestPki } from "./test_pki.ts";
import { waitFor } from "./test_util.ts";
import { startTestApiServer } from "./test_api_server.ts";

const quiet = { handleSignals: false, configureLogging: false } as const;

describe("NATS with mutual TLS", () => {
  let pki: TestPki;
  let server: NatsServer;
  let nc: NatsConnection;

  before(async () => {
    pki = await makeTestPki();
    const leaf = pki.leaves.p256;
    // The server requires client certificates issued by the test CA.
    server = await startNatsServer({
      args: [
        "--tlsverify",
        "--tlscert",
        leaf.cert.path,
        "--tlskey",
        leaf.keys.pkcs8.path,
        "--tlscacert",
        pki.ca.cert.path,
      ],
    });
    nc = await connect({
      servers: server.url,
      tls: { cert: leaf.cert.pem, key: leaf.keys.pkcs8.pem, ca: pki.ca.cert.pem },
    });
    await createConveyorStreams(nc);
  });

  after(async () => {
    await nc?.close();
    await server?.stop();
    await pki?.cleanup();
  });

  it("accepts a driver with the operator-issued identity (files, SEC1 key) and runs it", async () => {
    const rsa = pki.leaves.rsa;
    const seen: string[] = [];
    await using _d = await startDriver({
      name: "secure",
      resources: ["pipeline"],
      reconcile({ resource }) {
        seen.push(resource.name);
        return { success: true, message: "over mTLS" };
      },
    }, {
      servers: server.url,
      ...quiet,
      auth: {
        certFile: pki.leaves.p384.cert.path,
        keyFile: pki.leaves.p384.keys.traditional.path,
        caFile: pki.ca.cert.path,
      },
    });
    await publishEvent(nc, { resource: "pipeline", name: "web" });
    const [r] = await waitFor(async () => {
      const r = await readStream(nc, "pipeline-engine");
      return r.length ? r : undefined;
    }, "result over mTLS");
    assert.equal(
      (r.json as { driverresult: { message: string } }).driverresult.message,
      "over mTLS",
    );
    assert.deepEqual(seen, ["web"]);
    // An Identity made beforehand works the same (RSA, PKCS#1).
    const identity = await createIdentity({
      cert: rsa.cert.pem,
      key: rsa.keys.traditional.pem,
      ca: pki.ca.cert.pem,
    });
    await using _e = await startDriver({
      name: "secure-rsa",
      resources: ["image"],
      reconcile() {},
    }, { servers: server.url, ...quiet, auth: identity });
  });

  it("gives reconcile a ctx.client for CONVEYOR_API_URL that signs with the same identity", async () => {
    const leaf = pki.leaves.p256;
    const identity = await createIdentity({
      cert: leaf.cert.pem,
      key: leaf.keys.traditional.pem,
      ca: pki.ca.cert.pem,
    });
    // The test API accepts only tokens carrying this leaf in x5c.
    await using api = await startTestApiServer({
      auth: (token) => {
        const header = JSON.parse(atob(token.split(".")[0].replace(/-/g, "+").replace(/_/g, "/")));
        return header.x5c?.[0] === identity.chain[0];
      },
    });
    const saved = process.env.CONVEYOR_API_URL;
    process.env.CONVEYOR_API_URL = api.url;
    const answers: unknown[] = [];
    try {
      await using _d = await startDriver({
        name: "api-user",
        resources: ["pipeline"],
        async reconcile({ client, runId }) {
          assert.ok(client, "ctx.client is set");
          answers.push(await client.listLogs({ runId }));
          return { success: true, message: "asked the API" };
        },
      }, { servers: server.url, ...quiet, auth: identity });
      const e = await publishEvent(nc, { resource: "pipeline", name: "web" });
      await waitFor(() => answers.length === 1, "the reconcile's API call");
      const call = api.requests.find((r) => r.path.startsWith("/logs"))!;
      assert.equal(call.query.runid, e.message.run_id);
      assert.match(String(call.headers.authorization), /^Bearer [\w-]+\.[\w-]+\.[\w-]+$/);
      assert.deepEqual(answers[0], []);
    } finally {
      if (saved === undefined) delete process.env.CONVEYOR_API_URL;
      else process.env.CONVEYOR_API_URL = saved;
    }
  });

  it("reads the identity from CONVEYOR_CERT_FILE, CONVEYOR_KEY_FILE and CONVEYOR_CA_FILE", async () => {
    const leaf = pki.leaves.p521;
    const saved = { ...process.env };
    process.env.CONVEYOR_CERT_FILE = leaf.cert.path;
    process.env.CONVEYOR_KEY_FILE = leaf.keys.pkcs8.path;
    process.env.CONVEYOR_CA_FILE = pki.ca.cert.path;
    try {
      await using running = await startDriver({
        name: "from-env",
        resources: ["pipeline"],
        reconcile() {},
      }, { servers: server.url, ...quiet });
      assert.equal(running.name, "from-env");
    } finally {
      for (const k of ["CONVEYOR_CERT_FILE", "CONVEYOR_KEY_FILE", "CONVEYOR_CA_FILE"]) {
        if (saved[k] === undefined) delete process.env[k];
        else process.env[k] = saved[k];
      }
    }
  });

  it("refuses a driver without an identity, with an error that says what to set", async () => {
    await assert.rejects(
      startDriver({ name: "anon", resources: ["pipeline"], reconcile() {} }, {
        servers: server.url,
        ...quiet,
        connectTimeout: 1_000,
        // Trust the server, but present no client certificate.
        nats: { tls: { ca: pki.ca.cert.pem } },
      }),
      (err) =>
        err instanceof ConnectError && err.cause !== undefined &&
        /CONVEYOR_CERT_FILE/.test(err.message),
    );
  });

  it("refuses a driver whose certificate another CA issued", async () => {
    const stranger = pki.other.leaf;
    const driver = { name: "stranger", resources: ["pipeline"], reconcile() {} };
    // Given the CA, the identity itself is refused before anything connects.
    await assert.rejects(
      startDriver(driver, {
        servers: server.url,
        ...quiet,
        connectTimeout: 1_000,
        auth: { cert: stranger.cert.pem, key: stranger.keys.pkcs8.pem, ca: pki.ca.cert.pem },
      }),
      (err) => err instanceof AuthError && /was not issued by the CA/.test(err.message),
    );
    // Without it, the NATS server's TLS check is what refuses.
    await assert.rejects(
      startDriver(driver, {
        servers: server.url,
        ...quiet,
        connectTimeout: 1_000,
        auth: { cert: stranger.cert.pem, key: stranger.keys.pkcs8.pem },
        nats: { tls: { ca: pki.ca.cert.pem } },
      }),
      (err) => err instanceof ConnectError && err.cause !== undefined,
    );
  });

  it("refuses, before connecting, a certificate whose usages leave out clientAuth", async () => {
    const serverOnly = pki.issue({ name: "nats-server-only", extensions: "leaf_server_only" });
    // What the check spares the user: NATS refuses such a client certificate.
    await assert.rejects(
      connect({
        servers: server.url,
        tls: { cert: serverOnly.cert.pem, key: serverOnly.key.pem, ca: pki.ca.cert.pem },
        timeout: 2_000,
        reconnect: false,
      }).then((c) => c.close()),
    );
    await assert.rejects(
      startDriver({ name: "server-only", resources: ["pipeline"], reconcile() {} }, {
        // Nothing listens here: had it tried to connect, this would be a ConnectError.
        servers: "nats://127.0.0.1:1",
        ...quiet,
        auth: {
          certFile: serverOnly.cert.path,
          keyFile: serverOnly.key.path,
          caFile: pki.ca.cert.path,
        },
      }),
      (err) =>
        err instanceof AuthError &&
        /"CN=nats-server-only, O=Conveyor tests" lists the extended key usages serverAuth but not clientAuth/
          .test(err.message),
    );
  });
});
