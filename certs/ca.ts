/**
 * NAME        certs/ca — the cluster CA and node host certificates (@peculiar/x509)
 * SYNOPSIS    pigeon init DIR [--ca-from DIR] [--key ec|rsa] ; pigeon cert issue NODE --out DIR [--key ec|rsa]
 * DESCRIPTION The CA signs one host certificate per node; the node name is in the subject CN and
 *             the subjectAltName (plus loopback/localhost for this host). Host certificates serve
 *             both TLS ends of a peer link (serverAuth + clientAuth) and are the default certificate
 *             for client-facing TLS. New keys are ECDSA P-256 by default (a TLS 1.3 handshake signs
 *             and verifies in a fraction of RSA-2048's time) or RSA-2048 (`rsa`); either kind of CA
 *             key signs either kind of host key, so a cluster whose CA or nodes are RSA (made before
 *             EC was the default) keeps working, and its new nodes may be EC: a mixed cluster.
 *             Keys come from node:crypto; certificates are built and signed by @peculiar/x509 over
 *             node's WebCrypto (node-forge, used before, cannot make EC certificates).
 * SECURITY    Private keys are written with mode 0600 and never logged or sent anywhere.
 */
import 'reflect-metadata'; // @peculiar/x509's dependency injection needs it loaded first
import * as x509 from '@peculiar/x509';
import { createPrivateKey, generateKeyPairSync, randomBytes, webcrypto, X509Certificate, type KeyObject } from 'node:crypto';
import { writeFileSync, readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { AppError } from '../src/errors.js';

type CryptoKey = webcrypto.CryptoKey;
// node's WebCrypto is the one the library signs with (its types are node's, the library's the DOM's)
x509.cryptoProvider.set(webcrypto as unknown as Parameters<typeof x509.cryptoProvider.set>[0]);

export interface KeyPair {
  readonly certPem: string;
  readonly keyPem: string;
}

/** The kinds of key `pigeon init` / `pigeon cert issue` make (`--key`). */
export const KEY_TYPES = ['ec', 'rsa'] as const;
export type KeyType = (typeof KEY_TYPES)[number];
export const DEFAULT_KEY_TYPE: KeyType = 'ec';

/** A key as WebCrypto needs it to sign (and its algorithm), from any PEM node:crypto reads. */
interface SigningKey {
  readonly privateKey: CryptoKey;
  readonly signingAlgorithm: webcrypto.Algorithm | webcrypto.EcdsaParams;
}

const CURVES: Readonly<Record<string, { readonly webName: string; readonly hash: string }>> = {
  prime256v1: { webName: 'P-256', hash: 'SHA-256' },
  secp384r1: { webName: 'P-384', hash: 'SHA-384' },
  secp521r1: { webName: 'P-521', hash: 'SHA-512' },
};

async function signingKey(k: KeyObject): Promise<SigningKey> {
  const der = k.export({ type: 'pkcs8', format: 'der' });
  if (k.asymmetricKeyType === 'rsa') {
    const alg = { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-256' };
    return { privateKey: await webcrypto.subtle.importKey('pkcs8', der, alg, false, ['sign']), signingAlgorithm: alg };
  }
  const curve = k.asymmetricKeyType === 'ec' ? CURVES[k.asymmetricKeyDetails?.namedCurve ?? ''] : undefined;
  if (!curve) throw new AppError('CERT_INVALID', `CA key type ${k.asymmetricKeyType ?? '?'}${k.asymmetricKeyType === 'ec' ? ` (${k.asymmetricKeyDetails?.namedCurve ?? '?'})` : ''} cannot sign host certificates (RSA or ECDSA P-256/P-384/P-521)`);
  const privateKey = await webcrypto.subtle.importKey('pkcs8', der, { name: 'ECDSA', namedCurve: curve.webName }, false, ['sign']);
  return { privateKey, signingAlgorithm: { name: 'ECDSA', hash: curve.hash } };
}

/** A new key pair: the private key as PKCS#8 PEM (what node:tls reads), the public one for the certificate. */
async function newKey(type: KeyType): Promise<{ keyPem: string; publicKey: CryptoKey; signing: SigningKey }> {
  const { privateKey, publicKey } = type === 'rsa' ? generateKeyPairSync('rsa', { modulusLength: 2048 }) : generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
  const keyPem = privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
  const spki = publicKey.export({ type: 'spki', format: 'der' });
  const pubAlg = type === 'rsa' ? { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-256' } : { name: 'ECDSA', namedCurve: 'P-256' };
  return { keyPem, publicKey: await webcrypto.subtle.importKey('spki', spki, pubAlg, true, ['verify']), signing: await signingKey(privateKey) };
}

function serial(): string {
  const b = randomBytes(16);
  b[0] = (b[0] ?? 0) & 0x7f; // positive
  return b.toString('hex');
}

/** The type of a PEM private key (what `pigeon cert issue` reports; tests). */
export function keyTypeOf(keyPem: string): string {
  return createPrivateKey(keyPem).asymmetricKeyType ?? 'unknown';
}

export async function createCa(clusterName: string, opts: { readonly years?: number; readonly key?: KeyType } = {}): Promise<KeyPair> {
  const k = await newKey(opts.key ?? DEFAULT_KEY_TYPE);
  const name = [{ CN: [`PigeonDeliver cluster CA ${clusterName}`] }, { O: ['PigeonDeliver'] }];
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: serial(),
    subject: name,
    issuer: name,
    notBefore: new Date(Date.now() - 60_000),
    notAfter: new Date(Date.now() + (opts.years ?? 10) * 365 * 86400_000),
    publicKey: k.publicKey,
    signingKey: k.signing.privateKey,
    signingAlgorithm: k.signing.signingAlgorithm,
    extensions: [
      new x509.BasicConstraintsExtension(true, 0, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      await x509.SubjectKeyIdentifierExtension.create(k.publicKey),
    ],
  });
  return { certPem: cert.toString('pem'), keyPem: k.keyPem };
}

/** Validity of a host certificate: `days` from now (default 825, as public CAs cap it), or explicit dates (tests). */
export interface Validity {
  readonly days?: number;
  readonly notBefore?: Date;
  readonly notAfter?: Date;
}

// kept in certs/verify.ts, which the daemon loads (this module, with its X.509 library, only issues)
export { HOST_CERT_DAYS, EXPIRY_WARN_DAYS, LOOPBACK_NAMES } from './verify.js';
import { HOST_CERT_DAYS } from './verify.js';

/** A host certificate for `nodeName`, signed by `ca` (an RSA or EC CA), with a new key of `key` type. */
export async function issueHostCert(ca: KeyPair, nodeName: string, extraNames: readonly string[] = [], validity: Validity = {}, key: KeyType = DEFAULT_KEY_TYPE): Promise<KeyPair> {
  const caCert = new x509.X509Certificate(ca.certPem);
  let caKey: KeyObject;
  try {
    caKey = createPrivateKey(ca.keyPem);
  } catch (e) {
    throw new AppError('CERT_INVALID', `the CA key cannot be read: ${(e as Error).message}`);
  }
  const signer = await signingKey(caKey);
  const k = await newKey(key);
  const names = [...new Set([nodeName, ...extraNames])];
  const caSki = caCert.getExtension(x509.SubjectKeyIdentifierExtension);
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: serial(),
    subject: [{ CN: [nodeName] }, { O: ['PigeonDeliver'] }],
    // the CA's subject as it is encoded in its certificate: chain building compares it
    issuer: caCert.subjectName,
    notBefore: validity.notBefore ?? new Date(Date.now() - 60_000),
    notAfter: validity.notAfter ?? new Date(Date.now() + (validity.days ?? HOST_CERT_DAYS) * 86400_000),
    publicKey: k.publicKey,
    signingKey: signer.privateKey,
    signingAlgorithm: signer.signingAlgorithm,
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      // an EC key signs only (ECDHE does the key exchange); an RSA key may also encipher (TLS ≤ 1.2 clients)
      new x509.KeyUsagesExtension(key === 'rsa' ? x509.KeyUsageFlags.digitalSignature | x509.KeyUsageFlags.keyEncipherment : x509.KeyUsageFlags.digitalSignature, true),
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth, x509.ExtendedKeyUsage.clientAuth]),
      new x509.SubjectAlternativeNameExtension(names.map((n) => (isIP(n) !== 0 ? { type: 'ip', value: n } : { type: 'dns', value: n }))),
      await x509.SubjectKeyIdentifierExtension.create(k.publicKey),
      caSki ? new x509.AuthorityKeyIdentifierExtension(caSki.keyId) : await x509.AuthorityKeyIdentifierExtension.create(caCert.publicKey),
    ],
  });
  return { certPem: cert.toString('pem'), keyPem: k.keyPem };
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
