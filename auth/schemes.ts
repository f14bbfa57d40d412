/**
 * NAME        auth/schemes — password hash schemes, Dovecot-compatible `{SCHEME}` strings
 * SYNOPSIS    pigeon pw -s ARGON2ID ; pigeon user import passwd-file FILE
 * DESCRIPTION New passwords are stored as {ARGON2ID} (@node-rs/argon2). Verified as admins bring
 *             them from Dovecot: ARGON2ID, ARGON2I (@node-rs/argon2), BLF-CRYPT (@node-rs/bcrypt),
 *             SHA512-CRYPT, SHA256-CRYPT (Drepper's SHA-crypt on node:crypto, as glibc's crypt(3)),
 *             SSHA512, SSHA256 (node:crypto), SCRAM-SHA-256 (auth/scram.ts: Dovecot's
 *             ITER,SALT,STOREDKEY,SERVERKEY; also what SCRAM logins need), PLAIN (warned
 *             as unsafe). Imported hashes with absurd cost parameters are refused before any work
 *             (LIMITS.md): SHA-crypt rounds <= 100000, bcrypt cost <= 14, argon2 m <= 256 MiB,
 *             t <= 10, p <= 4, SCRAM iterations <= 100000.
 *             A password is bytes (Uint8Array), exactly as the client sent them: never a string
 *             decoded from the wire, so two different byte strings can never verify alike.
 * SECURITY    Comparisons are timing-safe; `dummyVerify` costs what a real verify of a new password
 *             costs, so an unknown user cannot be told from a wrong password by timing. No password
 *             or hash ever appears in an error message.
 */
import { cryptoModule } from '../src/builtins.js';
import type { Algorithm, Version } from '@node-rs/argon2';
import { AppError } from '../src/errors.js';
import { parseScram, scramHash, scramVerifyPlain, type ScramRecord } from './scram.js';

// the native hash libraries load on first use (~50 ms): a process that checks no password
// (deliver, LMTP, most CLI commands) never pays for them
type Argon2 = typeof import('@node-rs/argon2');
type Bcrypt = typeof import('@node-rs/bcrypt');
let argon2Lib: Promise<Argon2> | null = null;
let bcryptLib: Promise<Bcrypt> | null = null;
const argon2 = (): Promise<Argon2> => (argon2Lib ??= import('@node-rs/argon2').then((m) => (m as { default?: Argon2 }).default ?? m));
const bcrypt = (): Promise<Bcrypt> => (bcryptLib ??= import('@node-rs/bcrypt').then((m) => (m as { default?: Bcrypt }).default ?? m));

export const SCHEMES = ['ARGON2ID', 'ARGON2I', 'BLF-CRYPT', 'SHA512-CRYPT', 'SHA256-CRYPT', 'SSHA512', 'SSHA256', 'SCRAM-SHA-256', 'PLAIN'] as const;
export type Scheme = (typeof SCHEMES)[number];

export const LIMITS = {
  SHA_CRYPT_MAX_ROUNDS: 100_000,
  BCRYPT_MAX_COST: 14,
  ARGON2_MAX_MEMORY_KIB: 256 * 1024,
  ARGON2_MAX_TIME: 10,
  ARGON2_MAX_PARALLELISM: 4,
  // gsasl --mkpasswd writes 65536; Dovecot 4096
  SCRAM_MAX_ITERATIONS: 100_000,
} as const;

/** Parameters of new {ARGON2ID} hashes (OWASP's 19 MiB, t=2, p=1). */
export const ARGON2_NEW = { memoryCost: 19456, timeCost: 2, parallelism: 1 } as const;
// @node-rs/argon2's Algorithm is a `const enum`, which isolatedModules cannot inline
const ALG_ARGON2I = 1 as Algorithm;
const ALG_ARGON2ID = 2 as Algorithm;

export interface ParsedHash {
  readonly scheme: Scheme;
  readonly value: string;
}

