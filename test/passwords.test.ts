/**
 * Password schemes against the real Dovecot: hashes made by `doveadm pw -s SCHEME` verify with our
 * code, hashes we make verify with `doveadm pw -t`; absurd costs and unknown schemes are refused
 * with clear errors that never carry the hash; an unknown user costs what a wrong password costs.
 */
import t, { type Test } from 'tap';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { verifyPassword, hashPassword, parseHash, SCHEMES, LIMITS } from '../auth/schemes.js';
import { createAuth } from '../auth/chain.js';
import { AppError } from '../src/errors.js';
import { openStore } from '../src/store.js';
import { scratchDir } from './helpers/instance.js';

const PASSWORDS = ['correct horse 42', 'pässwörd-ÄÖÜ-日本語-🐦'];
/** a password as the bytes a client sends (UTF-8 here) */
const b = (s: string): Buffer => Buffer.from(s, 'utf8');

function dovePw(scheme: string, password: string, extra: string[] = []): string {
  const r = spawnSync('doveadm', ['pw', '-s', scheme, ...extra, '-p', password], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`doveadm pw -s ${scheme} failed: ${r.stderr}`);
  const line = r.stdout.trim();
  if (!line.startsWith(`{${scheme}}`)) throw new Error(`doveadm pw printed ${JSON.stringify(line)}`);
  return line;
}

/** `doveadm pw -t HASH -p PASS`: exit 0 and "(verified)" when the password matches. */
function doveVerifies(hash: string, password: string): boolean {
  const r = spawnSync('doveadm', ['pw', '-t', hash, '-p', password], { encoding: 'utf8' });
  return r.status === 0 && r.stdout.includes('(verified)');
}

/** Run fn, expect an AppError with `code`; return its message. */
async function rejects(t: Test, fn: () => unknown, code: string, what: string): Promise<string> {
  try {
    await fn();
  } catch (e) {
    t.ok(e instanceof AppError, `${what}: an AppError`);
    t.equal((e as AppError).code, code, `${what}: code ${code}`);
    return (e as Error).message;
  }
  t.fail(`${what}: expected ${code}, nothing thrown`);
  return '';
}

t.test('doveadm is there (the tests below use the real Dovecot)', async (t) => {
  const r = spawnSync('doveadm', ['pw', '-l'], { encoding: 'utf8' });
  t.equal(r.status, 0, 'doveadm pw -l runs');
  for (const s of SCHEMES) t.match(r.stdout, new RegExp(`(^|\\s)${s}(\\s|$)`), `Dovecot knows ${s}`);
});

t.test('hashes made by doveadm pw -s SCHEME verify; wrong passwords do not', async (t) => {
  t.same([...SCHEMES].sort(), ['ARGON2I', 'ARGON2ID', 'BLF-CRYPT', 'PLAIN', 'SCRAM-SHA-256', 'SHA256-CRYPT', 'SHA512-CRYPT', 'SSHA256', 'SSHA512'].sort());
  for (const scheme of SCHEMES) {
    for (const pw of PASSWORDS) {
      const hash = dovePw(scheme, pw);
      t.equal(await verifyPassword(hash, b(pw)), true, `${scheme} ${JSON.stringify(pw)}: right password verifies`);
      t.equal(await verifyPassword(hash, b(`${pw}x`)), false, `${scheme}: password + 1 char refused`);
      t.equal(await verifyPassword(hash, b(pw.slice(0, -1))), false, `${scheme}: password - 1 char refused`);
      t.equal(await verifyPassword(hash, b(pw.toUpperCase())), false, `${scheme}: upper-cased password refused`);
    }
  }
});

t.test('doveadm hashes with non-default rounds/cost verify', async (t) => {
  const pw = PASSWORDS[1] as string;
  for (const [scheme, rounds] of [
    ['SHA512-CRYPT', '20000'],
    ['SHA256-CRYPT', '20000'],
    ['BLF-CRYPT', '6'],
  ] as const) {
    const hash = dovePw(scheme, pw, ['-r', rounds]);
    t.match(hash, rounds === '6' ? /\$2y\$06\$/ : /\$rounds=20000\$/, `${scheme} hash carries the cost`);
    t.equal(await verifyPassword(hash, b(pw)), true, `${scheme} -r ${rounds}: verifies`);
    t.equal(await verifyPassword(hash, b('wrong')), false, `${scheme} -r ${rounds}: wrong refused`);
  }
});

