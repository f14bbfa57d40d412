/**
 * NAME        certs/verify — check host certificates with node:crypto (no X.509 library)
 * DESCRIPTION `verifyHostCert` checks that a PEM certificate was issued and signed by the cluster
 *             CA, is valid now, is not a CA, and names `expect` (subject CN and a DNS SAN) when given.
 *             `loadNodeCredentials` reads this node's certificate, key and CA for the peer link and
 *             verifies them once at start, so a wrong file is reported by name, not as a TLS error.
 *             The TLS handshake itself (node:tls, `ca` = the cluster CA only) repeats the chain and
 *             date checks for every link.
 * SECURITY    Key bytes are read into memory for TLS only; errors name files, never contents.
 */
import type { X509Certificate } from 'node:crypto';
import { cryptoModule } from '../src/builtins.js';
import { readFileSync } from 'node:fs';
import { AppError } from '../src/errors.js';

export const HOST_CERT_DAYS = 825;
/** Warn (serve, node list) when a host certificate expires within this many days. */
export const EXPIRY_WARN_DAYS = 30;
/** Names every host certificate carries besides the node name (this host on loopback). */
export const LOOPBACK_NAMES: readonly string[] = ['localhost', '127.0.0.1', '::1'];

export interface HostCertInfo {
  readonly name: string;
  readonly fingerprint: string;
  readonly notAfter: Date;
}

/** The node name a host certificate carries (subject CN). */
export function certNodeName(x: X509Certificate): string {
  const m = /(?:^|\n)CN=([^\n]*)/.exec(x.subject);
  return m?.[1] ?? '';
}

/**
 * Why a certificate is outside its validity dates now, or null. node:tls checks the dates in a
 * full handshake; a resumed TLS session (src/peer/link.ts, Resumption) carries the result of the
 * one it resumes, so the peer link checks them again on every resumed link.
 */
export function certOutOfDate(x: X509Certificate, now = Date.now()): string | null {
  if (now < Date.parse(x.validFrom)) return `certificate of ${certNodeName(x)} is not valid before ${new Date(x.validFrom).toISOString()}`;
  if (now > Date.parse(x.validTo)) return `certificate of ${certNodeName(x)} expired on ${new Date(x.validTo).toISOString()}`;
  return null;
}

function dnsNames(x: X509Certificate): string[] {
  return (x.subjectAltName ?? '')
    .split(', ')
    .filter((s) => s.startsWith('DNS:'))
    .map((s) => s.slice(4));
}

/** Verify a host certificate against the cluster CA; throws AppError CERT_INVALID naming what is wrong. */
export function verifyHostCert(certPem: string | Buffer, caPem: string | Buffer, expect?: string, now = new Date()): HostCertInfo {
  let x: X509Certificate;
  let ca: X509Certificate;
  try {
    x = new (cryptoModule().X509Certificate)(certPem);
    ca = new (cryptoModule().X509Certificate)(caPem);
  } catch (e) {
    throw new AppError('CERT_INVALID', `not a PEM certificate: ${(e as Error).message}`);
  }
  if (!x.checkIssued(ca) || !x.verify(ca.publicKey)) throw new AppError('CERT_INVALID', `certificate of ${certNodeName(x) || '?'} was not issued by this cluster's CA (${ca.subject.replace(/\n/g, ', ')})`);
  if (x.ca) throw new AppError('CERT_INVALID', 'a CA certificate cannot be a node certificate');
  const from = new Date(x.validFrom);
  const to = new Date(x.validTo);
  if (now < from) throw new AppError('CERT_INVALID', `certificate of ${certNodeName(x)} is not valid before ${from.toISOString()}`);
  if (now > to) throw new AppError('CERT_INVALID', `certificate of ${certNodeName(x)} expired on ${to.toISOString()}; re-issue it with "pigeon cert issue ${certNodeName(x)}"`);
  const name = certNodeName(x);
  if (expect !== undefined && (name !== expect || !dnsNames(x).includes(expect))) {
    throw new AppError('CERT_INVALID', `certificate names node ${JSON.stringify(name)}, expected ${JSON.stringify(expect)}`);
  }
  return { name, fingerprint: x.fingerprint256, notAfter: to };
}

export interface NodeCredentials extends HostCertInfo {
  readonly ca: Buffer;
  readonly cert: Buffer;
  readonly key: Buffer;
}

/** This node's certificate, key and cluster CA, checked: the certificate must name `node`. */
export function loadNodeCredentials(files: { readonly cert: string; readonly key: string; readonly ca: string }, node: string): NodeCredentials {
  const read = (f: string, what: string): Buffer => {
    try {
      return readFileSync(f);
    } catch (e) {
      throw new AppError('CONFIG_INVALID', `cannot read ${what} ${f}: ${(e as NodeJS.ErrnoException).code ?? 'error'}`);
    }
  };
  const ca = read(files.ca, 'cluster CA certificate');
  const cert = read(files.cert, 'node certificate');
  const key = read(files.key, 'node key');
  let info: HostCertInfo;
  try {
    info = verifyHostCert(cert, ca, node);
  } catch (e) {
    throw new AppError('CONFIG_INVALID', `${files.cert}: ${(e as Error).message}`);
  }
  try {
    const pub = new (cryptoModule().X509Certificate)(cert).publicKey.export({ format: 'der', type: 'spki' });
    const fromKey = cryptoModule().createPublicKey(cryptoModule().createPrivateKey(key)).export({ format: 'der', type: 'spki' });
    if (!pub.equals(fromKey)) throw new Error('mismatch');
  } catch {
    throw new AppError('CONFIG_INVALID', `${files.key} is not the private key of ${files.cert}`);
  }
  return { ...info, ca, cert, key };
}
