/**
 * Client identity for a Conveyor server that runs with authentication: the
 * client certificate chain, its private key and the CA, read once, checked,
 * and turned into short-lived bearer JWTs for the HTTP API and PEM material
 * for NATS mutual TLS.
 *
 * Signing uses Web Crypto (through `jose`), so the PEM-string path runs on
 * Deno, Bun, Node and edge runtimes; only the `*File` options need a file
 * system (`node:fs/promises`, imported when used).
 *
 * @example
 * ```ts
 * import { createIdentity } from "@conveyor/driver";
 *
 * const identity = await createIdentity({
 *   certFile: "/etc/conveyor/client.crt",
 *   keyFile: "/etc/conveyor/client.key",
 *   caFile: "/etc/conveyor/ca.pem",
 * });
 * await fetch("https://conveyor.example/resources/pipeline", {
 *   headers: { authorization: `Bearer ${await identity.token()}` },
 * });
 * ```
 *
 * @module
 */
import { base64url, type CryptoKey, exportJWK, importPKCS8, importSPKI, SignJWT } from "jose";
import { AuthError, ConfigError } from "./errors.ts";
import { readEnv } from "./_util.ts";

/**
 * Where the client certificate, key and CA come from, and how tokens are made.
 *
 * For each of the three, a PEM string wins over a path; when neither is given,
 * the path comes from the environment (`CONVEYOR_CERT_FILE`,
 * `CONVEYOR_KEY_FILE`, `CONVEYOR_CA_FILE`).
 *
 * @example
 * ```ts
 * import { type AuthOptions, createIdentity } from "@conveyor/driver";
 * const options: AuthOptions = { cert: certPem, key: keyPem, ca: caPem, tokenLifetime: 60_000 };
 * const identity = await createIdentity(options);
 * ```
 */
export interface AuthOptions {
  /** Path of the client certificate chain (PEM, leaf first). Env `CONVEYOR_CERT_FILE`. */
  certFile?: string;
  /** Path of the client private key (PEM). Env `CONVEYOR_KEY_FILE`. */
  keyFile?: string;
  /** Path of the CA certificate(s) (PEM). Env `CONVEYOR_CA_FILE`. */
  caFile?: string;
  /** The client certificate chain as a PEM string, leaf first, instead of `certFile`. */
  cert?: string;
  /**
   * The private key as a PEM string, instead of `keyFile`: PKCS#8
   * (`PRIVATE KEY`), SEC1 (`EC PRIVATE KEY`) or PKCS#1 (`RSA PRIVATE KEY`),
   * unencrypted.
   */
  key?: string;
  /** The CA certificate(s) as a PEM string, instead of `caFile`. */
  ca?: string;
  /**
   * JWT algorithm for an RSA key. EC keys get ES256, ES384 or ES512 by their
   * curve (P-256, P-384, P-521), whatever this says.
   * @default "RS256"
   */
  rsaAlgorithm?: "RS256" | "PS256";
  /**
   * Lifetime of a token (`exp` - `iat`) in ms, at least 1000; rounded down
   * to whole seconds.
   * @default 120_000
   */
  tokenLifetime?: number;
}

/** The JWT algorithms the Conveyor server accepts. */
export type JwtAlgorithm = "RS256" | "PS256" | "ES256" | "ES384" | "ES512";

/**
 * A checked client identity: makes bearer tokens and hands out the PEM
 * material for mutual TLS.
 *
 * @example
 * ```ts
 * import { createIdentity } from "@conveyor/driver";
 * const identity = await createIdentity(); // from CONVEYOR_CERT_FILE and friends
 * const headers = { authorization: `Bearer ${await identity.token()}` };
 * const tls = identity.tls(); // { cert, key, ca } for nats.js connect({ tls })
 * ```
 */
export interface Identity {
  /** The algorithm tokens are signed with, chosen by the key. */
  readonly algorithm: JwtAlgorithm;
  /** The JWT `x5c` header: each certificate as padded standard base64 DER, leaf first. */
  readonly chain: readonly string[];
  /** `cnf["x5t#S256"]`: base64url (no padding) of the SHA-256 of the leaf's DER. */
  readonly thumbprint: string;
  /**
   * A bearer JWT. The same token is returned until less than a quarter of its
   * lifetime (at most 30 s) is left; then a new one is signed, once for all
   * concurrent callers.
   */
  token(): Promise<string>;
  /**
   * PEM material for TLS (NATS mutual TLS): the certificate chain and the
   * CA certificate(s) if any (their CERTIFICATE blocks only), and the key as
   * given.
   */
  tls(): { cert: string; key: string; ca?: string };
}

