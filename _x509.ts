// Internal (not exported from mod.ts): X.509 certificates and private keys for
// auth.ts, parsed with the @peculiar/asn1-* schemas and checked with Web
// Crypto, the way the Conveyor server (Go's crypto/x509) will check them:
// validity dates, the issuer chain up to the CA, CA constraints, and the
// extended key usage serverAuth. Failures are plain Errors carrying the
// reason; auth.ts names the file.
//
// Why not @peculiar/x509: it needs a global `Reflect.getMetadata` polyfill
// (tsyringe) installed before it loads, on every runtime; a library must not
// patch its users' globals. The schema packages beneath it need none.
import { AsnConvert } from "@peculiar/asn1-schema";
import {
  AlgorithmIdentifier,
  anyExtendedKeyUsage,
  BasicConstraints,
  Certificate,
  ExtendedKeyUsage,
  id_ce_basicConstraints,
  id_ce_extKeyUsage,
  id_ce_keyUsage,
  id_kp_serverAuth,
  KeyUsage,
  KeyUsageFlags,
  type Name,
} from "@peculiar/asn1-x509";
import {
  ECDSASigValue,
  ECParameters,
  ECPrivateKey,
  id_ecdsaWithSHA1,
  id_ecdsaWithSHA256,
  id_ecdsaWithSHA384,
  id_ecdsaWithSHA512,
  id_ecPublicKey,
  id_secp256r1,
  id_secp384r1,
  id_secp521r1,
} from "@peculiar/asn1-ecc";
import {
  id_rsaEncryption,
  id_RSASSA_PSS,
  id_sha1WithRSAEncryption,
  id_sha256,
  id_sha256WithRSAEncryption,
  id_sha384,
  id_sha384WithRSAEncryption,
  id_sha512,
  id_sha512WithRSAEncryption,
  RSAPrivateKey,
  RsaSaPssParams,
} from "@peculiar/asn1-rsa";
import { PrivateKey, PrivateKeyInfo } from "@peculiar/asn1-pkcs8";

/** A parsed certificate with what the checks and messages need. */
export interface X509 {
  der: Uint8Array<ArrayBuffer>;
  /** The subject as text, most specific first: `CN=driver, O=Acme`. */
  subject: string;
  /** The issuer as text. */
  issuer: string;
  notBefore: Date;
  notAfter: Date;
  /** The extended key usage OIDs; undefined when the extension is absent (any usage). */
  extKeyUsage: readonly string[] | undefined;
  /** The SubjectPublicKeyInfo, DER. */
  spki: Uint8Array<ArrayBuffer>;
  /** The key type of the SubjectPublicKeyInfo; an Error when not one the server takes. */
  keyInfo: KeyInfo | Error;
  readonly cert: Certificate;
  /** DER of the subject and issuer names, for matching a certificate to its issuer. */
  readonly subjectDer: Uint8Array;
  readonly issuerDer: Uint8Array;
}

export type Curve = "P-256" | "P-384" | "P-521";
export type KeyInfo = { kind: "RSA" } | { kind: "EC"; curve: Curve };

const CURVES: Record<string, Curve> = {
  [id_secp256r1]: "P-256",
  [id_secp384r1]: "P-384",
  [id_secp521r1]: "P-521",
};
/** Names of key types and curves we refuse, for the error message. */
const KNOWN_OIDS: Record<string, string> = {
  [id_RSASSA_PSS]: "RSASSA-PSS",
  "1.2.840.10040.4.1": "DSA",
  "1.3.101.110": "X25519",
  "1.3.101.111": "X448",
  "1.3.101.112": "Ed25519",
  "1.3.101.113": "Ed448",
  "1.3.132.0.10": "secp256k1",
};
const oidName = (oid: string): string => KNOWN_OIDS[oid] ? `${KNOWN_OIDS[oid]} (${oid})` : oid;

/** RFC 4514 short names of the attributes seen in certificate names. */
const ATTRIBUTE_NAMES: Record<string, string> = {
  "2.5.4.3": "CN",
  "2.5.4.5": "serialNumber",
  "2.5.4.6": "C",
  "2.5.4.7": "L",
  "2.5.4.8": "ST",
  "2.5.4.10": "O",
  "2.5.4.11": "OU",
  "0.9.2342.19200300.100.1.25": "DC",
  "0.9.2342.19200300.100.1.1": "UID",
  "1.2.840.113549.1.9.1": "emailAddress",
};

