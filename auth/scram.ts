/**
 * NAME        auth/scram — SCRAM-SHA-256 (RFC 5802, RFC 7677): stored keys and the server side
 * SYNOPSIS    pigeon pw -s SCRAM-SHA-256   →  {SCRAM-SHA-256}4096,SALT,STOREDKEY,SERVERKEY
 * DESCRIPTION The stored format is Dovecot's (`doveadm pw -s SCRAM-SHA-256`, also what
 *             `gsasl --mkpasswd` prints): iteration count, then base64 salt, StoredKey and
 *             ServerKey. `scramHash` makes one, `scramVerifyPlain` checks a plaintext password
 *             against one (PLAIN and LOGIN still work for such a user), and `ScramServer` is the
 *             server half of one exchange, with no I/O: `clientFirst` → `serverFirst` →
 *             `clientFinal`. No channel binding: SCRAM-SHA-256-PLUS is never offered, so a
 *             client may send the gs2 flag `n` or `y`; `p=` is refused. A user whose stored
 *             hash is not SCRAM (or who is unknown) gets a fake salt derived from the user name
 *             and a per-process secret, so the exchange looks the same and fails at the proof.
 *             The password is normalised with SASLprep (RFC 4013, @mongodb-js/saslprep) when
 *             its bytes are valid UTF-8 that SASLprep accepts; other bytes are used as they are.
 * CONFIG      Iteration counts of stored keys: 1 to LIMITS.SCRAM_MAX_ITERATIONS (auth/schemes.ts);
 *             new keys use SCRAM_NEW_ITERATIONS (4096, RFC 7677's minimum and Dovecot's count).
 * SECURITY    Comparisons are timing-safe. No password, key or proof in any error text.
 */
import { cryptoModule } from '../src/builtins.js';
import { promisify } from 'node:util';
import { AppError } from '../src/errors.js';

export const SCRAM_NEW_ITERATIONS = 4096;
const KEY_LEN = 32;
/** node:crypto's pbkdf2 as a promise (made on first use: node:crypto is loaded then, src/builtins.ts) */
let pbkdf2Promised: ((password: Uint8Array, salt: Buffer, iterations: number, keylen: number, digest: string) => Promise<Buffer>) | undefined;
const pbkdf2Async = (password: Uint8Array, salt: Buffer, iterations: number, keylen: number, digest: string): Promise<Buffer> =>
  (pbkdf2Promised ??= promisify(cryptoModule().pbkdf2))(password, salt, iterations, keylen, digest);
const NONCE_BYTES = 18;

export interface ScramRecord {
  readonly iterations: number;
  readonly salt: Buffer;
  readonly storedKey: Buffer;
  readonly serverKey: Buffer;
}

const STRICT_UTF8 = new TextDecoder('utf-8', { fatal: true });
const B64 = /^[A-Za-z0-9+/]+={0,2}$/;

type SaslPrep = (text: string) => string;
let saslprepCode: Promise<SaslPrep> | undefined;
/**
 * @mongodb-js/saslprep, loaded on the first password that is hashed or checked: its Unicode
 * tables cost every process that imports this module ≈ 20 ms of CPU at start-up, and most
 * (`pigeon deliver`, `pigeon lmtp`, the admin commands) never check a password.
 */
function loadSaslprep(): Promise<SaslPrep> {
  saslprepCode ??= import('@mongodb-js/saslprep').then((m) => m.saslprep);
  return saslprepCode;
}

/** The password as SCRAM hashes it: SASLprep'd when it is UTF-8 that SASLprep accepts, else its bytes. */
export async function scramPassword(password: Uint8Array): Promise<Buffer> {
  const saslprep = await loadSaslprep();
  const raw = Buffer.from(password.buffer, password.byteOffset, password.byteLength);
  let text: string;
  try {
    text = STRICT_UTF8.decode(raw);
  } catch {
    return raw;
  }
  try {
    return Buffer.from(saslprep(text), 'utf8');
  } catch {
    return raw;
  }
}

const hmac = (key: Buffer, data: Buffer | string): Buffer => cryptoModule().createHmac('sha256', key).update(data).digest();
const sha256 = (data: Buffer): Buffer => cryptoModule().createHash('sha256').update(data).digest();

/** SaltedPassword, ClientKey, StoredKey, ServerKey of a password (RFC 5802 §3). */
export async function scramKeys(password: Uint8Array, salt: Buffer, iterations: number): Promise<ScramRecord & { readonly clientKey: Buffer }> {
  // off the event loop (libuv's thread pool): a large iteration count does not stall other sessions
  const salted = await pbkdf2Async(await scramPassword(password), salt, iterations, KEY_LEN, 'sha256');
  const clientKey = hmac(salted, 'Client Key');
  return { iterations, salt, clientKey, storedKey: sha256(clientKey), serverKey: hmac(salted, 'Server Key') };
}

