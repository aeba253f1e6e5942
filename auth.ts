/**
 * Client identity for a Conveyor server that runs with authentication: the
 * client certificate chain, its private key and the CA, read once, checked,
 * and turned into short-lived bearer JWTs for the HTTP API and PEM material
 * for NATS mutual TLS.
 *
 * Signing uses Web Crypto (through `jose`), so the PEM-string path runs on
 * Deno, Bun, Node and edge runtimes; only the `*File` options need a file
 * system (reached through `process.getBuiltinModule`, never imported, so
 * that the client entry loads where there is none).
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
import { readEnv, readTextFile } from "./_util.ts";
import {
  checkChain,
  type Curve,
  ekuName,
  type KeyInfo,
  parseCertificate,
  privateKeyPkcs8,
  type X509,
} from "./_x509.ts";

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
 * declare const certPem: string, keyPem: string, caPem: string; // PEM text from a secret store
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
   * Lifetime of a token (`exp` - `iat`) in ms, from 30 s to a day; rounded
   * down to whole seconds. A token is renewed when a quarter of its lifetime
   * (at most 30 s) is left, so none is sent that could expire on its way.
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
  /** What the leaf certificate says of itself, for logs and expiry monitoring. */
  readonly certificate: CertificateInfo;
  /**
   * A bearer JWT. The same token is returned until less than a quarter of
   * its lifetime (at most 30 s) is left; then a new one is signed, once for
   * all concurrent callers. Rejects with an `AuthError` once the leaf
   * certificate has expired, since the server would refuse the token.
   */
  token(): Promise<string>;
  /**
   * PEM material for TLS (NATS mutual TLS): the certificate chain and the
   * CA certificate(s) if any (their CERTIFICATE blocks only), and the key as
   * given.
   */
  tls(): { cert: string; key: string; ca?: string };
}

/**
 * The leaf certificate of an {@link Identity}, as checked by
 * {@link createIdentity}.
 *
 * @example
 * ```ts
 * import { createIdentity } from "@conveyor/driver";
 * const { certificate } = await createIdentity();
 * const days = (certificate.notAfter.getTime() - Date.now()) / 86_400_000;
 * if (days < 7) console.warn(`${certificate.subject} expires in ${days.toFixed(1)} days`);
 * ```
 */
export interface CertificateInfo {
  /** The subject, most specific part first: `CN=driver, O=Acme`. */
  readonly subject: string;
  /** The issuer's name, in the same form. */
  readonly issuer: string;
  /** Start of the validity period: the identity is refused before it. */
  readonly notBefore: Date;
  /** End of the validity period: `token()` rejects after it. */
  readonly notAfter: Date;
  /**
   * The extended key usages (`serverAuth`, `clientAuth`, or an OID for
   * others); undefined when the certificate does not restrict them.
   */
  readonly extKeyUsage?: readonly string[];
}

/** Environment variables read by {@link authFromEnv} and {@link createIdentity}. */
const ENV_CERT = "CONVEYOR_CERT_FILE";
const ENV_KEY = "CONVEYOR_KEY_FILE";
const ENV_CA = "CONVEYOR_CA_FILE";

const DEFAULT_LIFETIME = 120_000;
/**
 * Shortest token lifetime, in ms. A token is handed out with at least a
 * quarter of its lifetime left (7.5 s here), enough for the request to reach
 * a server whose clock runs a little ahead; shorter tokens could expire in
 * flight.
 */
const MIN_LIFETIME = 30_000;
/** Longest token lifetime, in ms: a day. A bearer token is only as safe as it is short. */
const MAX_LIFETIME = 86_400_000;
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
 * P-256/P-384/P-521), a key that is not the one of the leaf certificate, and
 * a certificate the server would refuse: one not valid now (expired or not
 * yet valid), one not issued by the CA (checked when a CA is given: each
 * certificate of the chain must be signed by the next or by the CA, and each
 * issuer must be a CA), or one whose extended key usages leave out
 * serverAuth (the server checks chains for it, as Go does by default).
 * Rejects with a `ConfigError` for an invalid `rsaAlgorithm` or
 * `tokenLifetime`.
 *
 * @example
 * ```ts
 * import { createIdentity } from "@conveyor/driver";
 * declare const certPem: string, keyPem: string; // PEM text from a secret store
 * const identity = await createIdentity({ cert: certPem, key: keyPem, rsaAlgorithm: "PS256" });
 * console.log(identity.algorithm, identity.thumbprint);
 * ```
 */