/** Parses one DER certificate; throws an Error saying what is wrong. */
export function parseCertificate(der: Uint8Array<ArrayBuffer>): X509 {
  const cert = AsnConvert.parse(der, Certificate);
  const tbs = cert.tbsCertificate;
  const extensions = tbs.extensions ?? [];
  const ext = (id: string) => extensions.find((e) => e.extnID === id)?.extnValue.buffer;
  const eku = ext(id_ce_extKeyUsage);
  const spki = new Uint8Array(AsnConvert.serialize(tbs.subjectPublicKeyInfo));
  let keyInfo: KeyInfo | Error;
  try {
    keyInfo = keyType(tbs.subjectPublicKeyInfo.algorithm);
  } catch (err) {
    keyInfo = err as Error;
  }
  return {
    der,
    cert,
    subject: nameText(tbs.subject),
    issuer: nameText(tbs.issuer),
    subjectDer: new Uint8Array(AsnConvert.serialize(tbs.subject)),
    issuerDer: new Uint8Array(AsnConvert.serialize(tbs.issuer)),
    notBefore: tbs.validity.notBefore.getTime(),
    notAfter: tbs.validity.notAfter.getTime(),
    extKeyUsage: eku && [...AsnConvert.parse(eku, ExtendedKeyUsage)],
    spki,
    keyInfo,
  };
}

/** `CN=leaf, O=Conveyor tests`: RFC 4514 order, most specific first. */
function nameText(name: Name): string {
  return [...name].reverse().map((rdn) =>
    rdn.map((atv) => `${ATTRIBUTE_NAMES[atv.type] ?? atv.type}=${atv.value.toString()}`)
      .join("+")
  ).join(", ") || "(empty name)";
}

/**
 * The key type of an AlgorithmIdentifier (SPKI or PKCS#8): RSA, or EC with a
 * named curve; throws for anything the server does not accept.
 */
export function keyType(algorithm: AlgorithmIdentifier): KeyInfo {
  if (algorithm.algorithm === id_rsaEncryption) return { kind: "RSA" };
  if (algorithm.algorithm !== id_ecPublicKey) {
    throw new Error(`unsupported key type ${oidName(algorithm.algorithm)}: use an RSA or EC key`);
  }
  const params = algorithm.parameters && AsnConvert.parse(algorithm.parameters, ECParameters);
  return { kind: "EC", curve: namedCurve(params ?? undefined) };
}

function namedCurve(params: ECParameters | undefined): Curve {
  const oid = params?.namedCurve;
  if (!oid) throw new Error("the EC key does not name its curve");
  const curve = CURVES[oid];
  if (!curve) {
    throw new Error(`unsupported EC curve ${oidName(oid)}: use P-256, P-384 or P-521`);
  }
  return curve;
}

// ---------------------------------------------------------------------------
// Private keys: PKCS#8, SEC1 and PKCS#1, all turned into PKCS#8 for Web Crypto.

/**
 * The key of a PEM block (`PRIVATE KEY`, `EC PRIVATE KEY` or `RSA PRIVATE
 * KEY`) as PKCS#8 DER with its type; throws an Error saying what is wrong.
 */
export function privateKeyPkcs8(
  label: string,
  der: Uint8Array<ArrayBuffer>,
): { info: KeyInfo; pkcs8: Uint8Array<ArrayBuffer> } {
  if (label === "RSA PRIVATE KEY") {
    AsnConvert.parse(der, RSAPrivateKey); // throws when it is not one
    return {
      info: { kind: "RSA" },
      pkcs8: pkcs8(new AlgorithmIdentifier({ algorithm: id_rsaEncryption, parameters: null }), der),
    };
  }
  if (label === "EC PRIVATE KEY") {
    // The curve moves from the key's parameters to the AlgorithmIdentifier;
    // the inner key drops them, which some Web Crypto implementations refuse
    // inside PKCS#8.
    const key = AsnConvert.parse(der, ECPrivateKey);
    const info: KeyInfo = { kind: "EC", curve: namedCurve(key.parameters) };
    const inner = new ECPrivateKey({ privateKey: key.privateKey, publicKey: key.publicKey });
    return {
      info,
      pkcs8: pkcs8(
        new AlgorithmIdentifier({
          algorithm: id_ecPublicKey,
          parameters: AsnConvert.serialize(key.parameters),
        }),
        new Uint8Array(AsnConvert.serialize(inner)),
      ),
    };
  }
  const info = AsnConvert.parse(der, PrivateKeyInfo);
  return { info: keyType(info.privateKeyAlgorithm), pkcs8: der };
}

function pkcs8(algorithm: AlgorithmIdentifier, key: Uint8Array): Uint8Array<ArrayBuffer> {
  const info = new PrivateKeyInfo({
    privateKeyAlgorithm: algorithm,
    privateKey: new PrivateKey(key),
  });
  return new Uint8Array(AsnConvert.serialize(info));
}

// ---------------------------------------------------------------------------
// Checks.

