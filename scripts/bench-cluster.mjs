#!/usr/bin/env node
/**
 * NAME        scripts/bench-cluster — a mailbox on the node the client reached vs one on another
 *             node, through the peer link, same run
 * SYNOPSIS    node scripts/bench-cluster.mjs [--quick] [--rounds N] [--logins N] [--workers N]
 *                                            [--only login,fetch,pop3] [--json-out FILE]
 *                                            (after npx tsc -p tsconfig.json)
 * DESCRIPTION Starts a throw-away two-node cluster on loopback: node A on 127.0.0.2 (holds the
 *             cluster CA and the SQLite database) and node B on 127.0.0.3 (`pigeon init --ca-from A
 *             --db A/pigeon.db`), each `pigeon serve` with imap, imaps, pop3, peer and metrics listeners.
 *             Two users with the same {SSHA256} password: `local@` lives on A, `remote@` on B (each
 *             allocated lazily by its first login on its own node). The client always talks to
 *             node A, so `remote@` goes A → peer link (mutual TLS 1.3, sealed hand-off) → B's
 *             Dovecot. In rounds that alternate which user goes first (a shared, noisy machine:
 *             medians of rounds, ratios peer/local):
 *               login c=1   `a LOGIN` sent → tagged OK received (p50/p90/p99 over N logins per
 *                           round; connect → greeting → LOGIN → OK → LOGOUT → OK per cycle)
 *               FETCH       `FETCH 1 BODY.PEEK[]` of one 20 MiB message, repeated in one session
 *                           (the first FETCH warms up and is not counted): MiB/s. local: the
 *                           client socket is handed to Dovecot; peer: A relays client ↔ link, B
 *                           relays link ↔ Dovecot. For context, the local mailbox is also fetched
 *                           over imaps (A relays one TLS stream; the peer path relays twice)
 *               POP3 RETR   `RETR 1` of the same message, repeated: MiB/s
 *             FETCH and RETR rows also give the CPU time of each node's `pigeon serve` process
 *             tree (user + system from /proc, with that of reaped children: the Dovecot sessions)
 *             per MiB moved: a figure the machine's other load hardly changes, unlike MiB/s.
 *             The targets of issue 15 are printed beside the ratios.
 *             Afterwards A's metrics listener must show the peer hand-offs (proof that `remote@`
 *             really went through the link). Everything is killed and removed at exit, also on
 *             failure or timeout. Needs root (Dovecot runs as the mail uid) and dovecot-imapd,
 *             dovecot-pop3d.
 * OUTPUT      A human summary on stdout; --json-out FILE writes the results as JSON
 *             (scripts/bench.mjs reads it: keys login, fetch, pop3_retr, each {local, peer, ratio}).
 */
import { spawnSync, spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync, chmodSync, chownSync, readFileSync, existsSync, readdirSync } from 'node:fs';
import { request } from 'node:http';
import { join } from 'node:path';
import { tmpdir, cpus } from 'node:os';
import { option, sleep, tree, cleanupAtExit, failLoudly, stopServe, freePort, quantile, median, r2, open, until, GREETING, fetchRate, retrRate } from './bench-lib.mjs';

const argv = process.argv.slice(2);
const opt = option(argv);
const QUICK = argv.includes('--quick');
const ROUNDS = Number(opt('rounds', QUICK ? 3 : 5));
const WORKERS = Number(opt('workers', 1)); // per node: two nodes share the machine
const LOGINS = Number(opt('logins', QUICK ? 25 : 60)); // per round per user
const FETCH_MB = 20;
const FETCHES = QUICK ? 2 : 4; // per round per user
const JSON_OUT = opt('json-out', null);
const ONLY = new Set(String(opt('only', 'login,fetch,pop3')).split(','));
const ROOT = new URL('..', import.meta.url).pathname;
const CLI = join(ROOT, 'dist/src/cli.js');
const PASS = 'bench-secret';
const USERS = { local: 'local@example.test', peer: 'remote@example.test' };
const HOSTS = { A: '127.0.0.2', B: '127.0.0.3' };
const log = (...a) => console.error('bench-cluster:', ...a);