/** Environment variables read by {@link authFromEnv} and {@link createIdentity}. */
const ENV_CERT = "CONVEYOR_CERT_FILE";
const ENV_KEY = "CONVEYOR_KEY_FILE";
const ENV_CA = "CONVEYOR_CA_FILE";

const DEFAULT_LIFETIME = 120_000;
/** Most `iat` is backdated by, in seconds, so a server clock slightly behind ours accepts it. */
const MAX_BACKDATE = 5;
/** Most time before expiry a token is renewed, in ms. */
const MAX_RENEW_MARGIN = 30_000;

/**
 * AuthOptions naming the files from `CONVEYOR_CERT_FILE`, `CONVEYOR_KEY_FILE`
 * and `CONVEYOR_CA_FILE`; undefined when `CONVEYOR_CERT_FILE` is not set
 * (authentication is off).
 *
 * @example
 * ```ts
 * import { authFromEnv, createIdentity } from "@conveyor/driver";
 * const auth = authFromEnv();
 * const identity = auth ? await createIdentity(auth) : undefined;
 * ```
 */
export function authFromEnv(): AuthOptions | undefined {
  const certFile = readEnv(ENV_CERT);
  if (certFile === undefined) return undefined;
  const options: AuthOptions = { certFile };
  const keyFile = readEnv(ENV_KEY);
  if (keyFile !== undefined) options.keyFile = keyFile;
  const caFile = readEnv(ENV_CA);
  if (caFile !== undefined) options.caFile = caFile;
  return options;
}

/**
 * Reads and checks the client certificate chain, its key and the CA, and
 * signs a first token. Rejects with an `AuthError` naming the file or option
 * at fault for a file that cannot be read, a missing or malformed PEM block,
 * an encrypted or unsupported key (only RSA of 2048 bits or more, and EC
 * P-256/P-384/P-521), or a key that is not the one of the leaf certificate;
 * with a `ConfigError` for an invalid `rsaAlgorithm` or `tokenLifetime`.
 *
 * @example
 * ```ts
 * import { createIdentity } from "@conveyor/driver";
 * const identity = await createIdentity({ cert: certPem, key: keyPem, rsaAlgorithm: "PS256" });
 * console.log(identity.algorithm, identity.thumbprint);
 * ```
 */
export async function createIdentity(options: AuthOptions = {}): Promise<Identity> {
  const lifetime = options.tokenLifetime ?? DEFAULT_LIFETIME;
  if (!Number.isFinite(lifetime) || lifetime < 1_000) {
    throw new ConfigError(
      "tokenLifetime",
      `tokenLifetime must be at least 1000 ms, got ${lifetime}`,
    );
  }
  const rsaAlgorithm = options.rsaAlgorithm ?? "RS256";
  if (rsaAlgorithm !== "RS256" && rsaAlgorithm !== "PS256") {
    throw new ConfigError(
      "rsaAlgorithm",
      `rsaAlgorithm must be "RS256" or "PS256", got ${JSON.stringify(rsaAlgorithm)}`,
    );
  }

  const certSource = await load("client certificate", options.cert, options.certFile, ENV_CERT);
  if (!certSource) {
    throw new AuthError(
      `no client certificate: set the cert or certFile option, or ${ENV_CERT}`,
    );
  }
  const keySource = await load("client key", options.key, options.keyFile, ENV_KEY);
  if (!keySource) {
    throw new AuthError(`no client key: set the key or keyFile option, or ${ENV_KEY}`);
  }
  const caSource = await load("CA certificate", options.ca, options.caFile, ENV_CA);

  const chain = certificates(certSource);
  const caCerts = caSource && certificates(caSource);
  const leaf = chain[0];
  const leafSpki = subjectPublicKeyInfo(leaf, certSource);
  const { info, pkcs8 } = privateKey(keySource);
  const algorithm: JwtAlgorithm = info.kind === "RSA" ? rsaAlgorithm : EC_ALGORITHMS[info.curve];
  const signingKey = await checkKeyPair(info, algorithm, pkcs8, leafSpki, keySource, certSource);

  const thumbprint = base64url.encode(
    new Uint8Array(await crypto.subtle.digest("SHA-256", leaf)),
  );
  const identity = new ClientIdentity({
    algorithm,
    chain: Object.freeze(chain.map(toBase64)),
    thumbprint,
    signingKey,
    lifetime: Math.floor(lifetime / 1000),
    // Certificates re-encoded, so that nothing else in the files (comments,
    // a key kept in the same file) reaches TLS; the key as given.
    tls: { cert: pemChain(chain), key: keySource.text, ca: caCerts && pemChain(caCerts) },
  });
  try {
    await identity.token(); // fail here, not at the first request
  } catch (err) {
    throw new AuthError(`cannot sign a token with ${keySource.name}: ${message(err)}`, {
      cause: err,
    });
  }
  return identity;
}