/** Why `cert` is not valid at `now` (ms since the epoch), or undefined. */
export function validityProblem(cert: X509, now: number): string | undefined {
  if (now < cert.notBefore.getTime()) {
    return `is not valid before ${cert.notBefore.toISOString()}`;
  }
  if (now > cert.notAfter.getTime()) return `expired on ${cert.notAfter.toISOString()}`;
  return undefined;
}

/**
 * Why `cert` cannot be used for serverAuth, the usage the server's chain check
 * asks for (Go's default), or undefined: a certificate that lists extended key
 * usages must list serverAuth or anyExtendedKeyUsage.
 */
export function serverAuthProblem(cert: X509): string | undefined {
  const eku = cert.extKeyUsage;
  if (!eku || eku.includes(id_kp_serverAuth) || eku.includes(anyExtendedKeyUsage)) {
    return undefined;
  }
  return `lists the extended key usages ${eku.map(ekuName).join(", ")} but not serverAuth, ` +
    "which the Conveyor server requires when it verifies the chain";
}

const EKU_NAMES: Record<string, string> = {
  "1.3.6.1.5.5.7.3.1": "serverAuth",
  "1.3.6.1.5.5.7.3.2": "clientAuth",
  "1.3.6.1.5.5.7.3.3": "codeSigning",
  "1.3.6.1.5.5.7.3.4": "emailProtection",
  "1.3.6.1.5.5.7.3.8": "timeStamping",
  "1.3.6.1.5.5.7.3.9": "OCSPSigning",
  "2.5.29.37.0": "anyExtendedKeyUsage",
};
/** An extended key usage's name, or its OID. */
export const ekuName = (oid: string): string => EKU_NAMES[oid] ?? oid;

/**
 * Why `issuer` may not sign certificates, as Go's CheckSignatureFrom sees it,
 * or undefined: a v3 certificate must say CA:TRUE in basicConstraints, and a
 * keyUsage, when present, must include keyCertSign.
 */
function caProblem(issuer: X509): string | undefined {
  const tbs = issuer.cert.tbsCertificate;
  const ext = (id: string) => tbs.extensions?.find((e) => e.extnID === id)?.extnValue.buffer;
  const bc = ext(id_ce_basicConstraints);
  const isCa = bc !== undefined && AsnConvert.parse(bc, BasicConstraints).cA;
  // Version is 0-based: 2 is v3; v1 certificates have no extensions to say CA:TRUE.
  if (tbs.version === 2 && !isCa) return "is not a CA certificate (basicConstraints CA:TRUE)";
  const ku = ext(id_ce_keyUsage);
  if (ku !== undefined) {
    const flags = AsnConvert.parse(ku, KeyUsage).toNumber();
    if (!(flags & KeyUsageFlags.keyCertSign)) return "has a keyUsage without keyCertSign";
  }
  return undefined;
}

/**
 * Checks the chain as the server will: from the leaf, each certificate's
 * issuer is found among `anchors` (the CA file) or the rest of `chain` by name
 * and must have signed it; every certificate on that path must be valid at
 * `now` and allow serverAuth. Without anchors, only the links the chain
 * itself holds are checked. Throws an Error with the reason.
 */
export async function checkChain(
  chain: readonly X509[],
  anchors: readonly X509[] | undefined,
  now: number,
): Promise<void> {
  const check = (cert: X509, role: string) => {
    const problem = validityProblem(cert, now) ?? serverAuthProblem(cert);
    if (problem) throw new Error(`${role} "${cert.subject}" ${problem}`);
  };
  let current = chain[0];
  check(current, "the certificate");
  const pool = chain.slice(1);
  // Each step uses up a certificate of the pool, so the walk ends.
  for (;;) {
    if (anchors?.some((a) => sameBytes(a.der, current.der))) return; // the CA itself
    const candidates = [
      ...(anchors ?? []).map((cert) => ({ cert, anchor: true })),
      ...pool.map((cert) => ({ cert, anchor: false })),
    ].filter((c) => sameBytes(c.cert.subjectDer, current.issuerDer));
    if (candidates.length === 0) {
      if (!anchors) return; // nothing to check it against
      const selfSigned = sameBytes(current.subjectDer, current.issuerDer);
      throw new Error(
        `the certificate "${current.subject}" was not issued by the CA: ` +
          (selfSigned
            ? "it is self-signed and not in the CA file"
            : `its issuer "${current.issuer}" is neither in the CA file nor in the chain`),
      );
    }
    let reason = "";
    let found: { cert: X509; anchor: boolean } | undefined;
    for (const candidate of candidates) {
      const problem = caProblem(candidate.cert) ??
        await signatureProblem(current, candidate.cert);
      if (problem === undefined) {
        found = candidate;
        break;
      }
      reason = `its issuer "${candidate.cert.subject}" ${problem}`;
    }
    if (!found) {
      throw new Error(`the certificate "${current.subject}" was not issued by the CA: ${reason}`);
    }
    check(found.cert, found.anchor ? "the CA certificate" : "the intermediate certificate");
    if (found.anchor) return;
    pool.splice(pool.indexOf(found.cert), 1);
    current = found.cert;
  }
}

