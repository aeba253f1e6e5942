// Test helper (not published): a throw-away PKI made with the openssl CLI, for
// the auth tests and for NATS mutual-TLS tests. Nothing it writes is ever
// committed: it lives in a temporary directory removed by cleanup().
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";

/** The leaf key types: RSA 2048 and the three EC curves the server accepts. */
export type TestKeyType = "rsa" | "p256" | "p384" | "p521";

/** A PEM file and its contents. */
export interface PemFile {
  path: string;
  pem: string;
}

/** A CA: self-signed certificate and key (PKCS#8). */
export interface TestCa {
  cert: PemFile;
  key: PemFile;
}

/** A leaf certificate signed by a CA, with its key in each format. */
export interface TestLeaf {
  type: TestKeyType | "ed25519";
  /** The certificate file: the leaf alone, or for `chained` the leaf then the intermediate. */
  cert: PemFile;
  /**
   * The same key as `PRIVATE KEY` (PKCS#8) and in its traditional form:
   * `EC PRIVATE KEY` (SEC1) for EC, `RSA PRIVATE KEY` (PKCS#1) for RSA.
   */
  keys: { pkcs8: PemFile; traditional: PemFile };
}

/** What {@link makeTestPki} made. */
export interface TestPki extends AsyncDisposable {
  /** The directory holding every file. */
  dir: string;
  /** The CA that signed every leaf of `leaves` and `chained`'s intermediate. */
  ca: TestCa;
  /** One leaf per key type, each signed by `ca`. */
  leaves: Record<TestKeyType, TestLeaf>;
  /** An EC P-256 leaf signed by an intermediate CA (itself signed by `ca`); its cert is the chain. */
  chained: TestLeaf & { intermediate: PemFile };
  /** An unrelated CA and an EC P-256 leaf it signed, for negative tests. */
  other: { ca: TestCa; leaf: TestLeaf };
  /**
   * Issues one more certificate, for tests of what the server refuses: any
   * validity dates, digest, RSA-PSS, extensions; signed by `issuer` (default
   * `ca`) or self-signed. The result can itself issue (it has `key`).
   */
  issue(options: IssueOptions): TestLeaf & TestCa;
  /** Removes what was written (and the directory when makeTestPki created it). */
  cleanup(): Promise<void>;
}

/** What {@link TestPki.issue} makes. */
export interface IssueOptions {
  /** File names, and the CN unless `subject` is given. */
  name: string;
  /** The CN, when it is not `name` (e.g. an impostor of a CA). */
  subject?: string;
  /** The new certificate's key; Ed25519 only for issuers (the server takes no Ed25519 leaf). @default "p256" */
  type?: TestKeyType | "ed25519";
  /** The signer; "self" for a self-signed certificate. @default the PKI's ca */
  issuer?: TestCa | "self";
  /**
   * A section of the test OpenSSL config: `leaf_ext` (serverAuth and
   * clientAuth), `leaf_client_only`, `leaf_server_only`, `leaf_no_eku`, `ca_ext`,
   * `ca_client_only` (a CA restricted to clientAuth).
   * @default "leaf_ext"
   */
  extensions?:
    | "leaf_ext"
    | "leaf_client_only"
    | "leaf_server_only"
    | "leaf_no_eku"
    | "ca_ext"
    | "ca_client_only";
  /** @default an hour ago */
  notBefore?: Date;
  /** @default 30 days from now */
  notAfter?: Date;
  /** @default "sha256" */
  digest?: "sha1" | "sha256" | "sha384" | "sha512";
  /** Sign with RSA-PSS (the issuer's key must be RSA). */
  pss?: boolean;
}

// Every leaf can also serve as a NATS server certificate (mutual-TLS tests):
// the Conveyor server verifies with Go's default usage (serverAuth), and NATS
// mTLS needs clientAuth.
const OPENSSL_CONFIG = `
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[leaf_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[leaf_client_only]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
[leaf_server_only]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
[leaf_no_eku]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
[ca_client_only]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
extendedKeyUsage = clientAuth
# For issue(): openssl ca, which can set any validity dates.
[ca]
default_ca = test_ca
[test_ca]
database = ca.index
new_certs_dir = .
serial = ca.serial
unique_subject = no
policy = any
email_in_dn = no
[any]
commonName = supplied
organizationName = optional
`;