// ---------------------------------------------------------------------------
// The identity and its token cache.

interface IdentityInit {
  algorithm: JwtAlgorithm;
  chain: readonly string[];
  thumbprint: string;
  signingKey: CryptoKey;
  /** In whole seconds. */
  lifetime: number;
  tls: { cert: string; key: string; ca: string | undefined };
}

interface CachedToken {
  jwt: string;
  /** Date.now() from which a new token is signed. */
  renewAt: number;
}

class ClientIdentity implements Identity {
  readonly algorithm: JwtAlgorithm;
  readonly chain: readonly string[];
  readonly thumbprint: string;
  readonly #key: CryptoKey;
  readonly #lifetime: number;
  readonly #tls: IdentityInit["tls"];
  #current?: CachedToken;
  #pending?: Promise<string>;

  constructor(init: IdentityInit) {
    this.algorithm = init.algorithm;
    this.chain = init.chain;
    this.thumbprint = init.thumbprint;
    this.#key = init.signingKey;
    this.#lifetime = init.lifetime;
    this.#tls = init.tls;
  }

  token(): Promise<string> {
    if (this.#current && Date.now() < this.#current.renewAt) {
      return Promise.resolve(this.#current.jwt);
    }
    this.#pending ??= this.#sign().finally(() => (this.#pending = undefined));
    return this.#pending;
  }

  tls(): { cert: string; key: string; ca?: string } {
    const { cert, key, ca } = this.#tls;
    return ca === undefined ? { cert, key } : { cert, key, ca };
  }

  async #sign(): Promise<string> {
    const lifetime = this.#lifetime;
    // The server rejects an iat ahead of its clock with no leeway: backdate it,
    // but by no more than a quarter of a short lifetime.
    const iat = Math.floor(Date.now() / 1000) - Math.min(MAX_BACKDATE, Math.floor(lifetime / 4));
    const exp = iat + lifetime;
    const jwt = await new SignJWT({ cnf: { "x5t#S256": this.thumbprint } })
      .setProtectedHeader({ alg: this.algorithm, typ: "JWT", x5c: [...this.chain] })
      .setIssuedAt(iat)
      .setExpirationTime(exp)
      .sign(this.#key);
    const margin = Math.min(lifetime * 1000 / 4, MAX_RENEW_MARGIN);
    this.#current = { jwt, renewAt: exp * 1000 - margin };
    return jwt;
  }
}

// ---------------------------------------------------------------------------
// Sources: PEM text from an option, a file or the environment.

interface Source {
  /** For messages: `client key /etc/conveyor/client.key` or `client key (key option)`. */
  name: string;
  text: string;
}

async function load(
  what: string,
  pem: string | undefined,
  file: string | undefined,
  envName: string,
): Promise<Source | undefined> {
  if (pem !== undefined) return { name: `${what} (PEM string option)`, text: pem };
  let name = `${what} file ${file}`;
  if (file === undefined) {
    file = readEnv(envName);
    if (file === undefined) return undefined;
    name = `${what} file ${file} (from ${envName})`;
  }
  try {
    // Imported here so that the PEM-string path needs no file system (edge runtimes).
    const { readFile } = await import("node:fs/promises");
    return { name, text: await readFile(file, "utf8") };
  } catch (err) {
    throw new AuthError(`cannot read ${name}: ${message(err)}`, { cause: err });
  }
}

// ---------------------------------------------------------------------------
// PEM.

interface PemBlock {
  label: string;
  der: Uint8Array<ArrayBuffer>;
}

/** The PEM blocks of `text` (RFC 7468), in order; text between blocks is ignored. */
function pemBlocks(source: Source): PemBlock[] {
  const blocks: PemBlock[] = [];
  const re = /-----BEGIN ([A-Z0-9 ]+)-----([\s\S]*?)-----END \1-----/g;
  for (const [, label, body] of source.text.matchAll(re)) {
    if (/Proc-Type:\s*4,ENCRYPTED/.test(body)) {
      throw new AuthError(
        `${source.name}: the ${label} is encrypted; decrypt it first ` +
          "(openssl pkey -in key.pem -out plain.pem)",
      );
    }
    const b64 = body.replace(/\s+/g, "");
    if (b64.length % 4 !== 0 || !/^[A-Za-z0-9+/]*={0,2}$/.test(b64)) {
      throw new AuthError(`${source.name}: the ${label} PEM block is not valid base64`);
    }
    blocks.push({ label, der: fromBase64(b64) });
  }
  return blocks;
}

/** The DER of every CERTIFICATE block, in order; at least one. */
function certificates(source: Source): Uint8Array<ArrayBuffer>[] {
  const certs = pemBlocks(source).filter((b) => b.label === "CERTIFICATE").map((b) => b.der);
  if (certs.length === 0) {
    throw new AuthError(`${source.name}: no "-----BEGIN CERTIFICATE-----" PEM block found`);
  }
  certs.forEach((der, i) => {
    try {
      tbsCertificate(der);
    } catch (err) {
      throw new AuthError(
        `${source.name}: certificate ${i + 1} is not a valid X.509 certificate: ${message(err)}`,
        { cause: err },
      );
    }
  });
  return certs;
}

function fromBase64(b64: string): Uint8Array<ArrayBuffer> {
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

/** Padded standard base64 (the `x5c` form, RFC 7515 §4.1.6), not base64url. */
function toBase64(bytes: Uint8Array): string {
  let bin = "";
  // In chunks: String.fromCharCode takes its bytes as arguments.
  for (let i = 0; i < bytes.length; i += 0x8000) {
    bin += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(bin);
}

const pemChain = (ders: Uint8Array[]): string => ders.map((d) => toPem("CERTIFICATE", d)).join("");

/** A PEM block with 64-character lines, as OpenSSL writes them. */
function toPem(label: string, der: Uint8Array): string {
  const lines = toBase64(der).match(/.{1,64}/g) ?? [];
  return `-----BEGIN ${label}-----\n${lines.join("\n")}\n-----END ${label}-----\n`;
}

// ---------------------------------------------------------------------------
// Keys: type and curve, conversion to PKCS#8, and the match with the leaf.

type Curve = "P-256" | "P-384" | "P-521";
type KeyInfo = { kind: "RSA" } | { kind: "EC"; curve: Curve };

const EC_ALGORITHMS: Record<Curve, JwtAlgorithm> = {
  "P-256": "ES256",
  "P-384": "ES384",
  "P-521": "ES512",
};

const OID_RSA = "1.2.840.113549.1.1.1";
const OID_EC = "1.2.840.10045.2.1";
const CURVES: Record<string, Curve> = {
  "1.2.840.10045.3.1.7": "P-256",
  "1.3.132.0.34": "P-384",
  "1.3.132.0.35": "P-521",
};
/** Names of key types and curves we refuse, for the error message. */
const KNOWN_OIDS: Record<string, string> = {
  "1.2.840.113549.1.1.10": "RSASSA-PSS",
  "1.2.840.10040.4.1": "DSA",
  "1.3.101.110": "X25519",
  "1.3.101.111": "X448",
  "1.3.101.112": "Ed25519",
  "1.3.101.113": "Ed448",
  "1.3.132.0.10": "secp256k1",
};
/** DER of the OIDs rsaEncryption and id-ecPublicKey, for building PKCS#8. */
const DER_OID_RSA = Uint8Array.of(0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01);
const DER_OID_EC = Uint8Array.of(0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01);
const DER_NULL = Uint8Array.of(0x05, 0x00);

const keyLabel = (info: KeyInfo): string => info.kind === "RSA" ? "RSA" : `EC ${info.curve}`;
const oidName = (oid: string): string => KNOWN_OIDS[oid] ? `${KNOWN_OIDS[oid]} (${oid})` : oid;

/**
 * The key type of an AlgorithmIdentifier (SPKI or PKCS#8): RSA, or EC with a
 * named curve; throws for anything the server does not accept.
 */
function keyType(algorithmIdentifier: Tlv): KeyInfo {
  const [alg, params] = children(expect(algorithmIdentifier, SEQUENCE, "AlgorithmIdentifier"));
  const oid = oidString(expect(alg, OID, "algorithm OID"));
  if (oid === OID_RSA) return { kind: "RSA" };
  if (oid !== OID_EC) {
    throw new Error(`unsupported key type ${oidName(oid)}: use an RSA or EC key`);
  }
  return { kind: "EC", curve: namedCurve(params) };
}

function namedCurve(params: Tlv | undefined): Curve {
  if (params?.tag !== OID) throw new Error("the EC key does not name its curve");
  const oid = oidString(params);
  const curve = CURVES[oid];
  if (!curve) {
    throw new Error(`unsupported EC curve ${oidName(oid)}: use P-256, P-384 or P-521`);
  }
  return curve;
}

/** The key of the first private-key PEM block, as PKCS#8 DER with its type. */
function privateKey(source: Source): { info: KeyInfo; pkcs8: Uint8Array<ArrayBuffer> } {
  const blocks = pemBlocks(source);
  if (blocks.some((b) => b.label === "ENCRYPTED PRIVATE KEY")) {
    throw new AuthError(
      `${source.name}: the key is encrypted; decrypt it first ` +
        "(openssl pkey -in key.pem -out plain.pem)",
    );
  }
  // Skips what may come before the key, e.g. the EC PARAMETERS of `openssl ecparam -genkey`.
  const block = blocks.find((b) => /^(|RSA |EC )PRIVATE KEY$/.test(b.label));
  if (!block) {
    throw new AuthError(
      `${source.name}: no private key PEM block found ` +
        "(expected PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY)",
    );
  }
  try {
    const root = parseDer(block.der);
    if (block.label === "RSA PRIVATE KEY") return fromPkcs1(root);
    if (block.label === "EC PRIVATE KEY") return fromSec1(root);
    // PKCS#8 PrivateKeyInfo: version, privateKeyAlgorithm, privateKey, ...
    const [version, alg] = children(expect(root, SEQUENCE, "PrivateKeyInfo"));
    expect(version, INTEGER, "PrivateKeyInfo version");
    return { info: keyType(alg), pkcs8: block.der };
  } catch (err) {
    if (err instanceof AuthError) throw err;
    throw new AuthError(`${source.name}: unusable ${block.label}: ${message(err)}`, {
      cause: err,
    });
  }
}

/** PKCS#1 RSAPrivateKey (RFC 8017 A.1.2) wrapped as PKCS#8 (RFC 5208). */
function fromPkcs1(root: Tlv): { info: KeyInfo; pkcs8: Uint8Array<ArrayBuffer> } {
  const fields = children(expect(root, SEQUENCE, "RSAPrivateKey"));
  // version, n, e, d, p, q, dp, dq, qinv
  if (fields.length < 9 || fields.some((f) => f.tag !== INTEGER)) {
    throw new Error("not an RSAPrivateKey");
  }
  return {
    info: { kind: "RSA" },
    pkcs8: der(
      SEQUENCE,
      der(INTEGER, Uint8Array.of(0)),
      der(SEQUENCE, DER_OID_RSA, DER_NULL),
      der(OCTET_STRING, root.raw),
    ),
  };
}

/**
 * SEC1 ECPrivateKey (RFC 5915) wrapped as PKCS#8. The curve moves from the
 * key's [0] parameters to the AlgorithmIdentifier; the inner key keeps the
 * scalar and the [1] public key but drops [0], which some Web Crypto
 * implementations refuse inside PKCS#8.
 */
function fromSec1(root: Tlv): { info: KeyInfo; pkcs8: Uint8Array<ArrayBuffer> } {
  const fields = children(expect(root, SEQUENCE, "ECPrivateKey"));
  const [version, scalar] = fields;
  expect(version, INTEGER, "ECPrivateKey version");
  expect(scalar, OCTET_STRING, "ECPrivateKey privateKey");
  const params = fields.find((f) => f.tag === CONTEXT_0);
  const publicKey = fields.find((f) => f.tag === CONTEXT_1);
  const curveOid = params && children(params)[0];
  const info: KeyInfo = { kind: "EC", curve: namedCurve(curveOid) };
  const inner = der(SEQUENCE, version.raw, scalar.raw, ...(publicKey ? [publicKey.raw] : []));
  return {
    info,
    pkcs8: der(
      SEQUENCE,
      der(INTEGER, Uint8Array.of(0)),
      der(SEQUENCE, DER_OID_EC, curveOid!.raw),
      der(OCTET_STRING, inner),
    ),
  };
}

/**
 * Imports the key and checks it is the leaf certificate's: same type and
 * curve, same public key (Web Crypto exports the public part of a private
 * key as JWK). Returns a non-extractable key for signing.
 */
async function checkKeyPair(
  info: KeyInfo,
  algorithm: JwtAlgorithm,
  pkcs8: Uint8Array<ArrayBuffer>,
  leafSpki: Tlv,
  keySource: Source,
  certSource: Source,
): Promise<CryptoKey> {
  const pkcs8Pem = toPem("PRIVATE KEY", pkcs8);
  let privateJwk: Record<string, unknown>;
  let signingKey: CryptoKey;
  try {
    const extractable = await importPKCS8(pkcs8Pem, algorithm, { extractable: true });
    privateJwk = { ...(await exportJWK(extractable)) };
    signingKey = await importPKCS8(pkcs8Pem, algorithm);
  } catch (err) {
    throw new AuthError(
      `${keySource.name}: cannot import the ${keyLabel(info)} key: ${message(err)}`,
      {
        cause: err,
      },
    );
  }
  if (info.kind === "RSA") {
    const bits = (signingKey.algorithm as { modulusLength?: number }).modulusLength ?? 0;
    if (bits < 2048) {
      throw new AuthError(
        `${keySource.name}: the RSA key has ${bits} bits; at least 2048 are required`,
      );
    }
  }

  let certInfo: KeyInfo;
  try {
    certInfo = keyType(children(leafSpki)[0]);
  } catch (err) {
    throw new AuthError(`${certSource.name}: leaf certificate: ${message(err)}`, { cause: err });
  }
  const mismatch = (detail: string) =>
    new AuthError(
      `${keySource.name} does not match the leaf certificate in ${certSource.name}: ${detail} ` +
        "(the first certificate of the chain must be the client's own)",
    );
  if (keyLabel(certInfo) !== keyLabel(info)) {
    throw mismatch(
      `the key is ${keyLabel(info)} but the certificate holds an ${keyLabel(certInfo)} public key`,
    );
  }
  let publicJwk: Record<string, unknown>;
  try {
    const spki = await importSPKI(toPem("PUBLIC KEY", leafSpki.raw), algorithm, {
      extractable: true,
    });
    publicJwk = { ...(await exportJWK(spki)) };
  } catch (err) {
    throw new AuthError(
      `${certSource.name}: cannot import the leaf certificate's public key: ${message(err)}`,
      { cause: err },
    );
  }
  const fields = info.kind === "RSA" ? ["n", "e"] : ["crv", "x", "y"];
  if (fields.some((f) => privateJwk[f] !== publicJwk[f])) {
    throw mismatch("it is a different key pair");
  }
  return signingKey;
}

// ---------------------------------------------------------------------------
// Certificates.

/** The tbsCertificate of a Certificate (RFC 5280 §4.1). */
function tbsCertificate(cert: Uint8Array): Tlv {
  const [tbs, sigAlg, sig] = children(expect(parseDer(cert), SEQUENCE, "Certificate"));
  expect(sigAlg, SEQUENCE, "signatureAlgorithm");
  expect(sig, BIT_STRING, "signatureValue");
  return expect(tbs, SEQUENCE, "tbsCertificate");
}

/**
 * The leaf's SubjectPublicKeyInfo: the 7th field of tbsCertificate, or the
 * 6th when the optional [0] version (v1 certificates) is absent.
 */
function subjectPublicKeyInfo(cert: Uint8Array, source: Source): Tlv {
  try {
    const fields = children(tbsCertificate(cert));
    const spki = fields[fields[0]?.tag === CONTEXT_0 ? 6 : 5];
    const [alg, key] = children(expect(spki, SEQUENCE, "subjectPublicKeyInfo"));
    expect(alg, SEQUENCE, "subjectPublicKeyInfo algorithm");
    expect(key, BIT_STRING, "subjectPublicKey");
    return spki;
  } catch (err) {
    throw new AuthError(`${source.name}: unreadable leaf certificate: ${message(err)}`, {
      cause: err,
    });
  }
}

// ---------------------------------------------------------------------------
// A minimal DER (X.690) reader and writer: single-byte tags, definite lengths,
// which is all that certificates and keys use.

const INTEGER = 0x02;
const BIT_STRING = 0x03;
const OCTET_STRING = 0x04;
const OID = 0x06;
const SEQUENCE = 0x30;
const CONTEXT_0 = 0xa0;
const CONTEXT_1 = 0xa1;

interface Tlv {
  tag: number;
  /** The contents. */
  value: Uint8Array;
  /** Tag, length and contents. */
  raw: Uint8Array;
}

/** The element at `pos` of `buf` and the position after it. */
function readTlv(buf: Uint8Array, pos: number): Tlv & { end: number } {
  if (pos + 2 > buf.length) throw new Error("truncated DER");
  const tag = buf[pos];
  if ((tag & 0x1f) === 0x1f) throw new Error("unexpected multi-byte DER tag");
  let length = buf[pos + 1];
  let start = pos + 2;
  if (length & 0x80) {
    const n = length & 0x7f;
    // 0 is BER's indefinite length; more than 4 bytes cannot fit the buffer anyway.
    if (n === 0 || n > 4 || start + n > buf.length) throw new Error("bad DER length");
    length = 0;
    for (let i = 0; i < n; i++) length = length * 256 + buf[start + i];
    start += n;
  }
  const end = start + length;
  if (end > buf.length) throw new Error("truncated DER");
  return { tag, value: buf.subarray(start, end), raw: buf.subarray(pos, end), end };
}

/** One element spanning all of `buf`. */
function parseDer(buf: Uint8Array): Tlv {
  const tlv = readTlv(buf, 0);
  if (tlv.end !== buf.length) throw new Error("trailing data after DER");
  return tlv;
}

/** The elements inside a constructed element (SEQUENCE, [0], ...). */
function children(tlv: Tlv): Tlv[] {
  const out: Tlv[] = [];
  for (let pos = 0; pos < tlv.value.length;) {
    const child = readTlv(tlv.value, pos);
    out.push(child);
    pos = child.end;
  }
  return out;
}

function expect(tlv: Tlv | undefined, tag: number, what: string): Tlv {
  if (tlv?.tag !== tag) throw new Error(`expected ${what}`);
  return tlv;
}

/** Encodes one element from its tag and contents. */
function der(tag: number, ...contents: Uint8Array[]): Uint8Array<ArrayBuffer> {
  const length = contents.reduce((n, c) => n + c.length, 0);
  const lengthBytes: number[] = [];
  for (let n = length; n > 0; n = Math.floor(n / 256)) lengthBytes.unshift(n & 0xff);
  const header = length < 0x80 ? [tag, length] : [tag, 0x80 | lengthBytes.length, ...lengthBytes];
  const out = new Uint8Array(header.length + length);
  out.set(header);
  let pos = header.length;
  for (const c of contents) {
    out.set(c, pos);
    pos += c.length;
  }
  return out;
}

/** Dotted form of an OBJECT IDENTIFIER, e.g. "1.2.840.10045.2.1". */
function oidString(tlv: Tlv): string {
  const arcs: number[] = [];
  let arc = 0;
  for (const byte of tlv.value) {
    arc = arc * 128 + (byte & 0x7f);
    if (!(byte & 0x80)) {
      arcs.push(arc);
      arc = 0;
    }
  }
  // The first subidentifier packs the first two arcs as 40 * a + b.
  const first = arcs.shift() ?? 0;
  const a = Math.min(2, Math.floor(first / 40));
  return [a, first - 40 * a, ...arcs].join(".");
}

function message(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