if (!existsSync(CLI)) {
  console.error(`bench-cluster: ${CLI} missing; build first: npx tsc -p tsconfig.json`);
  process.exit(1);
}
if (process.getuid?.() !== 0) {
  console.error('bench-cluster: needs root (Dovecot runs as the mail uid)');
  process.exit(1);
}
for (const b of ['/usr/lib/dovecot/imap', '/usr/lib/dovecot/pop3']) {
  if (!existsSync(b)) {
    console.error(`bench-cluster: ${b} missing (Debian packages dovecot-imapd, dovecot-pop3d: sh scripts/install-deps.sh)`);
    process.exit(1);
  }
}
const MAIL_UID = (() => {
  const l = readFileSync('/etc/passwd', 'utf8')
    .split('\n')
    .find((x) => x.startsWith('mail:'));
  return l ? Number(l.split(':')[2]) : 8;
})();

// ---------------------------------------------------------------- cleanup, always
const base = mkdtempSync(join(tmpdir(), 'pigeon-bench-cluster-'));
chmodSync(base, 0o755); // Dovecot runs as the mail uid and must reach the mailboxes below it
const roots = []; // serve processes whose whole tree is killed at exit
cleanupAtExit(base, roots);
function logTails() {
  for (const n of Object.keys(HOSTS)) {
    const f = join(base, n, 'pigeon.log');
    try {
      console.error(`--- ${f} (last lines)\n${readFileSync(f, 'utf8').split('\n').slice(-15).join('\n')}`);
    } catch {
      /* none */
    }
  }
}
failLoudly('bench-cluster', logTails, (QUICK ? 150 : 900));

// ---------------------------------------------------------------- helpers
/** greeting, then LOGIN → tagged OK; returns the ms from sending LOGIN to the tagged OK */
async function imapLogin(c, user) {
  await until(c, GREETING);
  const t0 = process.hrtime.bigint();
  c.s.write(`a LOGIN ${user} ${PASS}\r\n`);
  const r = await until(c, /^a (OK|NO|BAD)[^\r\n]*\r\n/m);
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  if (!/^a OK/m.test(r)) throw new Error(`login of ${user} failed: ${r.trim()}`);
  return ms;
}