/** The value after `{SCRAM-SHA-256}`, parsed; throws AppError PASSWORD_SCHEME (no hash in the text). */
export function parseScram(value: string, maxIterations: number): ScramRecord {
  const f = value.split(',');
  if (f.length !== 4 || !/^[1-9][0-9]{0,9}$/.test(f[0] ?? '') || !f.slice(1).every((x) => B64.test(x))) {
    throw new AppError('PASSWORD_SCHEME', 'malformed {SCRAM-SHA-256} hash (expected ITERATIONS,SALT,STOREDKEY,SERVERKEY in base64)');
  }
  const iterations = Number(f[0]);
  const [salt, storedKey, serverKey] = f.slice(1).map((x) => Buffer.from(x, 'base64')) as [Buffer, Buffer, Buffer];
  if (salt.length === 0 || storedKey.length !== KEY_LEN || serverKey.length !== KEY_LEN) {
    throw new AppError('PASSWORD_SCHEME', 'malformed {SCRAM-SHA-256} hash (empty salt, or keys that are not 32 bytes)');
  }
  if (iterations > maxIterations) {
    throw new AppError('PASSWORD_COST', `{SCRAM-SHA-256} hash asks for ${iterations} iterations; at most ${maxIterations} are accepted`);
  }
  return { iterations, salt, storedKey, serverKey };
}

/** A new stored value (without the `{SCRAM-SHA-256}` prefix), as Dovecot writes it. */
export async function scramHash(password: Uint8Array, iterations = SCRAM_NEW_ITERATIONS, salt: Buffer = cryptoModule().randomBytes(16)): Promise<string> {
  const k = await scramKeys(password, salt, iterations);
  return `${iterations},${salt.toString('base64')},${k.storedKey.toString('base64')},${k.serverKey.toString('base64')}`;
}

/** Does a plaintext password match a stored record? (PLAIN/LOGIN for a user with SCRAM keys.) */
export async function scramVerifyPlain(rec: ScramRecord, password: Uint8Array): Promise<boolean> {
  const k = await scramKeys(password, rec.salt, rec.iterations);
  return cryptoModule().timingSafeEqual(k.storedKey, rec.storedKey) && cryptoModule().timingSafeEqual(k.serverKey, rec.serverKey);
}

// ---- the server side of one exchange ---------------------------------------------------------

/** Why a client message was refused (for the log; the client sees only a failed login). */
export class ScramError extends Error {
  override readonly name = 'ScramError';
}

/** RFC 5802 saslname: `=2C` is `,`, `=3D` is `=`; any other `=` (or a `,`) is malformed. */
function saslName(s: Buffer): Buffer {
  const text = s.toString('latin1');
  if (text.includes(',') || /=(?!2C|3D)/.test(text)) throw new ScramError('malformed saslname');
  return Buffer.from(text.replace(/=2C/g, ',').replace(/=3D/g, '='), 'latin1');
}

/** `k=value` attributes of a SCRAM message, in order. */
function attributes(msg: Buffer): { k: string; v: Buffer }[] {
  const out: { k: string; v: Buffer }[] = [];
  let start = 0;
  for (;;) {
    let end = msg.indexOf(0x2c, start);
    if (end < 0) end = msg.length;
    const a = msg.subarray(start, end);
    if (a.length < 2 || a[1] !== 0x3d || !/[A-Za-z]/.test(String.fromCharCode(a[0] as number))) throw new ScramError('malformed attribute');
    out.push({ k: String.fromCharCode(a[0] as number), v: a.subarray(2) });
    if (end === msg.length) return out;
    start = end + 1;
  }
}

const PRINTABLE_NONCE = /^[\x21-\x2b\x2d-\x7e]+$/;

export interface ScramClientFirst {
  /** the authentication identity (bytes as sent, saslname-decoded) */
  readonly user: Buffer;
}

export class ScramServer {
  private gs2Header: Buffer | null = null;
  private bare: Buffer | null = null;
  private clientNonce = '';
  private nonce = '';
  private first: string | null = null;
  private rec: ScramRecord | null = null;
  /** the server signature, once the client's proof was right */
  private signature: Buffer | null = null;