export async function createIdentity(options: AuthOptions = {}): Promise<Identity> {
  const lifetime = options.tokenLifetime ?? DEFAULT_LIFETIME;
  if (!Number.isFinite(lifetime) || lifetime < MIN_LIFETIME || lifetime > MAX_LIFETIME) {
    throw new ConfigError(
      "tokenLifetime",
      `tokenLifetime must be from ${MIN_LIFETIME} to ${MAX_LIFETIME} ms, got ${lifetime}`,
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
  try {
    await checkChain(chain, caCerts, Date.now());
  } catch (err) {
    const against = caSource ? ` (checked against ${caSource.name})` : "";
    throw new AuthError(`${certSource.name}: ${message(err)}${against}`, { cause: err });
  }
  const { info, pkcs8 } = privateKey(keySource);
  const algorithm: JwtAlgorithm = info.kind === "RSA" ? rsaAlgorithm : EC_ALGORITHMS[info.curve];
  const signingKey = await checkKeyPair(info, algorithm, pkcs8, leaf, keySource, certSource);

  const thumbprint = base64url.encode(
    new Uint8Array(await crypto.subtle.digest("SHA-256", leaf.der)),
  );
  const identity = new ClientIdentity({
    algorithm,
    chain: Object.freeze(chain.map((c) => toBase64(c.der))),
    thumbprint,
    certificate: Object.freeze({
      subject: leaf.subject,
      issuer: leaf.issuer,
      notBefore: leaf.notBefore,
      notAfter: leaf.notAfter,
      extKeyUsage: leaf.extKeyUsage && Object.freeze(leaf.extKeyUsage.map(ekuName)),
    }),
    signingKey,
    lifetime: Math.floor(lifetime / 1000),
    // Certificates re-encoded, so that nothing else in the files (comments,
    // a key kept in the same file) reaches TLS; the key as given.
    tls: {
      cert: pemChain(chain.map((c) => c.der)),
      key: keySource.text,
      ca: caCerts && pemChain(caCerts.map((c) => c.der)),
    },
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

/**
 * Throws an `AuthError` when the identity's certificate cannot serve as a
 * NATS mutual-TLS client certificate: one that lists extended key usages must
 * list clientAuth (or anyExtendedKeyUsage). Internal: `startDriver` calls it
 * before connecting, so the failure names the certificate rather than a TLS
 * alert.
 */
export function checkClientAuth(identity: Identity): void {
  const info = (identity as Partial<Identity>).certificate; // a hand-made Identity may lack it
  const eku = info?.extKeyUsage;
  if (!eku || eku.includes("clientAuth") || eku.includes("anyExtendedKeyUsage")) return;
  throw new AuthError(
    `the client certificate "${info.subject}" lists the extended key usages ` +
      `${eku.join(", ")} but not clientAuth, which NATS requires of a mutual-TLS client`,
  );
}

// ---------------------------------------------------------------------------
// The identity and its token cache.

interface IdentityInit {
  algorithm: JwtAlgorithm;
  chain: readonly string[];
  thumbprint: string;
  certificate: CertificateInfo;
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
  readonly certificate: CertificateInfo;
  readonly #key: CryptoKey;
  readonly #lifetime: number;
  readonly #tls: IdentityInit["tls"];
  #current?: CachedToken;
  #pending?: Promise<string>;

  constructor(init: IdentityInit) {
    this.algorithm = init.algorithm;
    this.chain = init.chain;
    this.thumbprint = init.thumbprint;
    this.certificate = init.certificate;
    this.#key = init.signingKey;
    this.#lifetime = init.lifetime;
    this.#tls = init.tls;
  }

  token(): Promise<string> {
    const { notAfter, subject } = this.certificate;
    if (Date.now() > notAfter.getTime()) {
      return Promise.reject(
        new AuthError(
          `the client certificate "${subject}" expired on ${notAfter.toISOString()}; ` +
            "the server refuses its tokens: renew the certificate and restart",
        ),
      );
    }
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
    return { name, text: await readTextFile(file) };
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

/** Every CERTIFICATE block, parsed, in order; at least one. */
function certificates(source: Source): X509[] {
  const certs = pemBlocks(source).filter((b) => b.label === "CERTIFICATE").map((b) => b.der);
  if (certs.length === 0) {
    throw new AuthError(`${source.name}: no "-----BEGIN CERTIFICATE-----" PEM block found`);
  }
  return certs.map((der, i) => {
    try {
      return parseCertificate(der);
    } catch (err) {
      throw new AuthError(
        `${source.name}: certificate ${i + 1} is not a valid X.509 certificate: ${message(err)}`,
        { cause: err },
      );
    }
  });
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
// Keys: type and curve, and the match with the leaf.

const EC_ALGORITHMS: Record<Curve, JwtAlgorithm> = {
  "P-256": "ES256",
  "P-384": "ES384",
  "P-521": "ES512",
};

const keyLabel = (info: KeyInfo): string => info.kind === "RSA" ? "RSA" : `EC ${info.curve}`;

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
    return privateKeyPkcs8(block.label, block.der);
  } catch (err) {
    throw new AuthError(`${source.name}: unusable ${block.label}: ${message(err)}`, {
      cause: err,
    });
  }
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
  leaf: X509,
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
      { cause: err },
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

  const certInfo = leaf.keyInfo;
  if (certInfo instanceof Error) {
    throw new AuthError(`${certSource.name}: leaf certificate: ${certInfo.message}`, {
      cause: certInfo,
    });
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
    const spki = await importSPKI(toPem("PUBLIC KEY", leaf.spki), algorithm, {
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

function message(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