// ---------------------------------------------------------------- the two nodes
const dirs = { A: join(base, 'A'), B: join(base, 'B') };
const ports = {};
for (const [n, h] of Object.entries(HOSTS)) ports[n] = { imap: await freePort(h), imaps: await freePort(h), pop3: await freePort(h), peer: await freePort(h), metrics: await freePort(h) };
const listen = (n) => Object.entries(ports[n]).flatMap(([proto, p]) => ['--listen', `${proto}=${HOSTS[n]}:${p}`]);
const run = (args, input) => {
  const r = spawnSync(process.execPath, [CLI, ...args], { input, encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`pigeon ${args.join(' ')}: exit ${r.status}: ${r.stderr}`);
  return r.stdout;
};
const pig = (n, args, input) => run(['-c', dirs[n], ...args], input);
run(['init', dirs.A, '--node', 'A', ...listen('A')]);
const DB = join(dirs.A, 'pigeon.db');
run(['init', dirs.B, '--node', 'B', '--ca-from', dirs.A, '--db', DB, ...listen('B')]);
for (const d of Object.values(dirs)) writeFileSync(join(d, 'conf.d', '50-bench.yaml'), 'log:\n  level: warn\n  file: pigeon.log\n');
pig('A', ['domain', 'add', 'example.test']);
// a cheap scheme for both users (as in bench-proxy.mjs): the login path is measured, not the hash
const SCHEME = 'SSHA256';
const pwHash = pig('A', ['pw', '-s', SCHEME], `${PASS}\n`).trim();
writeFileSync(join(base, 'users.passwd'), `${USERS.local}:${pwHash}\n${USERS.peer}:${pwHash}\n`);
pig('A', ['user', 'import', 'passwd-file', join(base, 'users.passwd')]);

async function startServe(n) {
  const nodeArgs = (process.env.BENCH_SERVE_NODE_ARGS ?? '').split(' ').filter(Boolean);
  const p = spawn(process.execPath, [...nodeArgs, CLI, '-c', dirs[n], 'serve', '--workers', String(WORKERS)], { stdio: ['ignore', 'ignore', 'pipe'] });
  roots.push(p);
  await new Promise((res, rej) => {
    let e = '';
    p.stderr.on('data', (d) => {
      e += d;
      if (/ready/.test(e)) res();
    });
    p.on('exit', () => rej(new Error(`pigeon serve (node ${n}) exited: ${e}`)));
  });
  return p;
}
// B first: it registers its peer address before A's registry view is loaded
const serve = { B: await startServe('B') };
serve.A = await startServe('A');

// lazy allocation: each user's first login, on its own node, creates its mailbox there
for (const [n, user] of [
  ['A', USERS.local],
  ['B', USERS.peer],
]) {
  const c = await open(ports[n].imap, { host: HOSTS[n], localAddress: '127.0.0.1', noDelay: true });
  await imapLogin(c, user);
  c.s.write('b LOGOUT\r\n');
  await until(c, /^b OK[^\r\n]*\r\n/m);
  c.s.destroy();
}
const maildirs = {};
for (const [side, user] of Object.entries(USERS)) {
  const u = JSON.parse(pig('A', ['user', 'show', user, '--json']));
  const want = side === 'local' ? 'A' : 'B';
  if (u.home !== want || !u.allocation?.path?.startsWith(dirs[want])) throw new Error(`${user}: expected a mailbox on node ${want}, got home ${u.home} at ${u.allocation?.path}`);
  maildirs[side] = u.allocation.path;
}
{
  const line = `${'x'.repeat(76)}\r\n`;
  const body = line.repeat(Math.ceil((FETCH_MB * 1024 * 1024) / line.length));
  for (const [side, md] of Object.entries(maildirs)) {
    const f = join(md, 'cur', '1700000000.M1P1.bench:2,S');
    writeFileSync(f, `From: a@example.test\r\nTo: ${USERS[side]}\r\nSubject: big\r\n\r\n${body}`);
    chownSync(f, MAIL_UID, MAIL_UID);
  }
}
// A's registry view must know B's peer address (refreshed every second): the peer user's first
// login through A may need a moment
for (let i = 0; ; i++) {
  try {
    const c = await open(ports.A.imap, { host: HOSTS.A, localAddress: '127.0.0.1', noDelay: true });
    await imapLogin(c, USERS.peer);
    c.s.destroy();
    break;
  } catch (e) {
    if (i > 50) throw new Error(`login of ${USERS.peer} through node A never worked: ${e.message}`);
    await sleep(200);
  }
}

// alternate which user goes first, round by round
async function rounds(fn) {
  const out = { local: [], peer: [] };
  for (let r = 0; r < ROUNDS; r++) {
    const order = r % 2 === 0 ? ['local', 'peer'] : ['peer', 'local'];
    for (const side of order) out[side].push(await fn(USERS[side], side));
  }
  return out;
}
function summarise(per) {
  const out = { rounds: per.local.length };
  for (const side of ['local', 'peer']) {
    out[side] = {};
    for (const k of Object.keys(per[side][0])) if (typeof per[side][0][k] === 'number') out[side][k] = r2(median(per[side].map((x) => x[k])));
  }
  out.ratio = {};
  for (const k of Object.keys(out.local)) if (k !== 'n' && out.local[k]) out.ratio[k] = r2(out.peer[k] / out.local[k]);
  out.raw = per;
  return out;
}

// ---------------------------------------------------------------- login
async function loginCycle(user) {
  const t0 = process.hrtime.bigint();
  const c = await open(ports.A.imap, { host: HOSTS.A, localAddress: '127.0.0.1', noDelay: true });
  const loginMs = await imapLogin(c, user);
  const connectToReady = Number(process.hrtime.bigint() - t0) / 1e6;
  c.s.write('b LOGOUT\r\n');
  await until(c, /^b OK[^\r\n]*\r\n/m);
  c.s.destroy();
  return { loginMs, connectToReady };
}
async function loginRound(user) {
  const lat = [];
  const full = [];
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < LOGINS; i++) {
    const r = await loginCycle(user);
    lat.push(r.loginMs);
    full.push(r.connectToReady);
  }
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  return { p50_ms: quantile(lat, 0.5), p90_ms: quantile(lat, 0.9), p99_ms: quantile(lat, 0.99), connect_to_ready_p50_ms: quantile(full, 0.5), cycles_per_second: LOGINS / secs, n: LOGINS };
}