  /**
   * The client-first message: gs2 header (`n,,` or `y,,`, optionally `a=` naming the same
   * user) and `n=user,r=nonce`. Throws ScramError for anything else.
   */
  clientFirst(msg: Buffer): ScramClientFirst {
    const c1 = msg.indexOf(0x2c);
    const c2 = c1 < 0 ? -1 : msg.indexOf(0x2c, c1 + 1);
    if (c1 < 0 || c2 < 0) throw new ScramError('malformed gs2 header');
    const flag = msg.subarray(0, c1).toString('latin1');
    if (flag.startsWith('p=')) throw new ScramError('channel binding requested, but SCRAM-SHA-256-PLUS is not offered');
    if (flag !== 'n' && flag !== 'y') throw new ScramError('malformed gs2 header');
    const authz = msg.subarray(c1 + 1, c2);
    if (authz.length > 0 && (authz[0] !== 0x61 || authz[1] !== 0x3d)) throw new ScramError('malformed gs2 header');
    this.gs2Header = msg.subarray(0, c2 + 1);
    this.bare = msg.subarray(c2 + 1);
    const attrs = attributes(this.bare);
    if (attrs[0]?.k === 'm') throw new ScramError('mandatory extension not supported');
    if (attrs[0]?.k !== 'n' || attrs[1]?.k !== 'r') throw new ScramError('expected n=user,r=nonce');
    const user = saslName(attrs[0].v);
    const nonce = attrs[1].v.toString('latin1');
    if (user.length === 0 || !PRINTABLE_NONCE.test(nonce)) throw new ScramError('empty user name or malformed nonce');
    if (authz.length > 0 && !saslName(authz.subarray(2)).equals(user)) throw new ScramError('authorization identity differs');
    this.clientNonce = nonce;
    return { user };
  }

  /**
   * The server-first message for the user's stored record, or, when there is none (unknown user,
   * a hash that is not SCRAM), for a fake one: `fakeSecret` keyed by the user name gives a salt
   * that stays the same for that name, so a client cannot tell the cases apart. `serverNonce`
   * is for test vectors only (default: 18 random bytes).
   */
  serverFirst(rec: ScramRecord | null, fakeSecret: Buffer, serverNonce: string = cryptoModule().randomBytes(NONCE_BYTES).toString('base64')): Buffer {
    if (this.bare === null) throw new Error('serverFirst before clientFirst');
    this.rec = rec;
    const salt = rec?.salt ?? hmac(fakeSecret, this.bare.subarray(0, this.bare.indexOf(',r='))).subarray(0, 16);
    this.nonce = this.clientNonce + serverNonce;
    this.first = `r=${this.nonce},s=${salt.toString('base64')},i=${rec?.iterations ?? SCRAM_NEW_ITERATIONS}`;
    return Buffer.from(this.first, 'latin1');
  }

  /**
   * The client-final message `c=…,r=…,p=…`: true when the proof is right for the stored record
   * (always false without one). Throws ScramError for a malformed message.
   */
  clientFinal(msg: Buffer): boolean {
    if (this.first === null || this.gs2Header === null || this.bare === null) throw new Error('clientFinal before serverFirst');
    const attrs = attributes(msg);
    const c = attrs[0];
    const r = attrs[1];
    const p = attrs[attrs.length - 1];
    if (c?.k !== 'c' || r?.k !== 'r' || p?.k !== 'p' || attrs.length < 3) throw new ScramError('expected c=…,r=…,p=…');
    const cb = c.v.toString('latin1');
    if (!B64.test(cb) || !Buffer.from(cb, 'base64').equals(this.gs2Header)) throw new ScramError('channel binding data differs from the gs2 header');
    if (r.v.toString('latin1') !== this.nonce) throw new ScramError('nonce differs');
    const proofText = p.v.toString('latin1');
    const proof = Buffer.from(proofText, 'base64');
    if (!B64.test(proofText) || proof.length !== KEY_LEN) throw new ScramError('malformed proof');
    const withoutProof = msg.subarray(0, msg.length - p.v.length - 3);
    const authMessage = Buffer.concat([this.bare, Buffer.from(`,${this.first},`, 'latin1'), withoutProof]);
    if (this.rec === null) return false;
    const clientSignature = hmac(this.rec.storedKey, authMessage);
    const clientKey = Buffer.alloc(KEY_LEN);
    for (let i = 0; i < KEY_LEN; i++) clientKey[i] = (proof[i] as number) ^ (clientSignature[i] as number);
    if (!cryptoModule().timingSafeEqual(sha256(clientKey), this.rec.storedKey)) return false;
    this.signature = hmac(this.rec.serverKey, authMessage);
    return true;
  }

  /** The server-final message `v=…` (only after a right proof). */
  serverFinal(): Buffer {
    if (this.signature === null) throw new Error('serverFinal without a verified proof');
    return Buffer.from(`v=${this.signature.toString('base64')}`, 'latin1');
  }
}
