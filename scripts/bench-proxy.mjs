#!/usr/bin/env node
/**
 * NAME        scripts/bench-proxy — the IMAP/POP3 proxy vs logging in to Dovecot directly, same run
 * SYNOPSIS    node scripts/bench-proxy.mjs [--quick] [--rounds N] [--workers N] [--idle N[,N…]]
 *                                          [--only login,fetch,idle,lmtp] [--lmtp-warm N] [--login-warm N]
 *                                          [--json-out FILE]       (after npx tsc -p tsconfig.json)
 * DESCRIPTION Starts a throw-away PigeonDeliver instance (`pigeon serve`, imap + imaps + pop3
 *             listeners) and a private Dovecot master (imap-login + pop3-login, passwd-file passdb
 *             with the SAME {SSHA256} hash, static userdb, the SAME Maildir, imaps with the
 *             instance's certs/node.crt), both on loopback, and measures, in rounds that alternate
 *             which side goes first (a shared, noisy machine: medians of rounds, ratios):
 *               login c=1, c=32   connect → greeting → LOGIN → tagged OK (latency) → LOGOUT → OK
 *                                 (logins/s = completed cycles / wall time); and c=1 over imaps.
 *                                 Before the rounds, one c=1 round each side (login_c1_cold),
 *                                 then --login-warm N (default 600) logins each side, 4 at a time
 *                                 (without the login rows: 20)
 *               FETCH plain, TLS  `FETCH 1 BODY.PEEK[]` of one 20 MiB message, repeated: MiB/s
 *               POP3 RETR         `RETR 1` of the same message, repeated: MiB/s
 *               idle              N sessions logged in, SELECTed and in IDLE: PSS (smaps_rollup) of
 *                                 the proxy's processes (workers, their spawners; growth over its
 *                                 idle baseline, taken after 200 (--quick: 50) such sessions were
 *                                 opened and closed on both sides: what a process pays once is
 *                                 not counted per session) and of the backend `imap` processes, per session;
 *                                 Dovecot's login/auth/master processes likewise for the
 *                                 reference; then up to 1000 (--quick: 200) such sessions over
 *                                 imaps (relayed by the proxy, by imap-login for Dovecot)
 *               LMTP              4 KB messages, MAIL/RCPT/DATA pipelined, on 1 and 4 connections,
 *                                 serve's lmtp listener vs Dovecot's lmtp into the same Maildir:
 *                                 msg/s; the disk's fsync bound beside them. Before the rounds,
 *                                 one round each side (its rate kept: lmtp_cold), then
 *                                 --lmtp-warm N (default 1200) messages to serve for another user
 *                                 (V8 optimises serve's per-message code after ≈ 600 of them)
 *             Clients bind to distinct 127.x.y.z source addresses (the proxy allows 20 concurrent
 *             connections per client address). Everything is killed and removed at exit, also on
 *             failure or timeout. Needs root (Dovecot runs as the mail uid 8) and dovecot-imapd,
 *             dovecot-pop3d.
 * OUTPUT      A human summary on stdout; --json-out FILE writes the results as JSON.
 */