// ---------------------------------------------------------------- CPU per MiB (load-independent)
// CPU time (user + system, with that of reaped children: the Dovecot sessions) of each node's
// `pigeon serve` process tree, from /proc: what a relayed MiB costs, whatever else the machine runs
const TICK_MS = 1000 / Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout.trim() || 100);
function treeCpuMs(root) {
  const kids = new Map();
  const own = new Map();
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    let st;
    try {
      st = readFileSync(`/proc/${d}/stat`, 'utf8');
    } catch {
      continue; // gone meanwhile
    }
    const f = st.slice(st.lastIndexOf(')') + 2).split(' '); // fields from 3 (state) on
    const ppid = Number(f[1]);
    if (!kids.has(ppid)) kids.set(ppid, []);
    kids.get(ppid).push(Number(d));
    own.set(Number(d), (Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14])) * TICK_MS); // utime stime cutime cstime
  }
  let ms = 0;
  const todo = [root];
  while (todo.length > 0) {
    const p = todo.pop();
    ms += own.get(p) ?? 0;
    todo.push(...(kids.get(p) ?? []));
  }
  return ms;
}
/** Run `fn` (which moves `mib` MiB), adding the CPU ms per MiB of node A's and B's trees to its result. */
async function withCpu(mib, fn) {
  const before = { A: treeCpuMs(serve.A.pid), B: treeCpuMs(serve.B.pid) };
  const r = await fn();
  const a = (treeCpuMs(serve.A.pid) - before.A) / mib;
  const b = (treeCpuMs(serve.B.pid) - before.B) / mib;
  return { ...r, cpu_ms_per_MiB_A: a, cpu_ms_per_MiB_B: b, cpu_ms_per_MiB: a + b };
}

// ---------------------------------------------------------------- large FETCH, POP3 RETR
async function fetchRound(user, { tls = false } = {}) {
  const c = await open(tls ? ports.A.imaps : ports.A.imap, { host: HOSTS.A, localAddress: '127.0.0.1', noDelay: true, tls });
  await imapLogin(c, user);
  c.s.write('b SELECT INBOX\r\n');
  await until(c, /^b OK[^\r\n]*\r\n/m);
  const r = await withCpu((FETCHES + 1) * FETCH_MB, async () => ({ MiBps: await fetchRate(c, FETCHES, FETCH_MB * 1048576) }));
  c.s.destroy();
  return r;
}
async function retrRound(user) {
  const c = await open(ports.A.pop3, { host: HOSTS.A, localAddress: '127.0.0.1', noDelay: true });
  const r = await withCpu((FETCHES + 1) * FETCH_MB, async () => ({ MiBps: await retrRate(c, user, PASS, FETCHES, FETCH_MB * 1048576) }));
  c.s.destroy();
  return r;
}

function metrics(n) {
  return new Promise((res, rej) => {
    const q = request({ host: HOSTS[n], port: ports[n].metrics, path: '/metrics' }, (r) => {
      let b = '';
      r.on('data', (d) => (b += d));
      r.on('end', () => res(b));
    });
    q.on('error', rej);
    q.end();
  });
}
function counter(text, name, labels) {
  let sum = 0;
  for (const l of text.split('\n')) {
    if (!l.startsWith(`${name}{`)) continue;
    if (Object.entries(labels).every(([k, v]) => l.includes(`${k}="${v}"`))) sum += Number(l.split(' ').pop());
  }
  return sum;
}