/** Split `{SCHEME}value`; refuse unknown schemes and absurd costs. Never echoes the hash. */
export function parseHash(stored: string): ParsedHash {
  const m = /^\{([A-Za-z0-9.-]+)\}(.*)$/s.exec(stored);
  if (!m || m[1] === undefined || m[2] === undefined) {
    throw new AppError('PASSWORD_SCHEME', 'password hash has no {SCHEME} prefix (expected e.g. {ARGON2ID}$argon2id$...)');
  }
  const scheme = m[1].toUpperCase();
  if (!(SCHEMES as readonly string[]).includes(scheme)) {
    throw new AppError('PASSWORD_SCHEME', `unsupported password scheme {${scheme}}; supported: ${SCHEMES.join(', ')}`);
  }
  const p: ParsedHash = { scheme: scheme as Scheme, value: m[2] };
  checkCost(p);
  return p;
}

function checkCost(p: ParsedHash): void {
  const v = p.value;
  switch (p.scheme) {
    case 'SHA512-CRYPT':
    case 'SHA256-CRYPT': {
      const id = p.scheme === 'SHA512-CRYPT' ? '6' : '5';
      const m = new RegExp(`^\\$${id}\\$(?:rounds=(\\d+)\\$)?[^$]{0,16}\\$[./0-9A-Za-z]+$`).exec(v);
      if (!m) throw new AppError('PASSWORD_SCHEME', `malformed {${p.scheme}} hash (expected $${id}$[rounds=N$]salt$hash)`);
      const rounds = m[1] === undefined ? 5000 : Number(m[1]);
      if (rounds > LIMITS.SHA_CRYPT_MAX_ROUNDS) {
        throw new AppError('PASSWORD_COST', `{${p.scheme}} hash asks for ${rounds} rounds; at most ${LIMITS.SHA_CRYPT_MAX_ROUNDS} are accepted`);
      }
      return;
    }
    case 'BLF-CRYPT': {
      const m = /^\$2[abxy]\$(\d{2})\$[./A-Za-z0-9]{53}$/.exec(v);
      if (!m) throw new AppError('PASSWORD_SCHEME', 'malformed {BLF-CRYPT} hash (expected $2y$NN$ and 53 characters)');
      const cost = Number(m[1]);
      if (cost > LIMITS.BCRYPT_MAX_COST || cost < 4) {
        throw new AppError('PASSWORD_COST', `{BLF-CRYPT} hash has cost ${cost}; accepted costs are 4 to ${LIMITS.BCRYPT_MAX_COST}`);
      }
      return;
    }
    case 'ARGON2ID':
    case 'ARGON2I': {
      const alg = p.scheme === 'ARGON2ID' ? 'argon2id' : 'argon2i';
      const m = new RegExp(`^\\$${alg}\\$(?:v=\\d+\\$)?m=(\\d+),t=(\\d+),p=(\\d+)\\$[A-Za-z0-9+/]+={0,2}\\$[A-Za-z0-9+/]+={0,2}$`).exec(v);
      if (!m) throw new AppError('PASSWORD_SCHEME', `malformed {${p.scheme}} hash (expected $${alg}$v=19$m=..,t=..,p=..$salt$hash)`);
      const [mem, t, par] = [Number(m[1]), Number(m[2]), Number(m[3])];
      if (mem > LIMITS.ARGON2_MAX_MEMORY_KIB || t > LIMITS.ARGON2_MAX_TIME || par > LIMITS.ARGON2_MAX_PARALLELISM || t < 1 || par < 1) {
        throw new AppError(
          'PASSWORD_COST',
          `{${p.scheme}} hash asks for m=${mem} KiB, t=${t}, p=${par}; limits are m<=${LIMITS.ARGON2_MAX_MEMORY_KIB}, t<=${LIMITS.ARGON2_MAX_TIME}, p<=${LIMITS.ARGON2_MAX_PARALLELISM}`,
        );
      }
      return;
    }
    case 'SSHA512':
    case 'SSHA256': {
      const len = p.scheme === 'SSHA512' ? 64 : 32;
      const raw = Buffer.from(v, 'base64');
      if (!/^[A-Za-z0-9+/]+={0,2}$/.test(v) || raw.length <= len) throw new AppError('PASSWORD_SCHEME', `malformed {${p.scheme}} hash (expected base64 of digest and salt)`);
      return;
    }
    case 'SCRAM-SHA-256':
      parseScram(v, LIMITS.SCRAM_MAX_ITERATIONS);
      return;
    case 'PLAIN':
      return;
  }
}