/** `openssl genpkey` arguments by key type. */
const KEYGEN: Record<TestKeyType, string> = {
  rsa: "-algorithm RSA -pkeyopt rsa_keygen_bits:2048",
  p256: "-algorithm EC -pkeyopt ec_paramgen_curve:P-256",
  p384: "-algorithm EC -pkeyopt ec_paramgen_curve:P-384",
  p521: "-algorithm EC -pkeyopt ec_paramgen_curve:P-521",
};

/**
 * Makes a CA with one leaf per key type, a leaf behind an intermediate CA, and
 * an unrelated CA with its own leaf, in `dir` (default: a new directory under
 * the system's temporary directory). Needs `openssl` (3.x) on the PATH, or
 * its path in `OPENSSL_BIN`; runs it synchronously (about a second, most of it
 * for the RSA key).
 */
export function makeTestPki(dir?: string): Promise<TestPki> {
  const created = dir === undefined;
  const root = dir ?? mkdtempSync(join(tmpdir(), "conveyor-pki-"));
  mkdirSync(root, { recursive: true });
  const written: string[] = [];
  const path = (name: string): string => {
    const p = join(root, name);
    written.push(p);
    return p;
  };
  const cleanup = (): Promise<void> => {
    if (created) rmSync(root, { recursive: true, force: true });
    else for (const p of written) rmSync(p, { force: true });
    return Promise.resolve();
  };
  try {
    const config = path("openssl.cnf");
    writeFileSync(config, OPENSSL_CONFIG);
    /** Runs `openssl <command> -flag value...`; flags in the order given. */
    const openssl = (command: string, flags: Record<string, string> = {}): void => {
      const args = Object.entries(flags).flatMap(([flag, value]) => [`-${flag}`, value]);
      execFileSync(process.env.OPENSSL_BIN ?? "openssl", [...command.split(" "), ...args], {
        stdio: ["ignore", "ignore", "pipe"],
        cwd: root, // openssl ca's database paths are relative
      });
    };
    const read = (p: string): PemFile => ({ path: p, pem: readFileSync(p, "utf8") });
    // A random 128-bit serial; the leading 1 keeps it positive and non-zero.
    const serial = (): string =>
      "0x1" + Array.from(crypto.getRandomValues(new Uint8Array(15)), (b) => b.toString(16))
        .map((h) => h.padStart(2, "0")).join("");
    /** Signs the request `csr` into `cert` with `issuer`, adding the config's `extensions`. */
    const signReq = (csr: string, issuer: TestCa, extensions: string, cert: string): void =>
      openssl("x509 -req -days 30 -sha256", {
        in: csr,
        CA: issuer.cert.path,
        CAkey: issuer.key.path,
        set_serial: serial(),
        extfile: config,
        extensions,
        out: cert,
      });
    const subject = (name: string): string => `/O=Conveyor tests/CN=${name}`;

    const makeCa = (name: string, issuer?: TestCa): TestCa => {
      const key = path(`${name}.key`);
      const cert = path(`${name}.pem`);
      openssl(`genpkey ${KEYGEN.p256}`, { out: key });
      if (issuer) {
        const csr = path(`${name}.csr`);
        openssl("req -new", { config, key, subj: subject(name), out: csr });
        signReq(csr, issuer, "ca_ext", cert);
      } else {
        openssl("req -x509 -new -days 30 -sha256 -extensions ca_ext", {
          config,
          key,
          subj: subject(name),
          out: cert,
        });
      }
      return { cert: read(cert), key: read(key) };
    };

    const makeLeaf = (name: string, type: TestKeyType, issuer: TestCa): TestLeaf => {
      const pkcs8 = path(`${name}.key`);
      const traditional = path(`${name}.${type === "rsa" ? "pkcs1" : "sec1"}.key`);
      const csr = path(`${name}.csr`);
      const cert = path(`${name}.crt`);
      openssl(`genpkey ${KEYGEN[type]}`, { out: pkcs8 });
      // OpenSSL 3 writes RSA PRIVATE KEY (PKCS#1) or EC PRIVATE KEY (SEC1) with -traditional.
      openssl("pkey -traditional", { in: pkcs8, out: traditional });
      openssl("req -new", { config, key: pkcs8, subj: subject(name), out: csr });
      signReq(csr, issuer, "leaf_ext", cert);
      return {
        type,
        cert: read(cert),
        keys: { pkcs8: read(pkcs8), traditional: read(traditional) },
      };
    };

    const ca = makeCa("ca");
    const leaves = {} as Record<TestKeyType, TestLeaf>;
    for (const type of Object.keys(KEYGEN) as TestKeyType[]) {
      leaves[type] = makeLeaf(`leaf-${type}`, type, ca);
    }
    const intermediate = makeCa("intermediate", ca);
    const chainedLeaf = makeLeaf("leaf-chained", "p256", intermediate);
    const chainPath = path("leaf-chained.chain.crt");
    writeFileSync(chainPath, chainedLeaf.cert.pem + intermediate.cert.pem);
    const chained = { ...chainedLeaf, cert: read(chainPath), intermediate: intermediate.cert };
    const otherCa = makeCa("other-ca");
    const other = { ca: otherCa, leaf: makeLeaf("other-leaf", "p256", otherCa) };

    writeFileSync(path("ca.index"), "");
    writeFileSync(path("ca.index.attr"), "unique_subject = no\n");
    const asn1Time = (d: Date): string => d.toISOString().replace(/[-:T]|\.\d+/g, "");
    let issued = 0;
    const issueOne = (o: IssueOptions): TestLeaf & TestCa => {
      const type = o.type ?? "p256";
      if (existsSync(join(root, `${o.name}.key`))) {
        throw new Error(`a certificate named ${o.name} exists already`);
      }
      const key = path(`${o.name}.key`);
      const csr = path(`${o.name}.csr`);
      const cert = path(`${o.name}.crt`);
      openssl(`genpkey ${type === "ed25519" ? "-algorithm ED25519" : KEYGEN[type]}`, { out: key });
      openssl("req -new", { config, key, subj: subject(o.subject ?? o.name), out: csr });
      const hex = (++issued).toString(16).padStart(2, "0");
      writeFileSync(path("ca.serial"), hex + "\n");
      path(`${hex.toUpperCase()}.pem`); // openssl ca's own copy, removed by cleanup
      for (const f of ["ca.index.old", "ca.index.attr.old", "ca.serial.old"]) path(f);
      const issuer = o.issuer ?? ca;
      const now = Date.now();
      const flags: Record<string, string> = {
        config,
        ...(issuer === "self"
          ? { keyfile: key }
          : { cert: issuer.cert.path, keyfile: issuer.key.path }),
        in: csr,
        out: cert,
        // Ed25519 signs the message itself: no digest to choose.
        ...((issuer === "self" ? type : (issuer as Partial<TestLeaf>).type) === "ed25519"
          ? {}
          : { md: o.digest ?? "sha256" }),
        startdate: asn1Time(o.notBefore ?? new Date(now - 3_600_000)),
        enddate: asn1Time(o.notAfter ?? new Date(now + 30 * 86_400_000)),
        extfile: config,
        extensions: o.extensions ?? "leaf_ext",
        ...(o.pss ? { sigopt: "rsa_padding_mode:pss" } : {}),
      };
      openssl(`ca -batch -notext -preserveDN${issuer === "self" ? " -selfsign" : ""}`, flags);
      const pkcs8 = read(key);
      return {
        type,
        cert: read(cert),
        key: pkcs8,
        keys: { pkcs8, traditional: pkcs8 },
      };
    };
    const issue = (o: IssueOptions): TestLeaf & TestCa => {
      try {
        return issueOne(o);
      } catch (err) {
        const stderr = (err as { stderr?: Uint8Array }).stderr;
        const detail = stderr ? `: ${new TextDecoder().decode(stderr).trim()}` : "";
        throw new Error(`cannot issue ${o.name} with openssl${detail}`, { cause: err });
      }
    };

    return Promise.resolve({
      dir: root,
      ca,
      leaves,
      chained,
      other,
      issue,
      cleanup,
      [Symbol.asyncDispose]: cleanup,
    });
  } catch (err) {
    cleanup();
    const stderr = (err as { stderr?: Uint8Array }).stderr;
    const detail = stderr ? `: ${new TextDecoder().decode(stderr).trim()}` : "";
    return Promise.reject(
      new Error(`cannot make the test PKI with openssl${detail}`, { cause: err }),
    );
  }
}