const results = {
  machine: { cpus: cpus().length, cpu: cpus()[0]?.model, node: process.version, dovecot: spawnSync('/usr/sbin/dovecot', ['--version'], { encoding: 'utf8' }).stdout?.trim() ?? '' },
  setup: {
    nodes: `A on ${HOSTS.A}, B on ${HOSTS.B}: pigeon serve --workers ${WORKERS} each, one shared SQLite database (A's), peer links mutual TLS 1.3`,
    client: `always connects to node A (plain IMAP/POP3 on loopback); ${USERS.local} lives on A (session handed to A's Dovecot), ${USERS.peer} on B (A relays over the peer link, B relays to its Dovecot)`,
    password_scheme: `{${SCHEME}} for both users`,
    rounds: ROUNDS,
    logins_per_round: LOGINS,
    fetches_per_round: FETCHES,
    message_MiB: FETCH_MB,
    quick: QUICK,
  },
};

// warm up (JIT, page cache, the link's TLS session code)
for (const side of ['local', 'peer']) for (let i = 0; i < 10; i++) await loginCycle(USERS[side]);

if (ONLY.has('login')) {
  log(`login c=1 (${LOGINS} per round per user, ${ROUNDS} rounds)`);
  results.login = summarise(await rounds((u) => loginRound(u)));
}
if (ONLY.has('fetch')) {
  log(`FETCH ${FETCH_MB} MiB plain`);
  results.fetch = summarise(await rounds((u) => fetchRound(u)));
  // context: the same FETCH of the local mailbox over imaps, where node A relays one TLS stream
  // (the peer path relays twice and encrypts the A → B hop)
  log(`FETCH ${FETCH_MB} MiB TLS, local mailbox (context)`);
  const tls = [];
  const tlsCpu = [];
  for (let r = 0; r < ROUNDS; r++) {
    const x = await fetchRound(USERS.local, { tls: true });
    tls.push(x.MiBps);
    tlsCpu.push(x.cpu_ms_per_MiB);
  }
  results.fetch_tls_local = { MiBps: r2(median(tls)), raw: tls, peer_ratio: r2(results.fetch.peer.MiBps / median(tls)), cpu_ms_per_MiB: r2(median(tlsCpu)) };
}
if (ONLY.has('pop3')) {
  log(`POP3 RETR ${FETCH_MB} MiB plain`);
  results.pop3_retr = summarise(await rounds((u) => retrRound(u)));
}

// ---------------------------------------------------------------- proof: the peer user went through the link
const mA = await metrics('A');
const mB = await metrics('B');
results.peer_handoffs = {
  A_sent_imap_ok: counter(mA, 'pigeon_peer_handoffs_sent_total', { kind: 'imap', result: 'ok' }),
  A_sent_pop3_ok: counter(mA, 'pigeon_peer_handoffs_sent_total', { kind: 'pop3', result: 'ok' }),
  B_received_imap: counter(mB, 'pigeon_peer_handoffs_received_total', { kind: 'imap', result: 'accepted' }),
  B_received_pop3: counter(mB, 'pigeon_peer_handoffs_received_total', { kind: 'pop3', result: 'accepted' }),
  A_refused_or_failed: counter(mA, 'pigeon_peer_handoffs_sent_total', { result: 'refused' }) + counter(mA, 'pigeon_peer_handoffs_sent_total', { result: 'no-answer' }),
  // context: how A had the link of each hand-off (a spare from the pool, or dialed while the session waited)
  A_links_pooled: counter(mA, 'pigeon_peer_links_opened_total', { how: 'pooled' }),
  A_links_dialed: counter(mA, 'pigeon_peer_links_opened_total', { how: 'dialed' }),
};
{
  // every peer-user session after the allocation login went over the link
  const expectImap = 10 + 1 + (ONLY.has('login') ? ROUNDS * LOGINS : 0) + (ONLY.has('fetch') ? ROUNDS : 0);
  const h = results.peer_handoffs;
  if (WORKERS === 1 && (h.A_sent_imap_ok < expectImap || h.B_received_imap < expectImap)) {
    throw new Error(`peer hand-offs: expected at least ${expectImap} IMAP hand-offs A → B, metrics say sent ${h.A_sent_imap_ok}, received ${h.B_received_imap}`);
  }
}
// gracefully: --cpu-prof (BENCH_SERVE_NODE_ARGS) profiles are written at exit
await Promise.all(Object.values(serve).map(stopServe));
const logWarnings = {};
for (const n of Object.keys(HOSTS)) {
  const f = join(dirs[n], 'pigeon.log');
  logWarnings[n] = existsSync(f)
    ? readFileSync(f, 'utf8')
        .split('\n')
        .filter((l) => /warn|error/i.test(l))
        .slice(0, 10)
    : [];
}
results.log_warnings = logWarnings;