t.test('SHA-crypt at password lengths around the digest size (32 and 64 bytes)', async (t) => {
  // a regression test: the SHA-crypt steps for "each full digest-size block of the password"
  // were once wrong exactly when the byte length was a multiple of the digest size
  for (const scheme of ['SHA256-CRYPT', 'SHA512-CRYPT'] as const) {
    for (const len of [1, 31, 32, 33, 63, 64, 65, 96, 128, 129]) {
      const pw = 'k'.repeat(len);
      const theirs = dovePw(scheme, pw);
      t.equal(await verifyPassword(theirs, b(pw)), true, `${scheme} ${len} bytes: doveadm hash verifies`);
      t.equal(await verifyPassword(theirs, b(`${pw}k`)), false, `${scheme} ${len} bytes: one byte more refused`);
      const ours = await hashPassword(b(pw), scheme);
      t.equal(doveVerifies(ours, pw), true, `${scheme} ${len} bytes: doveadm verifies our hash`);
    }
    const multi = 'é'.repeat(16); // 32 bytes of UTF-8 in 16 characters
    t.equal(await verifyPassword(dovePw(scheme, multi), b(multi)), true, `${scheme}: 16 two-byte characters`);
  }
});

t.test('hashes we make verify with doveadm pw -t', async (t) => {
  for (const scheme of SCHEMES) {
    for (const pw of PASSWORDS) {
      const hash = await hashPassword(b(pw), scheme);
      t.ok(hash.startsWith(`{${scheme}}`), `${scheme}: {SCHEME} prefix`);
      t.equal(doveVerifies(hash, pw), true, `${scheme} ${JSON.stringify(pw)}: doveadm verifies our hash`);
      t.equal(doveVerifies(hash, `${pw}!`), false, `${scheme}: doveadm refuses a wrong password against it`);
      t.equal(await verifyPassword(hash, b(pw)), true, `${scheme}: we verify our own hash`);
    }
  }
  const def = await hashPassword(b('x'));
  t.match(def, /^\{ARGON2ID\}\$argon2id\$/, 'new passwords default to ARGON2ID');
  const first = await hashPassword(b('same'), 'SSHA512');
  const second = await hashPassword(b('same'), 'SSHA512');
  t.not(first, second, 'salted: two hashes of one password differ');
});

t.test('passwords are bytes: every scheme tells pass\\xfe from pass\\xff (both "pass\\uFFFD" after a lossy decode)', async (t) => {
  const stored = Buffer.from('pass\xfe', 'latin1');
  const other = Buffer.from('pass\xff', 'latin1');
  for (const scheme of SCHEMES) {
    if (scheme === 'PLAIN') {
      await rejects(t, () => hashPassword(stored, scheme), 'INVALID_VALUE', '{PLAIN} of bytes that are not UTF-8');
      continue;
    }
    const hash = await hashPassword(stored, scheme);
    t.equal(await verifyPassword(hash, stored), true, `${scheme}: the stored bytes verify`);
    t.equal(await verifyPassword(hash, other), false, `${scheme}: other bytes do not`);
    t.equal(await verifyPassword(hash, Buffer.from('pass\ufffd', 'utf8')), false, `${scheme}: nor the replacement character`);
  }
  // a doveadm argon2 hash of a UTF-8 password: verified over the bytes (not through @node-rs/argon2's UTF-8-only verify)
  for (const scheme of ['ARGON2ID', 'ARGON2I'] as const) {
    const pw = PASSWORDS[1] as string;
    const hash = dovePw(scheme, pw);
    t.equal(await verifyPassword(hash, b(pw)), true, `${scheme} from doveadm: verifies`);
    t.equal(await verifyPassword(hash, Buffer.concat([b(pw), Buffer.from([0xff])])), false, `${scheme} from doveadm: one byte more refused`);
  }
});

t.test('passwords with CR, LF or NUL are refused when hashing', async (t) => {
  for (const bad of ['a\nb', 'a\rb', 'a\0b']) await rejects(t, () => hashPassword(b(bad)), 'INVALID_VALUE', JSON.stringify(bad));
});