import { spawnSync, spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync, mkdirSync, chmodSync, chownSync, readFileSync, rmSync, readdirSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { tmpdir, cpus } from 'node:os';
import { option, sleep, tree, cleanupAtExit, failLoudly, stopServe, freePort, quantile, median, r2, open, until, GREETING, fetchRate, retrRate, lmtpSession, durableWriter } from './bench-lib.mjs';

const argv = process.argv.slice(2);
const opt = option(argv);
const QUICK = argv.includes('--quick');
const ROUNDS = Number(opt('rounds', QUICK ? 3 : 5));
const WORKERS = Number(opt('workers', cpus().length));
const LOGINS_C1 = QUICK ? 25 : 60;
const LOGINS_C32 = QUICK ? 64 : 320;
const FETCH_MB = 20;
const FETCHES = QUICK ? 2 : 4; // per round per side
const IDLE = String(opt('idle', QUICK ? '1000' : '1000,5000')).split(',').map(Number).filter((n) => n > 0);
const JSON_OUT = opt('json-out', null);
const ONLY = new Set(String(opt('only', 'login,fetch,idle,lmtp')).split(','));
const LMTP_MSGS = QUICK ? 60 : 200; // per round per side per concurrency
// LMTP messages serve gets before the measured rounds, on 1 and 4 connections in turn: V8
// optimises serve's per-message code only after ≈ 600 messages per process (README, Performance:
// serve's CPU per message 1.1–1.3 ms before, 0.7–0.8 ms after). They go to a user of their own
// (WARM_USER, pigeon only), so the measured Maildir, which both sides share and whose size Dovecot's
// lmtp pays for, grows exactly as before. The first round of each side (to USER, as the only
// warm-up used to be) is kept in the results as lmtp_cold.
const LMTP_WARM = Number(opt('lmtp-warm', QUICK ? 200 : 1200));
// logins each side gets (4 at a time) before the login rounds: a serve worker's login code is
// optimised by V8 only after a few hundred logins, which a running server has long behind it
// (README, Performance: *A quarter of V8's tier-up budget*); Dovecot, in C, has no such step.
// The first c=1 round after start is kept as login_c1_cold.
const LOGIN_WARM = Number(opt('login-warm', QUICK ? 100 : 600));
const ROOT = new URL('..', import.meta.url).pathname;
const CLI = join(ROOT, 'dist/src/cli.js');
const MAIL_UID = 8;
const USER = 'alice@example.test';
const WARM_USER = 'warm@example.test';
const PASS = 'bench-secret';
const log = (...a) => console.error('bench-proxy:', ...a);

if (!existsSync(CLI)) {
  console.error(`bench-proxy: ${CLI} missing; build first: npx tsc -p tsconfig.json`);
  process.exit(1);
}
if (process.getuid?.() !== 0) {
  console.error('bench-proxy: needs root (Dovecot runs as the mail uid)');
  process.exit(1);
}

// ---------------------------------------------------------------- cleanup, always
const base = mkdtempSync(join(tmpdir(), 'pigeon-bench-'));
chmodSync(base, 0o755);
const roots = []; // child processes whose whole tree is killed at exit
cleanupAtExit(base, roots);
function logTails() {
  for (const f of [join(base, 'inst', 'pigeon.log'), join(base, 'dovecot', 'dovecot.log')]) {
    try {
      const lines = readFileSync(f, 'utf8').split('\n').filter((l) => !/Inotify instance limit/.test(l));
      console.error(`--- ${f} (last lines)\n${lines.slice(-15).join('\n')}`);
    } catch {
      /* none */
    }
  }
}
failLoudly('bench-proxy', logTails, (QUICK ? 120 : 1200));

// ---------------------------------------------------------------- helpers
// the i-th distinct client address (127.1.0.1 …): at most a few connections per address
const srcAddr = (i) => `127.${1 + Math.floor(i / 62500)}.${Math.floor(i / 250) % 250}.${1 + (i % 250)}`;
async function imapLogin(c, marks) {
  await until(c, GREETING);
  if (marks) marks.greeted = process.hrtime.bigint();
  c.s.write(`a LOGIN ${USER} ${PASS}\r\n`);
  const r = await until(c, /^a (OK|NO|BAD)[^\r\n]*\r\n/m);
  if (!/^a OK/m.test(r)) throw new Error(`login failed: ${r.trim()}`);
}

// ---------------------------------------------------------------- the PigeonDeliver instance
const dir = join(base, 'inst');
const pig = (args, input) => {
  const r = spawnSync(process.execPath, [CLI, '-c', dir, ...args], { input, encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`pigeon ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
};
const P = { imap: await freePort(), imaps: await freePort(), pop3: await freePort(), lmtp: await freePort() };
{
  const r = spawnSync(process.execPath, [CLI, 'init', dir, '--node', 'bench', '--listen', `imap=127.0.0.1:${P.imap}`, '--listen', `imaps=127.0.0.1:${P.imaps}`, '--listen', `pop3=127.0.0.1:${P.pop3}`, '--listen', `lmtp=127.0.0.1:${P.lmtp}`], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`pigeon init: ${r.stderr}`);
}
// relayed (TLS) sessions count against limits.max_connections (default 1000): raised for the idle rows
writeFileSync(join(dir, 'conf.d', '50-bench.yaml'), 'log:\n  level: warn\n  file: pigeon.log\nlimits:\n  max_connections: 20000\n');
pig(['domain', 'add', 'example.test']);
// the same cheap scheme on both sides: the login path is measured, not the hash
const SCHEME = 'SSHA256';
const pwHash = pig(['pw', '-s', SCHEME], `${PASS}\n`).trim();
writeFileSync(join(base, 'users.passwd'), `${USER}:${pwHash}\n`);
pig(['user', 'import', 'passwd-file', join(base, 'users.passwd')]);
pig(['user', 'add', WARM_USER, '--password-stdin'], `${PASS}\n`);

let serveP = null;
// inspect: every serve process opens an inspector on a random loopback port (idle rows only), so
// the bench can force a full GC before reading memory: the growth is then live memory, not garbage
async function startServe(workers, { inspect = false } = {}) {
  const nodeOptions = [process.env.BENCH_SERVE_NODE_OPTIONS, inspect ? '--inspect=127.0.0.1:0' : null].filter(Boolean).join(' ');
  const nodeArgs = (process.env.BENCH_SERVE_NODE_ARGS ?? '').split(' ').filter(Boolean); // e.g. --cpu-prof --cpu-prof-dir=/tmp/prof
  const p = spawn(process.execPath, [...nodeArgs, CLI, '-c', dir, 'serve', '--workers', String(workers)], { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, ...(nodeOptions ? { NODE_OPTIONS: nodeOptions } : {}) } });
  roots.push(p);
  p.inspectors = [];
  p.workers = workers;
  p.inspected = inspect;
  await new Promise((res, rej) => {
    let e = '';
    p.stderr.on('data', (d) => {
      e += d;
      for (const m of String(d).matchAll(/Debugger listening on (ws:\/\/\S+)/g)) p.inspectors.push(m[1]);
      if (/ready/.test(e)) res();
    });
    p.on('exit', () => rej(new Error(`pigeon serve exited: ${e}`)));
  });
  if (inspect) {
    const t0 = Date.now();
    while (p.inspectors.length < workers + (workers > 1 ? 1 : 0) && Date.now() - t0 < 5000) await sleep(100);
  }
  return p;
}
// full GC in every inspected serve process; returns the sum of process.memoryUsage() after it
function gcServe(p) {
  if (!p.inspectors?.length) return null;
  const code = `
    const out = { heapUsed: 0, external: 0, arrayBuffers: 0, rss: 0, n: 0 };
    for (const url of process.argv.slice(1)) {
      const ws = new WebSocket(url);
      await new Promise((r, j) => { ws.onopen = r; ws.onerror = j; });
      let id = 0; const pending = new Map();
      ws.onmessage = (m) => { const x = JSON.parse(m.data); pending.get(x.id)?.(x); };
      const call = (method, params) => new Promise((r) => { const i = ++id; pending.set(i, r); ws.send(JSON.stringify({ id: i, method, params })); });
      await call('HeapProfiler.collectGarbage');
      await call('HeapProfiler.collectGarbage');
      const v = await call('Runtime.evaluate', { expression: 'JSON.stringify(process.memoryUsage())', returnByValue: true });
      const mu = JSON.parse(v.result.result.value);
      for (const k of ['heapUsed', 'external', 'arrayBuffers', 'rss']) out[k] += mu[k];
      out.n++;
      ws.close();
    }
    console.log(JSON.stringify(out));
    process.exit(0);`;
  const r = spawnSync(process.execPath, ['--experimental-websocket', '--no-warnings', '--input-type=module', '-e', code, ...p.inspectors], { encoding: 'utf8', timeout: 30_000 });
  try {
    return JSON.parse(r.stdout.trim().split('\n').pop());
  } catch {
    log(`GC through the inspector failed: ${r.stderr.slice(0, 300)}`);
    return null;
  }
}
serveP = await startServe(WORKERS);

// first login allocates the mailbox
{
  const c = await open(P.imap);
  await imapLogin(c);
  c.s.write('b LOGOUT\r\n');
  await until(c, /^b OK[^\r\n]*\r\n/m);
  c.s.destroy();
}
const maildir = JSON.parse(pig(['user', 'show', USER, '--json'])).allocation.path;
for (const d of ['new', 'cur']) for (const f of readdirSync(join(maildir, d))) rmSync(join(maildir, d, f));
{
  const line = `${'x'.repeat(76)}\r\n`;
  const body = line.repeat(Math.ceil((FETCH_MB * 1024 * 1024) / line.length));
  const big = join(maildir, 'cur', '1700000000.M1P1.bench:2,S');
  writeFileSync(big, `From: a@example.test\r\nTo: ${USER}\r\nSubject: big\r\n\r\n${body}`);
  chownSync(big, MAIL_UID, MAIL_UID);
}

// ---------------------------------------------------------------- the reference Dovecot master
const D = { imap: await freePort(), imaps: await freePort(), pop3: await freePort(), lmtp: await freePort() };
const dv = join(base, 'dovecot');
mkdirSync(join(dv, 'run'), { recursive: true });
mkdirSync(join(dv, 'state'), { recursive: true });
writeFileSync(join(dv, 'passwd'), `${USER}:${pwHash}\n`);
// Dovecot's process and client limits: above the largest idle row (`--idle 10000` needs more than 6000)
const BIG_LIMIT = Math.max(6000, Math.ceil(Math.max(0, ...IDLE) * 1.2));
// Dovecot's LMTP server is Debian's dovecot-lmtpd (not in the README's set-up line): rows skipped without it
const HAVE_LMTP = existsSync('/usr/lib/dovecot/lmtp');
writeFileSync(
  join(dv, 'dovecot.conf'),
  `# reference: Dovecot's own login path, high-performance login mode, limits raised for the idle rows
base_dir = ${dv}/run
state_dir = ${dv}/state
log_path = ${dv}/dovecot.log
protocols = imap pop3${HAVE_LMTP ? ' lmtp' : ''}
listen = 127.0.0.1
ssl = yes
ssl_cert = <${join(dir, 'certs/node.crt')}
ssl_key = <${join(dir, 'certs/node.key')}
disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = ${MAIL_UID}
mail_location = maildir:${maildir}
mail_max_userip_connections = ${BIG_LIMIT}
default_process_limit = ${BIG_LIMIT}
default_client_limit = ${BIG_LIMIT}
default_vsz_limit = 1G
passdb {
  driver = passwd-file
  args = ${dv}/passwd
}
userdb {
  driver = static
  args = uid=${MAIL_UID} gid=${MAIL_UID} home=${maildir}
}
service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = ${D.imap}
  }
  inet_listener imaps {
    address = 127.0.0.1
    port = ${D.imaps}
    ssl = yes
  }
  chroot =
  service_count = 0
  process_min_avail = ${cpus().length}
}
service pop3-login {
  inet_listener pop3 {
    address = 127.0.0.1
    port = ${D.pop3}
  }
  inet_listener pop3s {
    port = 0
  }
  chroot =
  service_count = 0
  process_min_avail = ${cpus().length}
}
service anvil {
  chroot =
  client_limit = ${BIG_LIMIT * 4}
}
service imap {
  process_limit = ${BIG_LIMIT}
}
service auth {
  client_limit = ${BIG_LIMIT * 4}
}
${
  HAVE_LMTP
    ? `service lmtp {
  inet_listener lmtp {
    address = 127.0.0.1
    port = ${D.lmtp}
  }
  unix_listener lmtp {
    mode = 0
  }
}
postmaster_address = postmaster@example.test`
    : ''
}
service pop3 {
  process_limit = ${BIG_LIMIT}
}
service imap-urlauth-login {
  process_limit = 1
}
`,
);
const dovecot = spawn('/usr/sbin/dovecot', ['-F', '-c', join(dv, 'dovecot.conf')], { stdio: ['ignore', 'ignore', 'pipe'] });
roots.push(dovecot);
let dovecotErr = '';
dovecot.stderr.on('data', (d) => (dovecotErr += d));
for (let i = 0; ; i++) {
  try {
    const c = await open(D.imap);
    await imapLogin(c);
    c.s.destroy();
    break;
  } catch (e) {
    if (i > 100) throw new Error(`Dovecot did not start: ${e.message} ${dovecotErr} ${existsSync(join(dv, 'dovecot.log')) ? readFileSync(join(dv, 'dovecot.log'), 'utf8').slice(-2000) : ''}`);
    await sleep(100);
  }
}

const SIDES = {
  proxy: { name: 'PigeonDeliver', port: P },
  direct: { name: 'Dovecot direct', port: D },
};
// alternate which side goes first, round by round
async function rounds(fn) {
  const out = { proxy: [], direct: [] };
  for (let r = 0; r < ROUNDS; r++) {
    const order = r % 2 === 0 ? ['proxy', 'direct'] : ['direct', 'proxy'];
    for (const side of order) out[side].push(await fn(SIDES[side], r));
  }
  return out;
}

// ---------------------------------------------------------------- login
async function loginCycle(port, localAddress, tls = false) {
  const t0 = process.hrtime.bigint();
  const c = await open(port, { localAddress, tls });
  const marks = { greeted: t0 };
  await imapLogin(c, marks);
  const t1 = process.hrtime.bigint();
  c.s.write('b LOGOUT\r\n');
  await until(c, /^b OK[^\r\n]*\r\n/m);
  c.s.destroy();
  return { ms: Number(t1 - t0) / 1e6, greet: Number(marks.greeted - t0) / 1e6 };
}
async function loginRound(port, n, conc, tls = false) {
  const lat = [];
  // the split of each cycle: connect -> greeting, greeting -> tagged OK (context, not a target)
  const greet = [];
  const after = [];
  let next = 0;
  const t0 = process.hrtime.bigint();
  await Promise.all(
    Array.from({ length: conc }, async (_, w) => {
      while (next < n) {
        next++;
        const x = await loginCycle(port, srcAddr(w), tls);
        lat.push(x.ms);
        greet.push(x.greet);
        after.push(x.ms - x.greet);
      }
    }),
  );
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  return { per_second: n / secs, p50_ms: quantile(lat, 0.5), p99_ms: quantile(lat, 0.99), greeting_p50_ms: quantile(greet, 0.5), login_p50_ms: quantile(after, 0.5), n };
}
function summarise(per) {
  // per: {proxy: [round objects], direct: [...]} -> medians of each field over rounds, ratios
  const out = { rounds: per.proxy.length };
  for (const side of ['proxy', 'direct']) {
    out[side] = {};
    for (const k of Object.keys(per[side][0])) if (typeof per[side][0][k] === 'number') out[side][k] = r2(median(per[side].map((x) => x[k])));
  }
  out.ratio = {};
  for (const k of Object.keys(out.proxy)) if (k !== 'n' && out.direct[k]) out.ratio[k] = r2(out.proxy[k] / out.direct[k]);
  out.raw = per;
  return out;
}

const results = {
  machine: { cpus: cpus().length, cpu: cpus()[0]?.model, node: process.version, dovecot: spawnSync('/usr/sbin/dovecot', ['--version'], { encoding: 'utf8' }).stdout.trim() },
  setup: {
    password_scheme: `{${SCHEME}} on both sides (pigeon pw -s ${SCHEME}, imported; the same string in Dovecot's passwd-file)`,
    login_warm: ONLY.has('login') ? LOGIN_WARM : 20,
    lmtp_warm: LMTP_WARM,
    proxy: `pigeon serve --workers ${WORKERS} (plain IMAP/POP3 handed to Dovecot after login; TLS relayed)`,
    reference: 'private Dovecot master: imap-login/pop3-login (service_count=0, process_min_avail=cores), passwd-file passdb, static userdb, same Maildir, same certificate',
    rounds: ROUNDS,
    quick: QUICK,
  },
};

// the first c=1 round after start, each side (context, no target: login_c1_cold), then both sides
// warmed up (JIT, page cache, login processes) with LOGIN_WARM logins on 4 connections each
// (20 when no login row is measured: the other rows log in once per round)
if (ONLY.has('login')) results.login_c1_cold = summarise({ proxy: [await loginRound(SIDES.proxy.port.imap, LOGINS_C1, 1)], direct: [await loginRound(SIDES.direct.port.imap, LOGINS_C1, 1)] });
for (const side of Object.values(SIDES)) await loginRound(side.port.imap, ONLY.has('login') ? LOGIN_WARM : 20, 4);

if (ONLY.has('login')) {
  log(`login c=1 (${LOGINS_C1} per round per side, ${ROUNDS} rounds)`);
  results.login_c1 = summarise(await rounds((s) => loginRound(s.port.imap, LOGINS_C1, 1)));
  log(`login c=32 (${LOGINS_C32} per round per side)`);
  results.login_c32 = summarise(await rounds((s) => loginRound(s.port.imap, LOGINS_C32, 32)));
  // context, no target: imaps (the TLS handshake in the proxy's worker, Dovecot's in imap-login)
  log(`login imaps c=1 (${LOGINS_C1} per round per side)`);
  results.login_tls_c1 = summarise(await rounds((s) => loginRound(s.port.imaps, LOGINS_C1, 1, true)));
}

// ---------------------------------------------------------------- large FETCH, POP3 RETR
async function fetchRound(port, tls) {
  const c = await open(port, { tls, localAddress: srcAddr(1) });
  await imapLogin(c);
  c.s.write('b SELECT INBOX\r\n');
  await until(c, /^b OK[^\r\n]*\r\n/m);
  const MiBps = await fetchRate(c, FETCHES, FETCH_MB * 1048576);
  c.s.destroy();
  return { MiBps };
}
async function retrRound(port) {
  const c = await open(port, { localAddress: srcAddr(2) });
  const MiBps = await retrRate(c, USER, PASS, FETCHES, FETCH_MB * 1048576);
  c.s.destroy();
  return { MiBps };
}
if (ONLY.has('fetch')) {
  log(`FETCH ${FETCH_MB} MiB plain`);
  results.fetch_plain = summarise(await rounds((s) => fetchRound(s.port.imap, false)));
  log(`FETCH ${FETCH_MB} MiB TLS`);
  results.fetch_tls = summarise(await rounds((s) => fetchRound(s.port.imaps, true)));
  log(`POP3 RETR ${FETCH_MB} MiB plain`);
  results.pop3_retr = summarise(await rounds((s) => retrRound(s.port.pop3)));
}

// ---------------------------------------------------------------- idle sessions, memory
function smaps(pid) {
  try {
    const s = readFileSync(`/proc/${pid}/smaps_rollup`, 'latin1');
    const g = (k) => Number(new RegExp(`^${k}:\\s+(\\d+)`, 'm').exec(s)?.[1] ?? 0);
    return { rss: g('Rss'), pss: g('Pss'), priv: g('Private_Clean') + g('Private_Dirty') };
  } catch {
    return { rss: 0, pss: 0, priv: 0 };
  }
}
const BACKEND_COMM = new Set(['imap', 'pop3']);
/** what a front process is, for the per-process breakdown: serve's primary, its workers, spawners, writer; Dovecot's by name */
function role(p, rootPid) {
  if (p.pid === rootPid) return 'primary';
  if (p.comm !== 'node') return p.comm;
  try {
    return /writer-main/.test(readFileSync(`/proc/${p.pid}/cmdline`, 'latin1')) ? 'writer' : 'worker';
  } catch {
    return 'node';
  }
}
function memory(rootPid) {
  const sum = { front: { n: 0, rss: 0, pss: 0, priv: 0 }, backend: { n: 0, rss: 0, pss: 0, priv: 0 }, by: {} };
  for (const p of tree(rootPid)) {
    const back = BACKEND_COMM.has(p.comm);
    const g = back ? sum.backend : sum.front;
    const m = smaps(p.pid);
    g.n++;
    g.rss += m.rss;
    g.pss += m.pss;
    g.priv += m.priv;
    if (!back) {
      const r = role(p, rootPid);
      sum.by[r] = (sum.by[r] ?? 0) + m.pss;
    }
  }
  return sum;
}
async function settledMemory(rootPid, serve) {
  const heap = serve ? gcServe(serve) : null;
  const samples = [];
  for (let i = 0; i < 5; i++) {
    await sleep(500);
    samples.push(memory(rootPid));
  }
  const pick = (grp, k) => median(samples.map((s) => s[grp][k]));
  const out = {};
  for (const grp of ['front', 'backend']) out[grp] = { n: pick(grp, 'n'), rss_kB: pick(grp, 'rss'), pss_kB: pick(grp, 'pss'), private_kB: pick(grp, 'priv') };
  // PSS of the front processes by role (serve: primary, worker, pigeon: spawner, writer)
  out.front.pss_kB_by_process = {};
  for (const r of new Set(samples.flatMap((s) => Object.keys(s.by)))) out.front.pss_kB_by_process[r] = median(samples.map((s) => s.by[r] ?? 0));
  if (heap) out.front.js_after_gc_kB = { heapUsed: Math.round(heap.heapUsed / 1024), external: Math.round(heap.external / 1024), arrayBuffers: Math.round(heap.arrayBuffers / 1024) };
  return out;
}
async function idleSession(port, i, tls = false) {
  const c = await open(port, { localAddress: srcAddr((tls ? 20_000 : 1000) + i), tls });
  await imapLogin(c);
  c.s.write('b SELECT INBOX\r\n');
  await until(c, /^b OK[^\r\n]*\r\n/m);
  c.s.write('c IDLE\r\n');
  await until(c, /^\+ [^\r\n]*\r\n/m);
  c.buf = '';
  c.s.on('data', () => (c.buf = ''));
  return c;
}
/**
 * Before the baseline: the same sessions, WARM_IDLE of them, opened and closed on both sides, so
 * that what a process pays once (code run and compiled for the first time, heap and allocator
 * pools sized to the load) is in the baseline and the growth measured is per session. The
 * proxy's cold figure (its growth from start to the warm baseline, per warm-up session) is kept
 * in the JSON as warmup_front_pss_kB.
 */
const WARM_IDLE = QUICK ? 50 : 200;
async function warmIdle(side, rootPid, tls) {
  const ss = [];
  let next = 0;
  await Promise.all(
    Array.from({ length: 16 }, async () => {
      while (next < WARM_IDLE) ss.push(await idleSession(tls ? side.port.imaps : side.port.imap, 40_000 + next++, tls));
    }),
  );
  for (const c of ss) c.s.destroy();
  const t1 = Date.now();
  while (memory(rootPid).backend.n > 0 && Date.now() - t1 < 60_000) await sleep(200);
}
async function idleRun(side, rootPid, n, serve, tls = false) {
  const cold = await settledMemory(rootPid, serve);
  await warmIdle(side, rootPid, tls);
  const before = await settledMemory(rootPid, serve);
  const t0 = Date.now();
  const sessions = [];
  let next = 0;
  await Promise.all(
    Array.from({ length: 32 }, async () => {
      while (next < n) {
        const i = next++;
        sessions.push(await idleSession(tls ? side.port.imaps : side.port.imap, i, tls));
      }
    }),
  );
  const openSecs = (Date.now() - t0) / 1000;
  const during = await settledMemory(rootPid, serve);
  for (const c of sessions) c.s.destroy();
  const t1 = Date.now();
  while (memory(rootPid).backend.n > 0 && Date.now() - t1 < 60_000) await sleep(200);
  const perSession = (a, b) => r2((a - b) / n);
  return {
    sessions: n,
    open_seconds: r2(openSecs),
    before,
    during,
    warmup_sessions: WARM_IDLE,
    warmup_front_pss_kB: r2(before.front.pss_kB - cold.front.pss_kB),
    front_pss_kB_per_session: perSession(during.front.pss_kB, before.front.pss_kB),
    // the same growth from the freshly started processes (the warm-up's one-time costs included)
    front_pss_kB_per_session_from_start: perSession(during.front.pss_kB, cold.front.pss_kB),
    front_rss_kB_per_session: perSession(during.front.rss_kB, before.front.rss_kB),
    backend_pss_kB_per_session: perSession(during.backend.pss_kB, before.backend.pss_kB),
    backend_private_kB_per_session: perSession(during.backend.private_kB, before.backend.private_kB),
    total_pss_kB_per_session: perSession(during.front.pss_kB + during.backend.pss_kB, before.front.pss_kB + before.backend.pss_kB),
    front_pss_kB_per_session_by_process: Object.fromEntries(Object.keys(during.front.pss_kB_by_process).map((r) => [r, perSession(during.front.pss_kB_by_process[r], before.front.pss_kB_by_process[r] ?? 0)])),
    ...(during.front.js_after_gc_kB && before.front.js_after_gc_kB
      ? { front_js_heap_kB_per_session: perSession(during.front.js_after_gc_kB.heapUsed, before.front.js_after_gc_kB.heapUsed), front_js_external_kB_per_session: perSession(during.front.js_after_gc_kB.external, before.front.js_after_gc_kB.external) }
      : {}),
  };
}
results.idle = [];
for (const n of ONLY.has('idle') ? IDLE : []) {
  // the proxy takes at most 1000 connections per worker (src/limits.ts MAX_CONNECTIONS)
  const workers = Math.max(WORKERS, Math.ceil((n * 1.25) / 1000));
  // fresh workers: the FETCH rows above leave tens of MB of garbage in the heaps, whose
  // collection would drown the per-session growth
  await stopServe(serveP);
  serveP = await startServe(workers, { inspect: true });
  await loginRound(P.imap, 8 * workers, 4);
  log(`idle: ${n} sessions through the proxy (${workers} workers)`);
  const proxy = await idleRun(SIDES.proxy, serveP.pid, n, serveP);
  log(`idle: ${n} sessions to Dovecot directly`);
  const direct = await idleRun(SIDES.direct, dovecot.pid, n);
  // TLS sessions are relayed (the proxy holds the TLS state, the backend's pipes): measured beside
  // the handed-off ones, up to 1000 of them (200 with --quick; imaps on both sides), once: Dovecot's
  // imap-login processes keep what the first TLS run made them grow, so a second run's growth
  // over its baseline would understate Dovecot's cost
  if (results.idle.length > 0) {
    results.idle.push({ sessions: n, proxy_workers: workers, proxy, direct });
    continue;
  }
  const nt = Math.min(n, QUICK ? 200 : 1000);
  log(`idle: ${nt} TLS sessions through the proxy, then to Dovecot directly`);
  const proxyTls = await idleRun(SIDES.proxy, serveP.pid, nt, serveP, true);
  const directTls = await idleRun(SIDES.direct, dovecot.pid, nt, null, true);
  results.idle.push({ sessions: n, proxy_workers: workers, proxy, direct, tls: { sessions: nt, proxy: proxyTls, direct: directTls } });
}

// ---------------------------------------------------------------- LMTP: pigeon serve vs Dovecot's lmtp
const MSG4K = (() => {
  const head = `From: bob@remote.test\r\nTo: ${USER}\r\nSubject: bench\r\n\r\n`;
  const line = `${'The quick brown fox jumps over the lazy dog. 0123456789 abcdefghij'}\r\n`;
  let body = '';
  while (head.length + body.length + line.length <= 4096) body += line;
  return head + body + 'x'.repeat(4096 - head.length - body.length - 2) + '\r\n';
})();
function lmtpConn(port, count, rcpt) {
  return lmtpSession(port, { localAddress: srcAddr(3), rcpt, count, message: MSG4K });
}
async function lmtpRound(port, conns, rcpt = USER) {
  const per = Math.ceil(LMTP_MSGS / conns);
  const t0 = process.hrtime.bigint();
  await Promise.all(Array.from({ length: conns }, () => lmtpConn(port, per, rcpt)));
  return { per_second: (per * conns) / (Number(process.hrtime.bigint() - t0) / 1e9) };
}
// connect -> 220 greeting, one connection after another (what every new connection of Postfix's
// lmtp client waits before its first command); QUIT at once
async function lmtpGreetRound(port, n = QUICK ? 10 : 20) {
  const lat = [];
  for (let i = 0; i < n; i++) {
    const t0 = process.hrtime.bigint();
    const c = await open(port, { localAddress: srcAddr(3) });
    await until(c, /^220 [^\r\n]*\r\n/m);
    lat.push(Number(process.hrtime.bigint() - t0) / 1e6);
    c.s.end('QUIT\r\n');
  }
  return { greeting_p50_ms: quantile(lat, 0.5), greeting_max_ms: Math.max(...lat) };
}
if (ONLY.has('lmtp') && !HAVE_LMTP) results.lmtp_skipped = '/usr/lib/dovecot/lmtp missing (Debian package dovecot-lmtpd)';
if (ONLY.has('lmtp') && HAVE_LMTP) {
  // the LMTP rows measure serve as the setup line names it (--workers WORKERS, no inspector): the
  // idle rows above leave a serve with one worker per 1,000 sessions (7 after 5000) and an
  // inspector in each, over which the warm-up below would be spread thin
  if (serveP.workers !== WORKERS || serveP.inspected) {
    await stopServe(serveP);
    serveP = await startServe(WORKERS);
  }
  // warm-up: the first round of each side is the cold figure; then serve's own (WARM_USER)
  results.lmtp_cold = { proxy: await lmtpRound(P.lmtp, 1), direct: await lmtpRound(D.lmtp, 1) };
  for (let done = LMTP_MSGS, i = 1; done < LMTP_WARM; i++) {
    const conns = i % 2 === 1 ? 4 : 1;
    await lmtpRound(P.lmtp, conns, WARM_USER);
    done += Math.ceil(LMTP_MSGS / conns) * conns;
  }
  log(`LMTP 4 KB, 1 connection (${LMTP_MSGS} per round per side)`);
  results.lmtp_c1 = summarise(await rounds((s) => lmtpRound(s.port.lmtp, 1)));
  log('LMTP 4 KB, 4 connections');
  results.lmtp_c4 = summarise(await rounds((s) => lmtpRound(s.port.lmtp, 4)));
  log('LMTP greeting (connect to 220)');
  results.lmtp_greeting = summarise(await rounds((s) => lmtpGreetRound(s.port.lmtp)));
  // the disk's own bound for the durable Maildir protocol (exclusive create, write, fsync, rename
  // into new/, fsync new/), on the file system of both mailboxes, as many rounds: what neither
  // LMTP server can beat per stream (bench-delivery.mjs measures it the same way)
  log('fsync bound, 1 and 4 streams');
  const fdir = join(base, 'fsync-bound');
  for (const d of ['tmp', 'new']) mkdirSync(join(fdir, d), { recursive: true });
  const durable = durableWriter(fdir, Buffer.from(MSG4K, 'latin1'));
  const boundRound = async (streams) => {
    const per = Math.ceil(Math.max(LMTP_MSGS, 200) / streams);
    const t0 = process.hrtime.bigint();
    await Promise.all(Array.from({ length: streams }, async () => {
      for (let i = 0; i < per; i++) await durable();
    }));
    return { per_second: (per * streams) / (Number(process.hrtime.bigint() - t0) / 1e9) };
  };
  results.lmtp_fsync_bound = { c1: [], c4: [] };
  for (let r = 0; r < ROUNDS; r++) {
    results.lmtp_fsync_bound.c1.push(await boundRound(1));
    results.lmtp_fsync_bound.c4.push(await boundRound(4));
  }
  rmSync(fdir, { recursive: true, force: true });
}

// ---------------------------------------------------------------- output
await stopServe(serveP); // gracefully: --cpu-prof (BENCH_SERVE_NODE_OPTIONS) profiles are written at exit
const dovecotWarnings = existsSync(join(dv, 'dovecot.log'))
  ? readFileSync(join(dv, 'dovecot.log'), 'utf8')
      .split('\n')
      .filter((l) => /warning|error|fatal/i.test(l))
      .slice(0, 10)
  : [];
results.reference_log_warnings = dovecotWarnings;
const proxyLog = join(dir, 'pigeon.log');
results.proxy_log_warnings = existsSync(proxyLog)
  ? readFileSync(proxyLog, 'utf8')
      .split('\n')
      .filter((l) => /warn|error/i.test(l))
      .slice(0, 10)
  : [];
if (JSON_OUT) writeFileSync(JSON_OUT, `${JSON.stringify(results, null, 2)}\n`);
const f = (x, d = 1) => (x === null || x === undefined ? '-' : Number(x).toFixed(d));
console.log(`\nProxy vs direct Dovecot (${results.setup.password_scheme}); medians of ${ROUNDS} rounds`);
for (const [name, k] of [
  ['login c=1', 'login_c1'],
  ['login c=32', 'login_c32'],
  ['login imaps c=1', 'login_tls_c1'],
]) {
  const x = results[k];
  if (!x) continue;
  console.log(`  ${name.padEnd(14)} logins/s ${f(x.proxy.per_second)} vs ${f(x.direct.per_second)} (${f(x.ratio.per_second, 2)}x)  p50 ${f(x.proxy.p50_ms)} vs ${f(x.direct.p50_ms)} ms (${f(x.ratio.p50_ms, 2)}x)  p99 ${f(x.proxy.p99_ms)} vs ${f(x.direct.p99_ms)} ms (${f(x.ratio.p99_ms, 2)}x)  split p50: greeting ${f(x.proxy.greeting_p50_ms, 2)} vs ${f(x.direct.greeting_p50_ms, 2)} ms, LOGIN→OK ${f(x.proxy.login_p50_ms, 2)} vs ${f(x.direct.login_p50_ms, 2)} ms`);
}
if (results.login_c1_cold) {
  const x = results.login_c1_cold;
  console.log(`  login cold     first round after start, c=1: p50 ${f(x.proxy.p50_ms)} vs ${f(x.direct.p50_ms)} ms (${f(x.ratio.p50_ms, 2)}x; then ${LOGIN_WARM} logins each side before the rounds above)`);
}
for (const [name, k] of [
  ['FETCH plain', 'fetch_plain'],
  ['FETCH TLS', 'fetch_tls'],
  ['POP3 RETR', 'pop3_retr'],
]) {
  const x = results[k];
  if (!x) continue;
  console.log(`  ${name.padEnd(14)} ${f(x.proxy.MiBps, 0)} vs ${f(x.direct.MiBps, 0)} MiB/s (${f(x.ratio.MiBps, 2)}x)`);
}
for (const [name, k] of [
  ['LMTP 1 conn', 'lmtp_c1'],
  ['LMTP 4 conns', 'lmtp_c4'],
]) {
  const x = results[k];
  if (x) console.log(`  ${name.padEnd(14)} ${f(x.proxy.per_second)} vs ${f(x.direct.per_second)} msg/s (${f(x.ratio.per_second, 2)}x)`);
}
if (results.lmtp_cold) {
  const x = results.lmtp_cold;
  console.log(`  LMTP cold      first round after start, 1 conn: ${f(x.proxy.per_second)} vs ${f(x.direct.per_second)} msg/s (${f(x.proxy.per_second / x.direct.per_second, 2)}x; serve had ≥ ${LMTP_WARM} messages, this round included, before the rounds above)`);
}
if (results.lmtp_greeting) {
  const x = results.lmtp_greeting;
  console.log(`  LMTP greeting  connect to 220 p50 ${f(x.proxy.greeting_p50_ms, 2)} vs ${f(x.direct.greeting_p50_ms, 2)} ms (${f(x.ratio.greeting_p50_ms, 2)}x), worst ${f(x.proxy.greeting_max_ms, 1)} vs ${f(x.direct.greeting_max_ms, 1)} ms (target: no slower than Dovecot's lmtp)`);
}
if (results.lmtp_fsync_bound) {
  const lo = (a) => Math.min(...a.map((x) => x.per_second));
  for (const [c, k] of [[1, 'c1'], [4, 'c4']]) {
    const x = results[`lmtp_${k}`];
    const b = lo(results.lmtp_fsync_bound[k]);
    console.log(`  LMTP ${c} conn${c > 1 ? 's' : ' '}   worst rounds vs the fsync bound (${f(b)} msg/s): pigeon ${f(lo(x.raw.proxy) / b, 2)}x, Dovecot lmtp ${f(lo(x.raw.direct) / b, 2)}x (target for pigeon >= 0.8x)`);
  }
}
for (const i of results.idle) {
  console.log(
    `  idle ${String(i.sessions).padEnd(9)} proxy ${f(i.proxy.front_pss_kB_per_session)} kB/session (${f(i.proxy.front_pss_kB_per_session_from_start)} from start) + backend ${f(i.proxy.backend_pss_kB_per_session)} kB;  Dovecot login/auth/master ${f(i.direct.front_pss_kB_per_session)} kB/session (${f(i.direct.front_pss_kB_per_session_from_start)} from start) + imap ${f(i.direct.backend_pss_kB_per_session)} kB (PSS)${i.proxy.front_js_heap_kB_per_session !== undefined ? `; proxy live JS heap after GC ${f(i.proxy.front_js_heap_kB_per_session)} kB/session, external ${f(i.proxy.front_js_external_kB_per_session)} kB` : ''}`,
  );
  const by = (o) => Object.entries(o ?? {}).map(([r, v]) => `${r} ${f(v)}`).join(', ');
  console.log(`  idle ${String(i.sessions).padEnd(9)} by process, kB/session: proxy ${by(i.proxy.front_pss_kB_per_session_by_process)};  Dovecot ${by(i.direct.front_pss_kB_per_session_by_process)}`);
  if (i.tls) console.log(`  idle ${String(i.tls.sessions).padEnd(4)}TLS proxy ${f(i.tls.proxy.front_pss_kB_per_session)} kB/session (relayed) + backend ${f(i.tls.proxy.backend_pss_kB_per_session)} kB;  Dovecot login/auth/master ${f(i.tls.direct.front_pss_kB_per_session)} kB/session + imap ${f(i.tls.direct.backend_pss_kB_per_session)} kB (PSS)`);
}
process.exit(0);