/** Why `child`'s signature does not verify with `issuer`'s key, or undefined. */
async function signatureProblem(child: X509, issuer: X509): Promise<string | undefined> {
  const algorithm = child.cert.signatureAlgorithm;
  let signature = new Uint8Array(child.cert.signatureValue);
  let curve: Curve | undefined;
  // Web Crypto parameter shapes, spelled out: the npm build has no DOM types.
  let importAlg: { name: string; hash?: string; namedCurve?: string };
  let verifyAlg: { name: string; hash?: string; saltLength?: number };
  const rsa = RSA_PKCS1[algorithm.algorithm];
  const ecdsa = ECDSA[algorithm.algorithm];
  if (rsa) {
    importAlg = { name: "RSASSA-PKCS1-v1_5", hash: rsa };
    verifyAlg = { name: "RSASSA-PKCS1-v1_5" };
  } else if (algorithm.algorithm === id_RSASSA_PSS && algorithm.parameters) {
    const params = AsnConvert.parse(algorithm.parameters, RsaSaPssParams);
    const hash = HASHES[params.hashAlgorithm.algorithm];
    if (!hash) return `signed it with RSA-PSS over ${params.hashAlgorithm.algorithm}, unsupported`;
    importAlg = { name: "RSA-PSS", hash };
    verifyAlg = { name: "RSA-PSS", saltLength: params.saltLength };
  } else if (ecdsa) {
    const info = issuer.keyInfo;
    if (info instanceof Error || info.kind !== "EC") {
      return "does not hold the EC key its ECDSA signature needs";
    }
    importAlg = { name: "ECDSA", namedCurve: info.curve };
    verifyAlg = { name: "ECDSA", hash: ecdsa };
    curve = info.curve;
  } else if (algorithm.algorithm === "1.3.101.112") {
    importAlg = verifyAlg = { name: "Ed25519" };
  } else if (
    algorithm.algorithm === id_sha1WithRSAEncryption || algorithm.algorithm === id_ecdsaWithSHA1
  ) {
    return "signed it with SHA-1, which the Conveyor server refuses";
  } else {
    return `signed it with ${algorithm.algorithm}, a signature algorithm this check does not know`;
  }
  try {
    const key = await crypto.subtle.importKey("spki", issuer.spki, importAlg, false, ["verify"]);
    if (curve) signature = ecdsaRaw(signature, curve);
    const tbs = child.cert.tbsCertificateRaw!;
    if (await crypto.subtle.verify(verifyAlg, key, signature, tbs)) return undefined;
    return "has a key that does not verify its signature";
  } catch (err) {
    return `has a key that cannot check its signature (${(err as Error).message})`;
  }
}

const RSA_PKCS1: Record<string, string> = {
  [id_sha256WithRSAEncryption]: "SHA-256",
  [id_sha384WithRSAEncryption]: "SHA-384",
  [id_sha512WithRSAEncryption]: "SHA-512",
};
const ECDSA: Record<string, string> = {
  [id_ecdsaWithSHA256]: "SHA-256",
  [id_ecdsaWithSHA384]: "SHA-384",
  [id_ecdsaWithSHA512]: "SHA-512",
};
const HASHES: Record<string, string> = {
  [id_sha256]: "SHA-256",
  [id_sha384]: "SHA-384",
  [id_sha512]: "SHA-512",
};
const CURVE_BYTES: Record<Curve, number> = { "P-256": 32, "P-384": 48, "P-521": 66 };

/** An X.509 ECDSA signature (DER SEQUENCE of r, s) as Web Crypto's r || s. */
function ecdsaRaw(der: Uint8Array, curve: Curve): Uint8Array<ArrayBuffer> {
  const { r, s } = AsnConvert.parse(der, ECDSASigValue);
  const size = CURVE_BYTES[curve];
  const out = new Uint8Array(2 * size);
  const put = (int: ArrayBuffer, at: number) => {
    let bytes = new Uint8Array(int);
    while (bytes.length > size && bytes[0] === 0) bytes = bytes.subarray(1); // sign byte
    if (bytes.length > size) throw new Error("ECDSA signature value too long for the curve");
    out.set(bytes, at + size - bytes.length);
  };
  put(r, 0);
  put(s, size);
  return out;
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}