t.test('absurd cost parameters are refused before any work, with PASSWORD_COST', async (t) => {
  const pw = 'pw';
  const sha512 = dovePw('SHA512-CRYPT', pw);
  const sha256 = dovePw('SHA256-CRYPT', pw);
  const blf = dovePw('BLF-CRYPT', pw);
  const a2id = dovePw('ARGON2ID', pw);
  const a2i = dovePw('ARGON2I', pw);
  const cases: [string, string][] = [
    ['SHA512-CRYPT rounds=999999', sha512.replace('$6$', '$6$rounds=999999$')],
    ['SHA512-CRYPT rounds=999999999', sha512.replace('$6$', '$6$rounds=999999999$')],
    ['SHA256-CRYPT rounds=100001', sha256.replace('$5$', '$5$rounds=100001$')],
    ['BLF-CRYPT cost 15', blf.replace(/\$2y\$\d\d\$/, '$2y$15$')],
    ['BLF-CRYPT cost 31', blf.replace(/\$2y\$\d\d\$/, '$2y$31$')],
    ['ARGON2ID m=1048576', a2id.replace(/m=\d+/, 'm=1048576')],
    ['ARGON2ID t=20', a2id.replace(/t=\d+/, 't=20')],
    ['ARGON2ID p=8', a2id.replace(/p=\d+/, 'p=8')],
    ['ARGON2I m=1048576', a2i.replace(/m=\d+/, 'm=1048576')],
    ['ARGON2I t=20', a2i.replace(/t=\d+/, 't=20')],
    ['ARGON2I p=8', a2i.replace(/p=\d+/, 'p=8')],
  ];
  for (const [what, hash] of cases) {
    t.not(hash, sha512, `${what}: the crafted hash differs from the original`);
    const start = process.hrtime.bigint();
    const msg = await rejects(t, () => verifyPassword(hash, b(pw)), 'PASSWORD_COST', `verify ${what}`);
    const ms = Number(process.hrtime.bigint() - start) / 1e6;
    t.ok(ms < 500, `${what}: refused in ${ms.toFixed(1)} ms, without doing the work`);
    await rejects(t, () => parseHash(hash), 'PASSWORD_COST', `parse ${what}`);
    const body = hash.slice(hash.indexOf('}') + 1);
    t.notOk(msg.includes(body), `${what}: message does not contain the hash`);
    t.notOk(msg.includes(body.slice(-20)), `${what}: message does not contain the digest`);
  }
  // the limits themselves are accepted (LIMITS.md: rounds <= 100000, bcrypt <= 14, m <= 256 MiB, t <= 10, p <= 4)
  t.equal(LIMITS.SHA_CRYPT_MAX_ROUNDS, 100000);
  t.doesNotThrow(() => parseHash(sha512.replace('$6$', '$6$rounds=100000$')), 'rounds=100000 accepted');
  t.doesNotThrow(() => parseHash(dovePw('BLF-CRYPT', pw, ['-r', '14'])), 'bcrypt cost 14 (made by doveadm) accepted');
  t.doesNotThrow(() => parseHash(a2id.replace(/m=\d+/, 'm=262144').replace(/t=\d+/, 't=10').replace(/p=\d+/, 'p=4')), 'argon2 at the limits accepted');
});

t.test('unknown schemes are refused with PASSWORD_SCHEME, naming the scheme, never the hash', async (t) => {
  const md5 = dovePw('MD5-CRYPT', 'pw');
  const cases: [string, string][] = [
    ['MD5-CRYPT', md5],
    ['FOO', '{FOO}secretsecretvalue-0123456789'],
    ['CRAM-MD5', dovePw('CRAM-MD5', 'pw')],
  ];
  for (const [scheme, hash] of cases) {
    const body = hash.slice(hash.indexOf('}') + 1);
    const msg = await rejects(t, () => verifyPassword(hash, b('pw')), 'PASSWORD_SCHEME', `{${scheme}}`);
    t.match(msg, `{${scheme}}`, `message names {${scheme}}`);
    t.match(msg, 'ARGON2ID', 'message lists the supported schemes');
    t.notOk(msg.includes(body), 'message does not contain the hash');
  }
  const msg = await rejects(t, () => verifyPassword('no-prefix-secret-hash-text', b('pw')), 'PASSWORD_SCHEME', 'no {SCHEME} prefix');
  t.notOk(msg.includes('no-prefix-secret-hash-text'), 'message does not contain the hash');
  const bad = await rejects(t, () => verifyPassword('{SHA512-CRYPT}$6$salt$tooshort!!notbase64', b('pw')), 'PASSWORD_SCHEME', 'malformed SHA512-CRYPT');
  t.notOk(bad.includes('tooshort'), 'malformed-hash message does not contain the hash');
});

function median(xs: number[]): number {
  const s = xs.slice().sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] as number;
}