/** The SCRAM keys of a stored `{SCRAM-SHA-256}` hash, or null for any other scheme. Throws AppError for an unusable hash. */
export function scramRecordOf(stored: string): ScramRecord | null {
  const p = parseHash(stored);
  return p.scheme === 'SCRAM-SHA-256' ? parseScram(p.value, LIMITS.SCRAM_MAX_ITERATIONS) : null;
}

function digestEqual(a: Buffer, b: Buffer): boolean {
  // equal-length comparison regardless of input lengths
  const ha = cryptoModule().createHash('sha256').update(a).digest();
  const hb = cryptoModule().createHash('sha256').update(b).digest();
  return cryptoModule().timingSafeEqual(ha, hb) && a.length === b.length;
}

/** Verify a password (bytes) against a stored `{SCHEME}hash`. Throws AppError for unusable hashes. */
export async function verifyPassword(stored: string, password: Uint8Array): Promise<boolean> {
  const p = parseHash(stored);
  const pw = Buffer.from(password.buffer, password.byteOffset, password.byteLength);
  switch (p.scheme) {
    case 'ARGON2ID':
    case 'ARGON2I':
      return argon2Verify(p, pw);
    case 'BLF-CRYPT':
      // the bytes themselves (bcryptjs took a JS string); $2y$ is $2b$ under its PHP/Dovecot name
      try {
        return await (await bcrypt()).verify(pw, p.value);
      } catch {
        throw new AppError('PASSWORD_SCHEME', 'malformed {BLF-CRYPT} hash');
      }
    case 'SHA512-CRYPT':
    case 'SHA256-CRYPT': {
      const computed = shaCrypt(pw, p.value.slice(0, p.value.lastIndexOf('$')));
      return digestEqual(Buffer.from(computed), Buffer.from(p.value));
    }
    case 'SSHA512':
    case 'SSHA256': {
      const alg = p.scheme === 'SSHA512' ? 'sha512' : 'sha256';
      const len = alg === 'sha512' ? 64 : 32;
      const raw = Buffer.from(p.value, 'base64');
      const digest = raw.subarray(0, len);
      const salt = raw.subarray(len);
      return digestEqual(cryptoModule().createHash(alg).update(pw).update(salt).digest(), digest);
    }
    case 'SCRAM-SHA-256':
      return scramVerifyPlain(parseScram(p.value, LIMITS.SCRAM_MAX_ITERATIONS), pw);
    case 'PLAIN':
      return digestEqual(pw, Buffer.from(p.value, 'utf8'));
  }
}

const STRICT_UTF8 = new TextDecoder('utf-8', { fatal: true });

// the PHC string of an argon2 hash; no `v=` means version 0x10 (the reference implementation's rule)
const ARGON2_PHC = /^\$(argon2id|argon2i)\$(?:v=(\d+)\$)?m=(\d+),t=(\d+),p=(\d+)\$([A-Za-z0-9+/]+)={0,2}\$([A-Za-z0-9+/]+)={0,2}$/;
const ARGON2_V10 = 0 as Version;
const ARGON2_V13 = 1 as Version;

/**
 * argon2 verification of the password bytes: the hash is recomputed with the stored parameters
 * (@node-rs/argon2's hashRaw takes any bytes; its verify() refuses passwords that are not UTF-8)
 * and compared in constant time.
 */
