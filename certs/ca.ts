/**
 * NAME        certs/ca — the cluster CA and node host certificates (node-forge)
 * SYNOPSIS    pigeon init DIR [--ca-from DIR] ; pigeon cert issue NODE --out DIR
 * DESCRIPTION The CA signs one host certificate per node; the node name is in the subject CN and
 *             the subjectAltName (plus loopback/localhost for this host). Host certificates serve
 *             both TLS ends of a peer link (serverAuth + clientAuth) and are the default certificate
 *             for client-facing TLS. RSA keys come from node:crypto (fast), signing from forge.
 * SECURITY    Private keys are written with mode 0600 and never logged or sent anywhere.
 */
import forge from 'node-forge';
import { generateKeyPairSync, randomBytes, X509Certificate } from 'node:crypto';
import { writeFileSync, readFileSync } from 'node:fs';

export interface KeyPair {
  readonly certPem: string;
  readonly keyPem: string;
}

function rsa(): { pub: forge.pki.PublicKey; priv: forge.pki.rsa.PrivateKey; keyPem: string } {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const keyPem = privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
  const priv = forge.pki.privateKeyFromPem(keyPem) as forge.pki.rsa.PrivateKey;
  const pub = forge.pki.setRsaPublicKey(priv.n, priv.e);
  return { pub, priv, keyPem };
}

function serial(): string {
  const b = randomBytes(16);
  b[0] = (b[0] ?? 0) & 0x7f; // positive
  return b.toString('hex');
}

export function createCa(clusterName: string, years = 10): KeyPair {
  const k = rsa();
  const cert = forge.pki.createCertificate();
  cert.publicKey = k.pub;
  cert.serialNumber = serial();
  cert.validity.notBefore = new Date(Date.now() - 60_000);
  cert.validity.notAfter = new Date(Date.now() + years * 365 * 86400_000);
  const attrs = [
    { name: 'commonName', value: `PigeonDeliver cluster CA ${clusterName}` },
    { name: 'organizationName', value: 'PigeonDeliver' },
  ];
  cert.setSubject(attrs);
  cert.setIssuer(attrs);
  cert.setExtensions([
    { name: 'basicConstraints', cA: true, critical: true, pathLenConstraint: 0 },
    { name: 'keyUsage', keyCertSign: true, cRLSign: true, critical: true },
    { name: 'subjectKeyIdentifier' },
  ]);
  cert.sign(k.priv, forge.md.sha256.create());
  return { certPem: forge.pki.certificateToPem(cert), keyPem: k.keyPem };
}

/** Validity of a host certificate: `days` from now (default 825, as public CAs cap it), or explicit dates (tests). */
export interface Validity {
  readonly days?: number;
  readonly notBefore?: Date;
  readonly notAfter?: Date;
}

export const HOST_CERT_DAYS = 825;
/** Warn (serve, node list) when a host certificate expires within this many days. */
export const EXPIRY_WARN_DAYS = 30;
/** Names every host certificate carries besides the node name (this host on loopback). */
export const LOOPBACK_NAMES: readonly string[] = ['localhost', '127.0.0.1', '::1'];

export function issueHostCert(ca: KeyPair, nodeName: string, extraNames: readonly string[] = [], validity: Validity = {}): KeyPair {
  const caCert = forge.pki.certificateFromPem(ca.certPem);
  const caKey = forge.pki.privateKeyFromPem(ca.keyPem);
  const k = rsa();
  const cert = forge.pki.createCertificate();
  cert.publicKey = k.pub;
  cert.serialNumber = serial();
  cert.validity.notBefore = validity.notBefore ?? new Date(Date.now() - 60_000);
  cert.validity.notAfter = validity.notAfter ?? new Date(Date.now() + (validity.days ?? HOST_CERT_DAYS) * 86400_000);
  cert.setSubject([
    { name: 'commonName', value: nodeName },
    { name: 'organizationName', value: 'PigeonDeliver' },
  ]);
  cert.setIssuer(caCert.subject.attributes);
  const names = [...new Set([nodeName, ...extraNames])];
  const altNames = names.map((n) => (/^[\d.]+$|:/.test(n) ? { type: 7, ip: n } : { type: 2, value: n }));
  cert.setExtensions([
    { name: 'basicConstraints', cA: false, critical: true },
    { name: 'keyUsage', digitalSignature: true, keyEncipherment: true, critical: true },
    { name: 'extKeyUsage', serverAuth: true, clientAuth: true },
    { name: 'subjectAltName', altNames },
    { name: 'subjectKeyIdentifier' },
    { name: 'authorityKeyIdentifier', keyIdentifier: caCert.generateSubjectKeyIdentifier().getBytes() },
  ]);
  cert.sign(caKey, forge.md.sha256.create());
  return { certPem: forge.pki.certificateToPem(cert), keyPem: k.keyPem };
}

/** SHA-256 fingerprint as `AA:BB:…`, the form stored in the nodes table. */
export function fingerprint(certPem: string): string {
  return new X509Certificate(certPem).fingerprint256;
}

export function writeKeyPair(kp: KeyPair, certFile: string, keyFile: string): void {
  writeFileSync(keyFile, kp.keyPem, { mode: 0o600, flag: 'wx' });
  writeFileSync(certFile, kp.certPem, { mode: 0o644, flag: 'wx' });
}

export function readKeyPair(certFile: string, keyFile: string): KeyPair {
  return { certPem: readFileSync(certFile, 'utf8'), keyPem: readFileSync(keyFile, 'utf8') };
}
