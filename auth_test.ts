import { after, afterEach, describe, it } from "node:test";
import assert from "node:assert/strict";
import {
  constants,
  createHash,
  generateKeyPairSync,
  type KeyObject,
  verify,
  X509Certificate,
} from "node:crypto";
import { Buffer } from "node:buffer";
import { execFileSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import process from "node:process";
import { authFromEnv, type AuthOptions, createIdentity, type JwtAlgorithm } from "./auth.ts";
import { AuthError, ConfigError } from "./errors.ts";
import { makeTestPki, type PemFile, type TestKeyType, type TestLeaf } from "./test_pki.ts";

// One PKI for the whole file: RSA keys take a moment to generate.
const pki = await makeTestPki();
after(() => pki.cleanup());

const ENV_NAMES = ["CONVEYOR_CERT_FILE", "CONVEYOR_KEY_FILE", "CONVEYOR_CA_FILE"];
const savedEnv = Object.fromEntries(ENV_NAMES.map((k) => [k, process.env[k]]));
function restoreEnv(): void {
  for (const k of ENV_NAMES) {
    if (savedEnv[k] === undefined) delete process.env[k];
    else process.env[k] = savedEnv[k];
  }
}
// Tests must not pick up a developer's real identity.
for (const k of ENV_NAMES) delete process.env[k];

const ALGORITHMS: Record<TestKeyType, JwtAlgorithm> = {
  rsa: "RS256",
  p256: "ES256",
  p384: "ES384",
  p521: "ES512",
};
const HASHES: Record<JwtAlgorithm, string> = {
  RS256: "sha256",
  PS256: "sha256",
  ES256: "sha256",
  ES384: "sha384",
  ES512: "sha512",
};

interface Decoded {
  header: Record<string, unknown>;
  payload: Record<string, unknown>;
}

const decodePart = (part: string): Record<string, unknown> =>
  JSON.parse(Buffer.from(part, "base64url").toString("utf8"));

/**
 * Checks a token the way the Conveyor server does, with node:crypto only
 * (independent of the signing code): x5c form and chain up to the CA, the
 * signature with the leaf's key, the cnf thumbprint, iat and exp.
 */
function verifyToken(
  jwt: string,
  expect: { algorithm: JwtAlgorithm; leaf: PemFile; ca: PemFile; lifetime?: number },
): Decoded {
  const parts = jwt.split(".");
  assert.equal(parts.length, 3, "a JWS compact serialization");
  const [h, p, s] = parts;
  const header = decodePart(h);
  const payload = decodePart(p);
  assert.equal(header.alg, expect.algorithm);
  assert.equal(header.typ, "JWT");

  // x5c: padded standard base64 (not base64url), leaf first.
  const x5c = header.x5c as string[];
  assert.ok(Array.isArray(x5c) && x5c.length >= 1, "x5c is a non-empty array");
  for (const entry of x5c) {
    assert.match(entry, /^[A-Za-z0-9+/]+={0,2}$/);
    assert.equal(entry.length % 4, 0, "padded");
    assert.equal(Buffer.from(entry, "base64").toString("base64"), entry);
  }
  const certs = x5c.map((b64) => new X509Certificate(Buffer.from(b64, "base64")));
  assert.deepEqual(certs[0].raw, new X509Certificate(expect.leaf.pem).raw, "leaf first");

  // The chain up to the CA.
  const ca = new X509Certificate(expect.ca.pem);
  const issuers = [...certs.slice(1), ca];
  certs.forEach((cert, i) => {
    assert.ok(cert.checkIssued(issuers[i]), `x5c[${i}] is issued by the next one`);
    assert.ok(cert.verify(issuers[i].publicKey), `x5c[${i}] is signed by the next one`);
  });
  assert.equal(certs.at(-1)!.verify(new X509Certificate(pki.other.ca.cert.pem).publicKey), false);

  // The signature, with the leaf's public key; ECDSA in JOSE's raw r||s form.
  const data = Buffer.from(`${h}.${p}`);
  const signature = Buffer.from(s, "base64url");
  const key: KeyObject = certs[0].publicKey;
  const alg = expect.algorithm;
  const keyOptions = alg === "PS256"
    ? { key, padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: 32 }
    : alg.startsWith("ES")
    ? { key, dsaEncoding: "ieee-p1363" as const }
    : { key, padding: constants.RSA_PKCS1_PADDING };
  assert.ok(verify(HASHES[alg], data, keyOptions, signature), `${alg} signature verifies`);

  // Claims: cnf binds the leaf; iat not ahead of us; exp - iat is the lifetime.
  const thumbprint = createHash("sha256").update(certs[0].raw).digest("base64url");
  assert.deepEqual(payload.cnf, { "x5t#S256": thumbprint });
  assert.deepEqual(Object.keys(payload).sort(), ["cnf", "exp", "iat"]);
  const { iat, exp } = payload as { iat: number; exp: number };
  assert.ok(Number.isInteger(iat) && Number.isInteger(exp), "whole seconds");
  assert.ok(iat <= Date.now() / 1000, "iat is not in the future");
  assert.ok(exp > Date.now() / 1000, "exp is in the future");
  assert.equal(exp - iat, (expect.lifetime ?? 120_000) / 1000);
  return { header, payload };
}

/**
 * Runs `fn` with `Date.now()` answering `at` plus the real time elapsed since,
 * then restores it: the identity's cache and expiry checks read Date.now().
 */
async function withClock<T>(at: number, fn: () => Promise<T>): Promise<T> {
  const realNow = Date.now;
  const offset = at - realNow();
  Date.now = () => realNow() + offset;
  try {
    return await fn();
  } finally {
    Date.now = realNow;
  }
}

/** File options for a leaf and one of its key formats. */
function files(leaf: TestLeaf, format: "pkcs8" | "traditional"): AuthOptions {
  return { certFile: leaf.cert.path, keyFile: leaf.keys[format].path, caFile: pki.ca.cert.path };
}

/** Asserts that `promise` rejects with an AuthError whose message matches every pattern. */
async function rejectsAuth(promise: Promise<unknown>, ...patterns: RegExp[]): Promise<AuthError> {
  const err = await promise.then(
    () => assert.fail("expected an AuthError"),
    (e: unknown) => e,
  );
  assert.ok(err instanceof AuthError, `AuthError expected, got ${err}`);
  assert.equal(err.name, "AuthError");
  for (const p of patterns) assert.match(err.message, p);
  return err;
}

describe("createIdentity", () => {
  for (const type of Object.keys(ALGORITHMS) as TestKeyType[]) {
    const algorithm = ALGORITHMS[type];
    const traditional = type === "rsa" ? "PKCS#1" : "SEC1";
    for (const [format, label] of [["pkcs8", "PKCS#8"], ["traditional", traditional]] as const) {
      it(`signs ${algorithm} tokens with a ${type} ${label} key file`, async () => {
        const leaf = pki.leaves[type];
        const identity = await createIdentity(files(leaf, format));
        assert.equal(identity.algorithm, algorithm);
        const { header } = verifyToken(await identity.token(), {
          algorithm,
          leaf: leaf.cert,
          ca: pki.ca.cert,
        });
        assert.deepEqual(header.x5c, identity.chain);
        assert.equal(identity.chain.length, 1);
        assert.equal(
          identity.thumbprint,
          createHash("sha256").update(new X509Certificate(leaf.cert.pem).raw).digest("base64url"),
        );
      });
    }
    it(`signs ${algorithm} tokens from PEM strings (${type})`, async () => {
      const leaf = pki.leaves[type];
      for (const format of ["pkcs8", "traditional"] as const) {
        const identity = await createIdentity({ cert: leaf.cert.pem, key: leaf.keys[format].pem });
        verifyToken(await identity.token(), { algorithm, leaf: leaf.cert, ca: pki.ca.cert });
      }
    });
  }

  it("signs PS256 when asked, with either RSA key format", async () => {
    const leaf = pki.leaves.rsa;
    for (const format of ["pkcs8", "traditional"] as const) {
      const identity = await createIdentity({ ...files(leaf, format), rsaAlgorithm: "PS256" });
      assert.equal(identity.algorithm, "PS256");
      verifyToken(await identity.token(), { algorithm: "PS256", leaf: leaf.cert, ca: pki.ca.cert });
    }
  });

  it("picks the EC algorithm by curve whatever rsaAlgorithm says", async () => {
    const identity = await createIdentity({
      ...files(pki.leaves.p384, "pkcs8"),
      rsaAlgorithm: "PS256",
    });
    assert.equal(identity.algorithm, "ES384");
  });

  it("sends the whole chain, leaf first, and it verifies up to the CA", async () => {
    const leaf = pki.chained;
    const identity = await createIdentity({
      certFile: leaf.cert.path,
      keyFile: leaf.keys.traditional.path,
    });
    assert.equal(identity.chain.length, 2);
    const { header } = verifyToken(await identity.token(), {
      algorithm: "ES256",
      leaf: leaf.cert,
      ca: pki.ca.cert,
    });
    const intermediate = new X509Certificate(leaf.intermediate.pem);
    assert.deepEqual(Buffer.from((header.x5c as string[])[1], "base64"), intermediate.raw);
  });

  it("takes a SEC1 key preceded by its EC PARAMETERS block (openssl ecparam -genkey)", async () => {
    const leaf = pki.leaves.p256;
    // The DER of the P-256 curve OID.
    const params = "-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n";
    const identity = await createIdentity({
      cert: leaf.cert.pem,
      key: params + leaf.keys.traditional.pem,
    });
    verifyToken(await identity.token(), { algorithm: "ES256", leaf: leaf.cert, ca: pki.ca.cert });
  });

  it("takes EC keys without their public key (openssl ec -no_public)", async () => {
    const leaf = pki.leaves.p384;
    const openssl = (args: string[], input?: Buffer): string =>
      execFileSync("openssl", args, { input, stdio: ["pipe", "pipe", "ignore"] }).toString();
    const sec1 = openssl(["ec", "-in", leaf.keys.pkcs8.path, "-no_public"]);
    const pkcs8 = openssl(["pkcs8", "-topk8", "-nocrypt"], Buffer.from(sec1));
    for (const key of [sec1, pkcs8]) {
      const identity = await createIdentity({ cert: leaf.cert.pem, key });
      verifyToken(await identity.token(), { algorithm: "ES384", leaf: leaf.cert, ca: pki.ca.cert });
    }
  });

  it("honours tokenLifetime", async () => {
    const identity = await createIdentity({
      ...files(pki.leaves.p256, "pkcs8"),
      tokenLifetime: 30_000,
    });
    const { payload } = verifyToken(await identity.token(), {
      algorithm: "ES256",
      leaf: pki.leaves.p256.cert,
      ca: pki.ca.cert,
      lifetime: 30_000,
    });
    // Backdated against clock skew, but by no more than a few seconds.
    assert.ok((payload.iat as number) >= Date.now() / 1000 - 7);
  });

  it("caches the token and renews it near expiry, once for concurrent callers", async () => {
    const leaf = pki.leaves.p256; // ECDSA: two signings never give the same token
    const identity = await createIdentity({ ...files(leaf, "pkcs8"), tokenLifetime: 40_000 });
    const first = await identity.token();
    assert.equal(await identity.token(), first);
    const same = await Promise.all([identity.token(), identity.token(), identity.token()]);
    assert.deepEqual(same, [first, first, first]);

    // Renewed once less than a quarter of the lifetime (10 s) is left: the
    // clock is moved rather than waited for.
    const { exp } = decodePart(first.split(".")[1]) as { exp: number };
    const before = await withClock(exp * 1000 - 10_000 - 50, () => identity.token());
    assert.equal(before, first, "still more than a quarter left");
    const renewed = await withClock(
      exp * 1000 - 10_000 + 50,
      () => Promise.all([identity.token(), identity.token(), identity.token()]),
    );
    assert.notEqual(renewed[0], first);
    assert.deepEqual(renewed, [renewed[0], renewed[0], renewed[0]], "one signing for all callers");
    const payload = decodePart(renewed[0].split(".")[1]) as { iat: number; exp: number };
    assert.ok(payload.exp > exp);
    assert.equal(payload.exp - payload.iat, 40);
    assert.equal(await withClock(exp * 1000 - 9_000, () => identity.token()), renewed[0]);
  });

  it("never hands out a token with less than 7.5 s left, whatever the lifetime", async () => {
    // The shortest lifetime allowed (30 s): a token is renewed when a quarter
    // (7.5 s) is left, and iat is backdated 5 s against clock skew.
    const identity = await createIdentity({
      ...files(pki.leaves.p256, "pkcs8"),
      tokenLifetime: 30_000,
    });
    const start = Date.now();
    for (let t = start; t < start + 120_000; t += 500) {
      const jwt = await withClock(t, () => identity.token());
      const { exp, iat } = decodePart(jwt.split(".")[1]) as { exp: number; iat: number };
      assert.ok(
        exp * 1000 - t >= 7_500,
        `at +${t - start} ms the token has ${exp * 1000 - t} ms left`,
      );
      assert.ok(iat * 1000 <= t, "iat not ahead of the clock");
    }
  });

  it("describes the leaf certificate", async () => {
    const identity = await createIdentity(files(pki.chained, "pkcs8"));
    const info = identity.certificate;
    assert.equal(info.subject, "CN=leaf-chained, O=Conveyor tests");
    assert.equal(info.issuer, "CN=intermediate, O=Conveyor tests");
    const x509 = new X509Certificate(pki.chained.cert.pem); // the leaf, first in the file
    assert.equal(info.notBefore.getTime(), new Date(x509.validFrom).getTime());
    assert.equal(info.notAfter.getTime(), new Date(x509.validTo).getTime());
    assert.deepEqual(info.extKeyUsage, ["serverAuth", "clientAuth"]);
    const plain = pki.issue({ name: "described-no-eku", extensions: "leaf_no_eku" });
    const noEku = await createIdentity({ cert: plain.cert.pem, key: plain.key.pem });
    assert.equal(noEku.certificate.extKeyUsage, undefined);
  });

  it("refuses to sign once the certificate has expired", async () => {
    const identity = await createIdentity(files(pki.leaves.p256, "pkcs8"));
    const after = identity.certificate.notAfter.getTime() + 1_000;
    await rejectsAuth(
      withClock(after, () => identity.token()),
      /client certificate "CN=leaf-p256, O=Conveyor tests" expired on/,
      /renew the certificate/,
    );
  });

  it("hands out the PEM material for mutual TLS", async () => {
    const leaf = pki.leaves.rsa;
    const identity = await createIdentity(files(leaf, "traditional"));
    assert.deepEqual(identity.tls(), {
      cert: leaf.cert.pem,
      key: leaf.keys.traditional.pem,
      ca: pki.ca.cert.pem,
    });
    const noCa = await createIdentity({ cert: leaf.cert.pem, key: leaf.keys.pkcs8.pem });
    assert.deepEqual(noCa.tls(), { cert: leaf.cert.pem, key: leaf.keys.pkcs8.pem });
    assert.equal("ca" in noCa.tls(), false);
    // Only the certificates reach TLS, not what else the file holds.
    const messy = await createIdentity({
      cert: `Bag Attributes\n    friendlyName: client\n${leaf.cert.pem}${leaf.keys.pkcs8.pem}`,
      key: leaf.keys.pkcs8.pem,
    });
    assert.equal(messy.tls().cert, leaf.cert.pem);
  });
});

describe("createIdentity errors", () => {
  const leaf = pki.leaves.p256;

  it("names a certificate, key or CA file that cannot be read", async () => {
    const missing = join(pki.dir, "missing.crt");
    const err = await rejectsAuth(
      createIdentity({ certFile: missing, keyFile: leaf.keys.pkcs8.path }),
      /cannot read client certificate file/,
      new RegExp(missing.replace(/[.\\]/g, "\\$&")),
    );
    assert.ok(err.cause instanceof Error, "keeps the file system error as cause");
    await rejectsAuth(
      createIdentity({ certFile: leaf.cert.path, keyFile: join(pki.dir, "missing.key") }),
      /cannot read client key file .*missing\.key/,
    );
    await rejectsAuth(
      createIdentity({ ...files(leaf, "pkcs8"), caFile: join(pki.dir, "missing-ca.pem") }),
      /cannot read CA certificate file .*missing-ca\.pem/,
    );
  });

  it("says when there is no certificate or key at all", async () => {
    await rejectsAuth(createIdentity(), /no client certificate/, /CONVEYOR_CERT_FILE/);
    await rejectsAuth(
      createIdentity({ cert: leaf.cert.pem }),
      /no client key/,
      /CONVEYOR_KEY_FILE/,
    );
  });

  it("rejects garbage where PEM is expected", async () => {
    const key = leaf.keys.pkcs8.pem;
    await rejectsAuth(
      createIdentity({ cert: "hello, world", key }),
      /client certificate/,
      /no "-----BEGIN CERTIFICATE-----" PEM block/,
    );
    await rejectsAuth(
      createIdentity({
        cert: "-----BEGIN CERTIFICATE-----\n!!not base64!!\n-----END CERTIFICATE-----",
        key,
      }),
      /not valid base64/,
    );
    await rejectsAuth(
      createIdentity({
        cert: "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----",
        key,
      }),
      /certificate 1 is not a valid X\.509 certificate/,
    );
    await rejectsAuth(
      createIdentity({ cert: leaf.cert.pem, key: leaf.cert.pem }),
      /no private key PEM block/,
    );
    await rejectsAuth(
      createIdentity({
        cert: leaf.cert.pem,
        key: "-----BEGIN PRIVATE KEY-----\nMAMCAQA=\n-----END PRIVATE KEY-----",
      }),
      /client key.*unusable PRIVATE KEY/,
    );
    await rejectsAuth(
      createIdentity({ cert: leaf.cert.pem, key, ca: "not a CA" }),
      /CA certificate .*no "-----BEGIN CERTIFICATE-----"/,
    );
  });

  it("rejects a key that does not match the leaf certificate", async () => {
    await rejectsAuth(
      createIdentity({ certFile: leaf.cert.path, keyFile: pki.other.leaf.keys.pkcs8.path }),
      /does not match the leaf certificate/,
      /different key pair/,
    );
    await rejectsAuth(
      createIdentity({ cert: pki.leaves.rsa.cert.pem, key: leaf.keys.traditional.pem }),
      /the key is EC P-256 but the certificate holds an RSA public key/,
    );
    await rejectsAuth(
      createIdentity({ cert: pki.leaves.p384.cert.pem, key: leaf.keys.pkcs8.pem }),
      /the key is EC P-256 but the certificate holds an EC P-384 public key/,
    );
    // The CA first instead of the leaf.
    await rejectsAuth(
      createIdentity({ cert: pki.ca.cert.pem + leaf.cert.pem, key: leaf.keys.pkcs8.pem }),
      /does not match/,
      /first certificate of the chain must be the client's own/,
    );
  });

  it("rejects encrypted and unsupported keys with a hint", async () => {
    const cert = leaf.cert.pem;
    await rejectsAuth(
      createIdentity({
        cert,
        key: "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMAA=\n-----END ENCRYPTED PRIVATE KEY-----",
      }),
      /encrypted/,
      /openssl pkey/,
    );
    // RFC 8410's example Ed25519 key.
    const ed25519 = "-----BEGIN PRIVATE KEY-----\n" +
      "MC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n-----END PRIVATE KEY-----";
    await rejectsAuth(createIdentity({ cert, key: ed25519 }), /unsupported key type Ed25519/);
    // A SEC1 key on secp256k1: version 1, a 32-byte scalar, [0] the curve OID 1.3.132.0.10.
    const sec1 = Buffer.from([
      ...[0x30, 0x2e, 0x02, 0x01, 0x01, 0x04, 0x20, ...new Array(31).fill(0), 1],
      ...[0xa0, 0x07, 0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x0a],
    ]);
    await rejectsAuth(
      createIdentity({
        cert,
        key: `-----BEGIN EC PRIVATE KEY-----\n${
          sec1.toString("base64")
        }\n-----END EC PRIVATE KEY-----`,
      }),
      /unsupported EC curve secp256k1/,
    );
    const short = generateKeyPairSync("rsa", { modulusLength: 1024 }).privateKey;
    await rejectsAuth(
      createIdentity({ cert, key: short.export({ type: "pkcs1", format: "pem" }) as string }),
      /RSA key has 1024 bits; at least 2048/,
    );
  });

  it("rejects an invalid tokenLifetime or rsaAlgorithm with a ConfigError", async () => {
    const base = files(leaf, "pkcs8");
    for (const tokenLifetime of [500, 29_999, 86_400_001, NaN, Infinity, -1]) {
      await assert.rejects(createIdentity({ ...base, tokenLifetime }), (err: unknown) => {
        assert.ok(err instanceof ConfigError, `${tokenLifetime}: ${err}`);
        assert.equal(err.field, "tokenLifetime");
        assert.match(err.message, /from 30000 to 86400000 ms/);
        return true;
      });
    }
    for (const tokenLifetime of [30_000, 86_400_000]) {
      await createIdentity({ ...base, tokenLifetime });
    }
    await assert.rejects(
      // deno-lint-ignore no-explicit-any
      createIdentity({ ...base, rsaAlgorithm: "RS384" as any }),
      (err: unknown) => err instanceof ConfigError && err.field === "rsaAlgorithm",
    );
  });
});

describe("createIdentity refuses a certificate the server would refuse", () => {
  const DAY = 86_400_000;
  const ca = () => pki.ca.cert.path;
  /** createIdentity for an issued certificate, from files, against `caFile`. */
  const identityOf = (
    leaf: { cert: PemFile; key: PemFile },
    caFile: string | undefined = ca(),
    cert: string = leaf.cert.path,
  ) => createIdentity({ certFile: cert, keyFile: leaf.key.path, ...(caFile ? { caFile } : {}) });
  const fileName = (p: string) =>
    new RegExp(`client certificate file ${p.replace(/[.\\]/g, "\\$&")}`);

  it("an expired certificate, naming the file and the date", async () => {
    const leaf = pki.issue({
      name: "refused-expired",
      notBefore: new Date(Date.now() - 10 * DAY),
      notAfter: new Date(Date.now() - DAY),
    });
    const err = await rejectsAuth(
      identityOf(leaf),
      fileName(leaf.cert.path),
      /the certificate "CN=refused-expired, O=Conveyor tests" expired on \d{4}-\d\d-\d\dT/,
    );
    const expected = new Date(new X509Certificate(leaf.cert.pem).validTo).toISOString();
    assert.ok(err.message.includes(expected), `${err.message} names ${expected}`);
    assert.ok(err.cause instanceof Error, "the reason is kept as cause");
  });

  it("a certificate not valid yet", async () => {
    const leaf = pki.issue({ name: "refused-future", notBefore: new Date(Date.now() + DAY) });
    await rejectsAuth(
      identityOf(leaf),
      fileName(leaf.cert.path),
      /"CN=refused-future, O=Conveyor tests" is not valid before /,
    );
  });

  it("a certificate some other CA issued, even one that takes the CA's name", async () => {
    const stranger = pki.issue({ name: "refused-stranger", issuer: pki.other.ca });
    await rejectsAuth(
      identityOf(stranger),
      /was not issued by the CA: its issuer "CN=other-ca, O=Conveyor tests" is neither in the CA file nor in the chain/,
      new RegExp(`checked against CA certificate file ${ca().replace(/[.\\]/g, "\\$&")}`),
    );
    // Same issuer name as the real CA, another key: only the signature tells.
    const impostor = pki.issue({
      name: "impostor-ca",
      subject: "ca",
      issuer: "self",
      extensions: "ca_ext",
    });
    const forged = pki.issue({ name: "refused-forged", issuer: impostor });
    const real = new X509Certificate(pki.ca.cert.pem);
    assert.equal(new X509Certificate(forged.cert.pem).verify(real.publicKey), false, "oracle");
    await rejectsAuth(
      identityOf(forged),
      /its issuer "CN=ca, O=Conveyor tests" has a key that does not verify its signature/,
    );
    const selfSigned = pki.issue({ name: "refused-self", issuer: "self" });
    await rejectsAuth(identityOf(selfSigned), /it is self-signed and not in the CA file/);
  });

  it("a certificate whose signature was tampered with", async () => {
    const leaf = pki.issue({ name: "refused-tampered" });
    const der = new X509Certificate(leaf.cert.pem).raw;
    der[der.length - 1] ^= 0x01; // the last byte of the ECDSA signature's s
    const pem = `-----BEGIN CERTIFICATE-----\n${
      der.toString("base64")
    }\n-----END CERTIFICATE-----\n`;
    await rejectsAuth(
      createIdentity({ cert: pem, key: leaf.key.pem, ca: pki.ca.cert.pem }),
      /does not verify its signature/,
    );
  });

  it("a chain missing its intermediate, or with an intermediate that is not a CA", async () => {
    const leafOnly = pki.chained.cert.pem.slice(
      0,
      pki.chained.cert.pem.indexOf("-----END CERTIFICATE-----") + 26,
    );
    await rejectsAuth(
      createIdentity({ cert: leafOnly, key: pki.chained.keys.pkcs8.pem, ca: pki.ca.cert.pem }),
      /its issuer "CN=intermediate, O=Conveyor tests" is neither in the CA file nor in the chain/,
    );
    // With the intermediate in the CA file instead, it verifies.
    await createIdentity({
      cert: leafOnly,
      key: pki.chained.keys.pkcs8.pem,
      ca: pki.ca.cert.pem + pki.chained.intermediate.pem,
    });
    const notCa = pki.issue({ name: "refused-not-ca" });
    const below = pki.issue({ name: "refused-below-leaf", issuer: notCa });
    await rejectsAuth(
      createIdentity({
        cert: below.cert.pem + notCa.cert.pem,
        key: below.key.pem,
        ca: pki.ca.cert.pem,
      }),
      /its issuer "CN=refused-not-ca, O=Conveyor tests" is not a CA certificate/,
    );
  });

  it("an expired intermediate or CA", async () => {
    const past = {
      notBefore: new Date(Date.now() - 10 * DAY),
      notAfter: new Date(Date.now() - DAY),
    };
    const oldIntermediate = pki.issue({ name: "refused-old-int", extensions: "ca_ext", ...past });
    const leaf = pki.issue({ name: "refused-under-old-int", issuer: oldIntermediate });
    await rejectsAuth(
      createIdentity({
        cert: leaf.cert.pem + oldIntermediate.cert.pem,
        key: leaf.key.pem,
        ca: pki.ca.cert.pem,
      }),
      /the intermediate certificate "CN=refused-old-int, O=Conveyor tests" expired on/,
    );
    const oldCa = pki.issue({
      name: "refused-old-ca",
      issuer: "self",
      extensions: "ca_ext",
      ...past,
    });
    const underOldCa = pki.issue({ name: "refused-under-old-ca", issuer: oldCa });
    await rejectsAuth(
      identityOf(underOldCa, oldCa.cert.path),
      /the CA certificate "CN=refused-old-ca, O=Conveyor tests" expired on/,
    );
  });

  it("extended key usages without serverAuth, in the leaf or above it", async () => {
    const clientOnly = pki.issue({ name: "refused-client-only", extensions: "leaf_client_only" });
    await rejectsAuth(
      identityOf(clientOnly),
      /lists the extended key usages clientAuth but not serverAuth/,
    );
    // Without a CA to check against, the leaf's own usages are still checked.
    await rejectsAuth(identityOf(clientOnly, ""), /but not serverAuth/);
    const clientCa = pki.issue({ name: "refused-client-ca", extensions: "ca_client_only" });
    const under = pki.issue({ name: "refused-under-client-ca", issuer: clientCa });
    await rejectsAuth(
      createIdentity({
        cert: under.cert.pem + clientCa.cert.pem,
        key: under.key.pem,
        ca: pki.ca.cert.pem,
      }),
      /the intermediate certificate "CN=refused-client-ca, O=Conveyor tests" lists the extended key usages clientAuth but not serverAuth/,
    );
    // No extended key usage at all means any usage; serverAuth alone is enough here.
    await identityOf(pki.issue({ name: "accepted-no-eku", extensions: "leaf_no_eku" }));
    await identityOf(pki.issue({ name: "accepted-server-only", extensions: "leaf_server_only" }));
  });

  it("SHA-1 signatures, while RSA, RSA-PSS and ECDSA over SHA-2, and Ed25519 verify", async () => {
    await rejectsAuth(
      identityOf(pki.issue({ name: "refused-sha1", digest: "sha1" })),
      /signed it with SHA-1, which the Conveyor server refuses/,
    );
    const rsaCa = pki.issue({ name: "rsa-ca", type: "rsa", issuer: "self", extensions: "ca_ext" });
    const p384Ca = pki.issue({
      name: "p384-ca",
      type: "p384",
      issuer: "self",
      extensions: "ca_ext",
    });
    const p521Ca = pki.issue({
      name: "p521-ca",
      type: "p521",
      issuer: "self",
      extensions: "ca_ext",
    });
    const edCa = pki.issue({
      name: "ed25519-ca",
      type: "ed25519",
      issuer: "self",
      extensions: "ca_ext",
    });
    const cases = [
      { name: "by-rsa-sha256", issuer: rsaCa, digest: "sha256" },
      { name: "by-rsa-sha512", issuer: rsaCa, digest: "sha512" },
      { name: "by-rsa-pss", issuer: rsaCa, digest: "sha256", pss: true },
      { name: "by-rsa-pss-384", issuer: rsaCa, digest: "sha384", pss: true },
      { name: "by-p384-sha384", issuer: p384Ca, digest: "sha384" },
      { name: "by-p521-sha512", issuer: p521Ca, digest: "sha512" },
      { name: "by-p521-sha256", issuer: p521Ca, digest: "sha256" },
      { name: "by-ed25519", issuer: edCa },
    ] as const;
    for (const c of cases) {
      const leaf = pki.issue(c);
      const identity = await identityOf(leaf, c.issuer.cert.path);
      assert.equal(identity.certificate.subject, `CN=${c.name}, O=Conveyor tests`);
      // The other CAs did not sign it.
      for (const other of [rsaCa, p384Ca, p521Ca, edCa].filter((x) => x !== c.issuer)) {
        await rejectsAuth(identityOf(leaf, other.cert.path), /was not issued by the CA/);
      }
    }
  });

  it("without a CA, checks what the chain itself holds", async () => {
    // Nothing to anchor it: another CA's leaf passes, as the server alone can judge.
    await createIdentity({ cert: pki.other.leaf.cert.pem, key: pki.other.leaf.keys.pkcs8.pem });
    // But a chain whose links do not verify is refused.
    const impostor = pki.issue({
      name: "impostor-int",
      subject: "intermediate",
      issuer: "self",
      extensions: "ca_ext",
    });
    const leafOnly = pki.chained.cert.pem.slice(
      0,
      pki.chained.cert.pem.indexOf("-----END CERTIFICATE-----") + 26,
    );
    await rejectsAuth(
      createIdentity({ cert: leafOnly + impostor.cert.pem, key: pki.chained.keys.pkcs8.pem }),
      /its issuer "CN=intermediate, O=Conveyor tests" has a key that does not verify its signature/,
    );
  });
});

describe("authFromEnv", () => {
  afterEach(() => {
    for (const k of ENV_NAMES) delete process.env[k];
  });
  after(restoreEnv);

  it("is undefined without CONVEYOR_CERT_FILE", () => {
    process.env.CONVEYOR_KEY_FILE = "/x/client.key";
    assert.equal(authFromEnv(), undefined);
  });

  it("reads the three file variables", () => {
    process.env.CONVEYOR_CERT_FILE = " /etc/conveyor/client.crt ";
    process.env.CONVEYOR_KEY_FILE = "/etc/conveyor/client.key";
    process.env.CONVEYOR_CA_FILE = "/etc/conveyor/ca.pem";
    assert.deepEqual(authFromEnv(), {
      certFile: "/etc/conveyor/client.crt",
      keyFile: "/etc/conveyor/client.key",
      caFile: "/etc/conveyor/ca.pem",
    });
    delete process.env.CONVEYOR_CA_FILE;
    assert.deepEqual(authFromEnv(), {
      certFile: "/etc/conveyor/client.crt",
      keyFile: "/etc/conveyor/client.key",
    });
  });

  it("fills createIdentity's missing options, and errors name the variable", async () => {
    const leaf = pki.leaves.p521;
    process.env.CONVEYOR_CERT_FILE = leaf.cert.path;
    process.env.CONVEYOR_KEY_FILE = leaf.keys.traditional.path;
    process.env.CONVEYOR_CA_FILE = pki.ca.cert.path;
    const identity = await createIdentity();
    verifyToken(await identity.token(), { algorithm: "ES512", leaf: leaf.cert, ca: pki.ca.cert });
    assert.equal(identity.tls().ca, pki.ca.cert.pem);
    // An explicit option wins over the environment.
    const p256 = await createIdentity({
      cert: pki.leaves.p256.cert.pem,
      key: pki.leaves.p256.keys.pkcs8.pem,
    });
    assert.equal(p256.algorithm, "ES256");

    const missing = join(pki.dir, "nope.key");
    process.env.CONVEYOR_KEY_FILE = missing;
    await rejectsAuth(createIdentity(), /from CONVEYOR_KEY_FILE/);
  });

  it("reads a key file holding garbage as a clear error", async () => {
    const bad = join(pki.dir, "garbage.key");
    writeFileSync(bad, "this is not a key\n");
    await rejectsAuth(
      createIdentity({ certFile: pki.leaves.p256.cert.path, keyFile: bad }),
      new RegExp(`client key file ${bad.replace(/[.\\]/g, "\\$&")}: no private key PEM block`),
    );
  });
});