async function argon2Verify(p: ParsedHash, pw: Buffer): Promise<boolean> {
  const m = ARGON2_PHC.exec(p.value);
  if (!m || m[3] === undefined || m[4] === undefined || m[5] === undefined || m[6] === undefined || m[7] === undefined) {
    throw new AppError('PASSWORD_SCHEME', `malformed {${p.scheme}} hash`);
  }
  const version = m[2] === undefined || m[2] === '16' ? ARGON2_V10 : m[2] === '19' ? ARGON2_V13 : null;
  const salt = Buffer.from(m[6], 'base64');
  const expected = Buffer.from(m[7], 'base64');
  if (version === null || salt.length < 8 || expected.length < 4) throw new AppError('PASSWORD_SCHEME', `malformed {${p.scheme}} hash (version, salt or digest)`);
  const raw = await (await argon2()).hashRaw(pw, {
    algorithm: m[1] === 'argon2id' ? ALG_ARGON2ID : ALG_ARGON2I,
    version,
    memoryCost: Number(m[3]),
    timeCost: Number(m[4]),
    parallelism: Number(m[5]),
    outputLen: expected.length,
    salt,
  });
  return cryptoModule().timingSafeEqual(raw, expected);
}

/** Make a new hash of `password` (bytes) in `scheme` (default ARGON2ID), as `doveadm pw -s SCHEME` would print it. */
export async function hashPassword(password: Uint8Array, scheme: Scheme = 'ARGON2ID'): Promise<string> {
  const pw = Buffer.from(password.buffer, password.byteOffset, password.byteLength);
  if (pw.includes(0x0d) || pw.includes(0x0a) || pw.includes(0x00)) throw new AppError('INVALID_VALUE', 'passwords may not contain CR, LF or NUL');
  switch (scheme) {
    case 'ARGON2ID':
      return `{ARGON2ID}${await (await argon2()).hash(pw, { ...ARGON2_NEW, algorithm: ALG_ARGON2ID })}`;
    case 'ARGON2I':
      return `{ARGON2I}${await (await argon2()).hash(pw, { ...ARGON2_NEW, algorithm: ALG_ARGON2I })}`;
    case 'BLF-CRYPT':
      return `{BLF-CRYPT}${(await (await bcrypt()).hash(pw, 10)).replace(/^\$2b\$/, '$2y$')}`;
    case 'SHA512-CRYPT':
      return `{SHA512-CRYPT}${shaCrypt(pw, `$6$${salt16()}`)}`;
    case 'SHA256-CRYPT':
      return `{SHA256-CRYPT}${shaCrypt(pw, `$5$${salt16()}`)}`;
    case 'SSHA512':
    case 'SSHA256': {
      const alg = scheme === 'SSHA512' ? 'sha512' : 'sha256';
      const salt = cryptoModule().randomBytes(8);
      return `{${scheme}}${Buffer.concat([cryptoModule().createHash(alg).update(pw).update(salt).digest(), salt]).toString('base64')}`;
    }
    case 'SCRAM-SHA-256':
      return `{SCRAM-SHA-256}${await scramHash(pw)}`;
    case 'PLAIN': {
      // the stored value is text: only a password that is valid UTF-8 can be kept as it is
      let text: string;
      try {
        text = STRICT_UTF8.decode(pw);
      } catch {
        throw new AppError('INVALID_VALUE', '{PLAIN} can store only passwords that are valid UTF-8; use another scheme');
      }
      return `{PLAIN}${text}`;
    }
  }
}

const CRYPT_B64 = './0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz';
// byte triples of the final encoding, in glibc's order (sha256-crypt.c / sha512-crypt.c)
const SHA256_ORDER = [[0, 10, 20], [21, 1, 11], [12, 22, 2], [3, 13, 23], [24, 4, 14], [15, 25, 5], [6, 16, 26], [27, 7, 17], [18, 28, 8], [9, 19, 29]] as const;
const SHA512_ORDER = [
  [0, 21, 42], [22, 43, 1], [44, 2, 23], [3, 24, 45], [25, 46, 4], [47, 5, 26], [6, 27, 48], [28, 49, 7], [50, 8, 29], [9, 30, 51], [31, 52, 10],
  [53, 11, 32], [12, 33, 54], [34, 55, 13], [56, 14, 35], [15, 36, 57], [37, 58, 16], [59, 17, 38], [18, 39, 60], [40, 61, 19], [62, 20, 41],
] as const;

