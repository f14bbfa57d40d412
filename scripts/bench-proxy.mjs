#!/usr/bin/env node
// Benchmark: the IMAP proxy vs logging in to Dovecot directly, in the same run, same mailbox,
// same {ARGON2ID} password hash.
//  - login-to-ready latency: connect -> greeting -> LOGIN -> tagged OK (median/p90 over N logins)
//  - large FETCH: BODY[] of a 32 MB message, bytes/s (median over a few runs)
// Direct Dovecot = a private Dovecot master (imap-login + passwd-file passdb) on loopback,
// serving the same Maildir. Prints JSON and a human summary with ratios.
import { spawnSync, spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync, mkdirSync, chmodSync, chownSync, readFileSync, rmSync } from 'node:fs';
import { connect, createServer } from 'node:net';
import { join } from 'node:path';
import { tmpdir } from 'node:os';

const ROOT = new URL('..', import.meta.url).pathname;
const CLI = join(ROOT, 'dist/src/cli.js');
const N = Number(process.env.BENCH_LOGINS ?? 60);
const FETCH_MB = Number(process.env.BENCH_FETCH_MB ?? 32);
const base = mkdtempSync(join(tmpdir(), 'pigeon-bench-'));
chmodSync(base, 0o755);
const dir = join(base, 'inst');
const pig = (args, input) => {
  const r = spawnSync(process.execPath, [CLI, '-c', dir, ...args], { input, encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`pigeon ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
};
const freePort = () => new Promise((res) => { const s = createServer(); s.listen(0, '127.0.0.1', () => { const p = s.address().port; s.close(() => res(p)); }); });

const pport = await freePort();
spawnSync(process.execPath, [CLI, 'init', dir, '--node', 'bench', '--listen', `imap=127.0.0.1:${pport}`]);
writeFileSync(join(dir, 'conf.d', '50-bench.yaml'), 'log:\n  level: warn\n  file: pigeon.log\n');
pig(['domain', 'add', 'example.test']);
pig(['user', 'add', 'alice@example.test', '--password-stdin'], 'secret\n');

const serveP = spawn(process.execPath, [CLI, '-c', dir, 'serve', '--workers', '1'], { stdio: ['ignore', 'ignore', 'pipe'] });
await new Promise((res, rej) => { let e = ''; serveP.stderr.on('data', (d) => { e += d; if (/ready/.test(e)) res(); }); serveP.on('exit', () => rej(new Error(e))); });

function session(port) {
  return new Promise((resolve, reject) => {
    const s = connect(port, '127.0.0.1');
    let buf = Buffer.alloc(0);
    let waiter = null;
    s.on('data', (d) => { buf = Buffer.concat([buf, d]); waiter?.(); });
    s.on('error', reject);
    const until = (re) => new Promise((res) => { const check = () => { const str = buf.length > 65536 ? buf.subarray(-4096).toString('latin1') : buf.toString('latin1'); if (re.test(str)) { waiter = null; const out = buf; buf = Buffer.alloc(0); res(out); } else waiter = check; }; check(); });
    s.on('connect', () => resolve({ s, until, write: (x) => s.write(x), get size() { return buf.length; } }));
  });
}

async function loginOnce(port) {
  const t0 = process.hrtime.bigint();
  const c = await session(port);
  await c.until(/^\* OK.*\r\n/);
  c.write('a LOGIN alice@example.test secret\r\n');
  const r = await c.until(/a (OK|NO|BAD).*\r\n/);
  const t1 = process.hrtime.bigint();
  if (!/a OK/.test(r.toString())) throw new Error(`login failed: ${r}`);
  c.write('b LOGOUT\r\n');
  await c.until(/b OK/);
  c.s.destroy();
  return Number(t1 - t0) / 1e6;
}

// first login allocates the mailbox
await loginOnce(pport);
const show = JSON.parse(pig(['user', 'show', 'alice@example.test', '--json']));
const maildir = show.allocation.path;
const hash = spawnSync('sqlite3', [], { input: '' }).status === 0 ? null : null; void hash;
const { default: Database } = await import(join(ROOT, 'node_modules/better-sqlite3/lib/index.js'));
const db = new Database(join(dir, 'pigeon.db'), { readonly: true });
const pwHash = db.prepare('SELECT password FROM users WHERE address = ?').get('alice@example.test').password;
db.close();

// a large message
const big = join(maildir, 'new', `1.big.bench`);
{
  const line = 'x'.repeat(76) + '\r\n';
  const body = line.repeat(Math.ceil((FETCH_MB * 1024 * 1024) / line.length));
  writeFileSync(big, `From: a@example.test\r\nTo: alice@example.test\r\nSubject: big\r\n\r\n${body}`);
  chownSync(big, 8, 8);
}

// direct Dovecot: a private master with imap-login and a passwd-file passdb holding the same hash
const dport = await freePort();
const dv = join(base, 'dovecot');
mkdirSync(join(dv, 'run'), { recursive: true });
writeFileSync(join(dv, 'passwd'), `alice@example.test:${pwHash}\n`);
writeFileSync(join(dv, 'dovecot.conf'), `base_dir = ${dv}/run
state_dir = ${dv}/state
log_path = ${dv}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = 8
mail_location = maildir:${maildir}
passdb {
  driver = passwd-file
  args = ${dv}/passwd
}
userdb {
  driver = static
  args = uid=8 gid=8 home=${maildir}
}
service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = ${dport}
  }
  inet_listener imaps {
    port = 0
  }
}
service anvil {
  chroot =
}
service imap-login {
  chroot =
}
`);
mkdirSync(join(dv, 'state'), { recursive: true });
const dovecot = spawn('/usr/sbin/dovecot', ['-F', '-c', join(dv, 'dovecot.conf')], { stdio: 'ignore' });
for (let i = 0; i < 100; i++) { try { await loginOnce(dport); break; } catch { await new Promise((r) => setTimeout(r, 100)); } }

const stats = (a) => { const s = [...a].sort((x, y) => x - y); const q = (p) => s[Math.min(s.length - 1, Math.floor(p * s.length))]; return { median: q(0.5), p90: q(0.9), min: s[0], n: s.length }; };

async function logins(port) { const r = []; for (let i = 0; i < N; i++) r.push(await loginOnce(port)); return stats(r); }

async function fetchOnce(port) {
  const c = await session(port);
  await c.until(/^\* OK.*\r\n/);
  c.write('a LOGIN alice@example.test secret\r\n');
  await c.until(/a OK.*\r\n/);
  c.write('b SELECT INBOX\r\n');
  await c.until(/b OK.*\r\n/);
  // count bytes without buffering the whole literal (the client must not be the bottleneck)
  c.s.removeAllListeners('data');
  let bytes = 0;
  let tail = '';
  const t0 = process.hrtime.bigint();
  await new Promise((res) => {
    c.s.on('data', (d) => {
      bytes += d.length;
      tail = (tail + d.subarray(-200).toString('latin1')).slice(-400);
      if (/\r\nc OK[^\r]*\r\n$/.test(tail)) res();
    });
    c.write('c FETCH 1 BODY.PEEK[]\r\n');
  });
  const t1 = process.hrtime.bigint();
  c.s.destroy();
  const r = { length: bytes };
  return (r.length / (Number(t1 - t0) / 1e9)) / (1024 * 1024);
}
async function fetches(port) { const r = []; for (let i = 0; i < 5; i++) r.push(await fetchOnce(port)); return stats(r); }

// interleave to share the machine's noise fairly
console.error('bench: logins through the proxy');
const proxyLogin = await logins(pport);
console.error('bench: logins to Dovecot directly');
const directLogin = await logins(dport);
console.error('bench: FETCH through the proxy');
const proxyFetch = await fetches(pport);
console.error('bench: FETCH from Dovecot directly');
const directFetch = await fetches(dport);
const result = {
  logins: N,
  login_ms: { proxy: proxyLogin, direct: directLogin, ratio_median: +(proxyLogin.median / directLogin.median).toFixed(2) },
  fetch_MiBps: { size_MiB: FETCH_MB, proxy: proxyFetch, direct: directFetch, ratio_median: +(proxyFetch.median / directFetch.median).toFixed(2) },
};
console.log(JSON.stringify(result, null, 2));
console.log(`login-to-ready: proxy median ${proxyLogin.median.toFixed(1)} ms (p90 ${proxyLogin.p90.toFixed(1)}), direct Dovecot ${directLogin.median.toFixed(1)} ms (p90 ${directLogin.p90.toFixed(1)}); ratio ${result.login_ms.ratio_median}x`);
console.log(`FETCH ${FETCH_MB} MiB: proxy ${proxyFetch.median.toFixed(0)} MiB/s, direct Dovecot ${directFetch.median.toFixed(0)} MiB/s; ratio ${result.fetch_MiBps.ratio_median}x`);
dovecot.kill('SIGTERM');
serveP.kill('SIGTERM');
await new Promise((r) => setTimeout(r, 500));
rmSync(base, { recursive: true, force: true });
process.exit(0);
