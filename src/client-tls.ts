/**
 * NAME        src/client-tls — the certificates IMAP/POP3 clients see (tls.cert/tls.key, tls.sni)
 * SYNOPSIS    pigeon.yaml:  tls: { cert: FILE, key: FILE, sni: { "mail.example.org": { cert: FILE, key: FILE } } }
 * DESCRIPTION STARTTLS/STLS and the imaps/pop3s listeners present tls.cert/tls.key — by default
 *             this node's certificate from the cluster CA, so a fresh instance works, but any
 *             certificate will do, typically a public one — or, when the client names a host
 *             (SNI) that tls.sni lists, that entry's pair: the exact name first, then a
 *             `*.example.org` entry for one more label. Peer links never use these: they present
 *             peer.cert/peer.key (src/peer/context.ts).
 *             `checkPair` is what `pigeon config test` reports for each pair: readable, a PEM
 *             certificate, the key belongs to it, valid now.
 * DIAGNOSTICS AppError CONFIG_INVALID naming the setting and the file.
 * SECURITY    Key bytes go to node:tls only; errors name files, never their contents.
 */
import { createSecureContext, type SecureContext } from 'node:tls';
import { X509Certificate, createPrivateKey, createPublicKey } from 'node:crypto';
import { readFileSync } from 'node:fs';
import type { Instance } from './instance.js';
import { AppError } from './errors.js';

export interface CertPair {
  /** the setting, for messages: "tls", "tls.sni.mail.example.org", "peer" */
  readonly setting: string;
  readonly cert: string;
  readonly key: string;
}

export type SniCallback = (servername: string, cb: (err: Error | null, ctx?: SecureContext) => void) => void;

/** What a TLS server for clients needs: the default context and the SNI choice. */
export interface ClientTls {
  readonly secureContext: SecureContext;
  readonly SNICallback: SniCallback;
}

export interface PairInfo {
  readonly subject: string;
  readonly issuer: string;
  /** DNS names of the certificate (subjectAltName) */
  readonly names: readonly string[];
  readonly notAfter: Date;
}

/** The pairs an instance gives clients: tls.cert/tls.key, then every tls.sni entry. */
export function clientPairs(tls: Instance['tls']): CertPair[] {
  return [{ setting: 'tls', cert: tls.cert, key: tls.key }, ...tls.sni.map((s) => ({ setting: `tls.sni.${s.name}`, cert: s.cert, key: s.key }))];
}

function read(file: string, what: string): Buffer {
  try {
    return readFileSync(file);
  } catch (e) {
    throw new AppError('CONFIG_INVALID', `${what}: cannot read ${file}: ${(e as NodeJS.ErrnoException).code ?? 'error'}`);
  }
}

/**
 * Read a certificate and its key and check them; throws CONFIG_INVALID naming the setting and file.
 * `validity: false` leaves out the dates (serve starts with an expired client certificate;
 * `config test` says it is one).
 */
export function checkPair(p: CertPair, now = new Date(), opts: { validity: boolean } = { validity: true }): PairInfo {
  const certPem = read(p.cert, `${p.setting}.cert`);
  const keyPem = read(p.key, `${p.setting}.key`);
  let x: X509Certificate;
  try {
    x = new X509Certificate(certPem);
  } catch {
    throw new AppError('CONFIG_INVALID', `${p.setting}.cert: ${p.cert} is not a PEM certificate`);
  }
  try {
    const fromKey = createPublicKey(createPrivateKey(keyPem)).export({ format: 'der', type: 'spki' });
    if (!x.publicKey.export({ format: 'der', type: 'spki' }).equals(fromKey)) throw new Error('mismatch');
  } catch {
    throw new AppError('CONFIG_INVALID', `${p.setting}.key: ${p.key} is not the private key of ${p.cert}`);
  }
  const from = new Date(x.validFrom);
  const to = new Date(x.validTo);
  if (opts.validity && now < from) throw new AppError('CONFIG_INVALID', `${p.setting}.cert: ${p.cert} is not valid before ${from.toISOString()}`);
  if (opts.validity && now > to) throw new AppError('CONFIG_INVALID', `${p.setting}.cert: ${p.cert} expired on ${to.toISOString()}`);
  const names = (x.subjectAltName ?? '')
    .split(', ')
    .filter((s) => s.startsWith('DNS:'))
    .map((s) => s.slice(4));
  return { subject: x.subject.replace(/\n/g, ', '), issuer: x.issuer.replace(/\n/g, ', '), names, notAfter: to };
}

function context(p: CertPair): SecureContext {
  const cert = read(p.cert, `${p.setting}.cert`);
  const key = read(p.key, `${p.setting}.key`);
  try {
    return createSecureContext({ cert, key, minVersion: 'TLSv1.2' });
  } catch (e) {
    throw new AppError('CONFIG_INVALID', `${p.setting}: cannot load ${p.cert} / ${p.key}: ${(e as Error).message.split('\n')[0] ?? ''}`);
  }
}

/** The tls.sni entry for a name the client asked for: exact, else `*.` + the name minus its first label. */
export function sniFor<T>(map: ReadonlyMap<string, T>, servername: string): T | undefined {
  const n = servername.toLowerCase().replace(/\.$/, '');
  const dot = n.indexOf('.');
  return map.get(n) ?? (dot > 0 ? map.get(`*${n.slice(dot)}`) : undefined);
}

/** Build the client-facing TLS of an instance (every pair loaded now: a bad file fails at start or reload). */
export function loadClientTls(tls: Instance['tls']): ClientTls {
  const secureContext = context({ setting: 'tls', cert: tls.cert, key: tls.key });
  const byName = new Map<string, SecureContext>();
  for (const s of tls.sni) byName.set(s.name, context({ setting: `tls.sni.${s.name}`, cert: s.cert, key: s.key }));
  return {
    secureContext,
    SNICallback: (servername, cb) => cb(null, sniFor(byName, servername) ?? secureContext),
  };
}