if (JSON_OUT) writeFileSync(JSON_OUT, `${JSON.stringify(results, null, 2)}\n`);
const f = (x, d = 1) => (x === null || x === undefined ? '-' : Number(x).toFixed(d));
console.log(`\nCluster: mailbox on node A (local) vs on node B through the peer link (peer); client at node A; medians of ${ROUNDS} rounds`);
if (results.login) {
  const x = results.login;
  console.log(`  login c=1       LOGIN→OK p50 ${f(x.local.p50_ms, 2)} vs ${f(x.peer.p50_ms, 2)} ms (${f(x.ratio.p50_ms, 2)}x; target ≤ 1.5x)  p90 ${f(x.local.p90_ms, 2)} vs ${f(x.peer.p90_ms, 2)} ms (${f(x.ratio.p90_ms, 2)}x)  p99 ${f(x.local.p99_ms, 2)} vs ${f(x.peer.p99_ms, 2)} ms`);
}
for (const [name, k, target] of [
  ['FETCH 20 MiB', 'fetch', ''],
  ['POP3 RETR 20 MiB', 'pop3_retr', '; target ≥ 0.6x'],
]) {
  const x = results[k];
  if (!x) continue;
  console.log(`  ${name.padEnd(16)} ${f(x.local.MiBps, 0)} vs ${f(x.peer.MiBps, 0)} MiB/s (${f(x.ratio.MiBps, 2)}x${target})`);
  console.log(`  ${''.padEnd(16)} CPU of both nodes' serve trees (Dovecot included) per MiB: ${f(x.local.cpu_ms_per_MiB, 2)} vs ${f(x.peer.cpu_ms_per_MiB, 2)} ms (A ${f(x.peer.cpu_ms_per_MiB_A, 2)} + B ${f(x.peer.cpu_ms_per_MiB_B, 2)}), ${f(x.ratio.cpu_ms_per_MiB, 2)}x`);
}
if (results.fetch_tls_local) console.log(`  FETCH 20 MiB, local mailbox over imaps (one TLS relay on A): ${f(results.fetch_tls_local.MiBps, 0)} MiB/s, CPU ${f(results.fetch_tls_local.cpu_ms_per_MiB, 2)} ms/MiB; peer / that = ${f(results.fetch_tls_local.peer_ratio, 2)}x (target ≥ 0.9x)`);
console.log(`  peer hand-offs (metrics): A sent imap ${results.peer_handoffs.A_sent_imap_ok}, pop3 ${results.peer_handoffs.A_sent_pop3_ok}; B accepted imap ${results.peer_handoffs.B_received_imap}, pop3 ${results.peer_handoffs.B_received_pop3}; A's links: ${results.peer_handoffs.A_links_pooled} spares from the pool, ${results.peer_handoffs.A_links_dialed} dialed while the session waited`);
process.exit(0);