t.test('authenticate(): outcomes, and an unknown user costs about what a wrong password costs', async (t) => {
  const dir = scratchDir(t);
  const file = join(dir, 'pigeon.db');
  const store = await openStore(file, { create: true });
  t.teardown(() => store.close());
  await store.addDomain('example.test');
  await store.addUser('alice@example.test', await hashPassword(b('secret')), null);
  await store.addUser('imported@example.test', dovePw('SHA512-CRYPT', 'old-secret'), null);
  await store.addUser('absurd@example.test', dovePw('SHA512-CRYPT', 'x').replace('$6$', '$6$rounds=999999$'), null);
  const auth = await createAuth({ chain: ['database'] }, store, dir);
  const login = (user: string, password: string) => auth.authenticate({ user, password: b(password), service: 'imap' });

  const ok = await login('Alice@Example.TEST', 'secret');
  t.equal(ok.ok, true, 'right password: ok (address normalised)');
  if (ok.ok) t.equal(ok.user.user.address, 'alice@example.test');
  t.match(await login('alice@example.test', 'wrong'), { ok: false, why: 'bad-credentials' }, 'wrong password');
  t.match(await login('nobody@example.test', 'secret'), { ok: false, why: 'unknown-user' }, 'unknown user');
  t.match(await login('not an address', 'secret'), { ok: false, why: 'unknown-user' }, 'invalid user name');
  t.match(await login('imported@example.test', 'old-secret'), { ok: true }, 'an imported doveadm hash logs in');
  const absurd = await login('absurd@example.test', 'x');
  t.match(absurd, { ok: false, why: 'tempfail' }, 'an unusable stored hash is a tempfail, never success or wrong password');
  if (!absurd.ok && absurd.why === 'tempfail') t.notMatch(absurd.detail, /rounds=999999\$|\$6\$/, 'detail carries no hash');

  // the CPU time this process spends on the login (the hash runs on its thread pool, counted
  // too): what an attacker's clock measures on an idle server, without the noise a loaded machine
  // adds to wall-clock time (two suites at once made the medians of wall time cross over)
  const time = async (user: string): Promise<number> => {
    const s = process.cpuUsage();
    await login(user, 'wrong-password');
    const d = process.cpuUsage(s);
    return (d.user + d.system) / 1e3;
  };
  // warm up both paths (the dummy hash is made lazily on first use)
  await time('alice@example.test');
  await time('ghost@example.test');
  const wrong: number[] = [];
  const unknown: number[] = [];
  const invalid: number[] = [];
  for (let i = 0; i < 5; i++) {
    wrong.push(await time('alice@example.test'));
    unknown.push(await time('ghost@example.test'));
    invalid.push(await time('ghost-without-domain'));
  }
  const mw = median(wrong);
  const mu = median(unknown);
  const mi = median(invalid);
  t.comment(`median CPU ms: wrong password ${mw.toFixed(2)}, unknown user ${mu.toFixed(2)}, invalid name ${mi.toFixed(2)}`);
  t.ok(mw > 2, `a wrong password costs a real hash verification (${mw.toFixed(2)} ms)`);
  t.ok(mu >= 0.5 * mw, `unknown user (${mu.toFixed(2)} ms) >= 0.5 x wrong password (${mw.toFixed(2)} ms)`);
  t.ok(mi >= 0.5 * mw, `invalid user name (${mi.toFixed(2)} ms) >= 0.5 x wrong password (${mw.toFixed(2)} ms)`);
});

t.test('at most 4 hash verifications run at once, even when a new login arrives as one finishes', async (t) => {
  // a controllable stand-in for the hash function (not the thing under test: the limiter is)
  let active = 0;
  let max = 0;
  const pending: { promise: Promise<boolean>; finish: () => void }[] = [];
  const fakeVerify = (): Promise<boolean> => {
    active++;
    max = Math.max(max, active);
    let finish = (): void => undefined;
    const promise = new Promise<boolean>((res) => {
      finish = () => {
        active--;
        res(false);
      };
    });
    pending.push({ promise, finish });
    return promise;
  };
  // the limiter every auth source verifies through (auth/verify.ts), with the hash functions replaced
  const schemes = await import('../auth/schemes.js');
  const { verifyStored, spendDummy } = await t.mockImport<typeof import('../auth/verify.js')>('../auth/verify.js', {
    '../auth/schemes.js': { ...schemes, verifyPassword: fakeVerify, dummyVerify: fakeVerify },
  });
  // a login's verification: a stored hash (database, passwd-file) or the dummy for an unknown user
  let n = 0;
  const login = (): Promise<boolean> => (n++ % 2 === 0 ? verifyStored('{PLAIN}x', b('y')) : spendDummy(b('y')));
  const all: Promise<unknown>[] = [];
  for (let i = 0; i < 5; i++) all.push(login());
  const settle = (): Promise<void> => new Promise((r) => setImmediate(r));
  await settle();
  t.equal(active, 4, 'four verifications run, the fifth login waits');
  // finish the first verification, and start a new login in the very reaction that follows it
  const first = pending.shift();
  if (!first) throw new Error('no verification started');
  void first.promise.then(() => {
    all.push(login());
  });
  first.finish();
  await settle();
  t.ok(max <= 4, `never more than 4 at once (saw ${max})`);
  // drain everything
  for (let p = pending.shift(); p; p = pending.shift()) {
    p.finish();
    await settle();
  }
  await Promise.all(all);
  t.equal(active, 0, 'all finished');
  t.ok(max <= 4, `never more than 4 at once (saw ${max})`);
});