/**
 * SHA-crypt ($5$ SHA-256, $6$ SHA-512) exactly as Ulrich Drepper's specification and glibc's
 * crypt(3) compute it. `setting` is `$5$[rounds=N$]salt` (salt up to 16 characters); returns the
 * whole crypt string. (unixcrypt 3.0.4 got steps 10 and 16 wrong for passwords whose byte length is
 * a multiple of the digest size: 32 bytes for SHA-256, 64 for SHA-512.)
 */
export function shaCrypt(key: Buffer, setting: string): string {
  const m = /^\$([56])\$(?:rounds=(\d+)\$)?([^$]{0,16})/.exec(setting);
  if (!m || m[1] === undefined || m[3] === undefined) throw new AppError('PASSWORD_SCHEME', 'malformed SHA-crypt setting');
  const alg = m[1] === '6' ? 'sha512' : 'sha256';
  const size = alg === 'sha512' ? 64 : 32;
  const custom = m[2] !== undefined;
  const rounds = custom ? Math.max(1000, Math.min(999_999_999, Number(m[2]))) : 5000;
  const salt = Buffer.from(m[3], 'utf8');
  const h = () => cryptoModule().createHash(alg);
  const b = h().update(key).update(salt).update(key).digest();
  const ctxA = h().update(key).update(salt);
  let cnt = key.length;
  for (; cnt > size; cnt -= size) ctxA.update(b);
  ctxA.update(b.subarray(0, cnt));
  for (let n = key.length; n > 0; n >>= 1) ctxA.update(n & 1 ? b : key);
  const a = ctxA.digest();
  const ctxDP = h();
  for (let i = 0; i < key.length; i++) ctxDP.update(key);
  const dp = ctxDP.digest();
  const p = Buffer.alloc(key.length);
  for (let i = 0; i < key.length; i++) p[i] = dp[i % size] as number;
  const ctxDS = h();
  for (let i = 0; i < 16 + (a[0] as number); i++) ctxDS.update(salt);
  const s = ctxDS.digest().subarray(0, salt.length);
  let c = a;
  for (let i = 0; i < rounds; i++) {
    const ctx = h();
    ctx.update(i & 1 ? p : c);
    if (i % 3 !== 0) ctx.update(s);
    if (i % 7 !== 0) ctx.update(p);
    ctx.update(i & 1 ? c : p);
    c = ctx.digest();
  }
  let out = '';
  const b64 = (w: number, n: number): void => {
    for (let k = 0; k < n; k++, w >>= 6) out += CRYPT_B64[w & 63];
  };
  for (const [b2, b1, b0] of alg === 'sha512' ? SHA512_ORDER : SHA256_ORDER) b64(((c[b2] as number) << 16) | ((c[b1] as number) << 8) | (c[b0] as number), 4);
  if (alg === 'sha512') b64(c[63] as number, 2);
  else b64(((c[31] as number) << 8) | (c[30] as number), 3);
  return `$${m[1]}$${custom ? `rounds=${rounds}$` : ''}${m[3]}$${out}`;
}

function salt16(): string {
  const abc = './0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz';
  return [...cryptoModule().randomBytes(16)].map((b) => abc[b & 63]).join('');
}

let dummy: Promise<string> | null = null;
/** Spend what verifying a freshly made password costs; always false. For unknown users. */
export async function dummyVerify(password: Uint8Array): Promise<false> {
  dummy ??= hashPassword(Buffer.from(cryptoModule().randomBytes(16).toString('hex')));
  await verifyPassword(await dummy, password);
  return false;
}

export function isScheme(s: string): s is Scheme {
  return (SCHEMES as readonly string[]).includes(s);
}
