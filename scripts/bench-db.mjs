#!/usr/bin/env node
/**
 * NAME        scripts/bench-db — the same workloads on PostgreSQL and on SQLite, same run
 * SYNOPSIS    node scripts/bench-db.mjs [--quick] [--rounds N] [--logins N] [--lmtp N] [--workers N]
 *                                       [--only login,lmtp,race] [--json-out FILE]
 *                                       (after npx tsc -p tsconfig.json)
 * DESCRIPTION Two throw-away clusters of two nodes each, A and B (`pigeon init --ca-from A`), one
 *             on a SQLite file (A's), one on a private PostgreSQL server (initdb + pg_ctl as the
 *             `postgres` user into a temporary directory, TCP on 127.0.0.1, fsync on: as a real
 *             server; the nodes reach it with a URL and `database_pool_size` 4), every node a
 *             `pigeon serve --workers N` (default 1) on 127.0.0.2 (A) / 127.0.0.3 (B). In rounds
 *             that alternate which database goes first (medians of rounds, ratio = PostgreSQL /
 *             SQLite):
 *               login c=32  connect → greeting → `a LOGIN` → OK → LOGOUT at A by 32 clients at
 *                           once (from distinct 127.x source addresses), a user homed on A
 *                           with a {SSHA256} password: logins/s and p50 (connect to OK)
 *               LMTP        4 KB messages to that user at A, MAIL/RCPT/DATA pipelined, 1 and 4
 *                           connections: messages/s
 *               race        30 first deliveries at once for a new user (mailstore.creator cas),
 *                           split between A and B: time until all 30 got 250, then checked to be
 *                           in one mailbox
 *             Everything is killed and removed at exit, also on failure. BENCH_DB_LOG=debug sets the
 *             nodes' log level (the race prints the user's log lines when it fails).
 * OUTPUT      A human summary on stderr; --json-out FILE (scripts/bench.mjs reads it): keys
 *             login_c32, lmtp_c1, lmtp_c4, race30, each {sqlite, postgres, ratio}.
 */
import { spawnSync, spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync, chmodSync, chownSync, readFileSync, existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { tmpdir } from 'node:os';
import { option, cleanupAtExit, failLoudly, freePort, quantile, median, r2, open, until, GREETING, lmtpSession } from './bench-lib.mjs';

const argv = process.argv.slice(2);
const opt = option(argv);
const QUICK = argv.includes('--quick');
const ROUNDS = Number(opt('rounds', QUICK ? 2 : 5));
const LOGINS = Number(opt('logins', QUICK ? 160 : 640)); // per round per database
const LMTP_MSGS = Number(opt('lmtp', QUICK ? 40 : 160));
const WORKERS = Number(opt('workers', 1));
const JSON_OUT = opt('json-out', null);
const ONLY = new Set(String(opt('only', 'login,lmtp,race')).split(','));
const ROOT = new URL('..', import.meta.url).pathname;
const CLI = join(ROOT, 'dist/src/cli.js');
const PASS = 'bench-secret';
const USER = 'local@example.test';
const log = (...a) => console.error('bench-db:', ...a);
const LIMIT_S = QUICK ? 240 : 900;

if (!existsSync(CLI)) {
  console.error(`bench-db: ${CLI} missing; build first: npx tsc -p tsconfig.json`);
  process.exit(1);
}
if (process.getuid?.() !== 0 || !existsSync('/usr/lib/dovecot/imap')) {
  console.error('bench-db: needs root and dovecot-imapd (sh scripts/install-deps.sh)');
  process.exit(1);
}
const pgBase = '/usr/lib/postgresql';
const pgVersion = existsSync(pgBase) ? readdirSync(pgBase).filter((v) => /^\d+$/.test(v)).sort((a, b) => b - a).find((v) => existsSync(join(pgBase, v, 'bin', 'initdb'))) : undefined;
if (!pgVersion) {
  console.error('bench-db: PostgreSQL is missing: apt-get install postgresql (or scripts/install-deps.sh)');
  process.exit(69);
}

const base = mkdtempSync(join(tmpdir(), 'pigeon-bench-db-'));
chmodSync(base, 0o755); // Dovecot runs as the mail uid and must reach the mailboxes below it
const roots = [];
const pgStops = [];
cleanupAtExit(base, roots);
process.on('exit', () => {
  for (const s of pgStops) s();
});
failLoudly(
  'bench-db',
  () => {
    for (const k of ['sqlite', 'postgres'])
      for (const n of ['A', 'B']) {
        try {
          console.error(`--- ${k}/${n}/pigeon.log\n${readFileSync(join(base, k, n, 'pigeon.log'), 'utf8').split('\n').slice(-10).join('\n')}`);
        } catch {
          /* none */
        }
      }
  },
  LIMIT_S,
);

// ---------------------------------------------------------------- the PostgreSQL server
const pgBin = join(pgBase, pgVersion, 'bin');
const pwent = readFileSync('/etc/passwd', 'utf8')
  .split('\n')
  .map((l) => l.split(':'))
  .find((f) => f[0] === 'postgres');
const ids = { uid: Number(pwent[2]), gid: Number(pwent[3]) };
const asPg = (cmd, args) => {
  const r = spawnSync(join(pgBin, cmd), args, { ...ids, encoding: 'utf8', cwd: '/', timeout: 120_000 });
  if (r.status !== 0) throw new Error(`${cmd} failed: ${r.stdout}${r.stderr}`);
  return r.stdout;
};
const pgRoot = join(base, 'pg');
spawnSync('mkdir', [pgRoot]);
chownSync(pgRoot, ids.uid, ids.gid);
const pgPort = await freePort();
asPg('initdb', ['-D', join(pgRoot, 'data'), '-A', 'trust', '-U', 'pigeon', '-E', 'UTF8', '--locale=C']);
asPg('pg_ctl', ['-D', join(pgRoot, 'data'), '-l', join(pgRoot, 'log'), '-w', '-o', `-k ${pgRoot} -p ${pgPort} -c listen_addresses=127.0.0.1 -c max_connections=200`, 'start']);
pgStops.push(() => spawnSync(join(pgBin, 'pg_ctl'), ['-D', join(pgRoot, 'data'), '-m', 'immediate', '-w', 'stop'], { ...ids, cwd: '/' }));
asPg('psql', ['-h', pgRoot, '-p', String(pgPort), '-U', 'pigeon', '-d', 'postgres', '-c', 'CREATE DATABASE pigeon']);
const PG_URL = `postgres://pigeon@127.0.0.1:${pgPort}/pigeon?sslmode=disable`;

// ---------------------------------------------------------------- two clusters
const run = (args, input) => {
  const r = spawnSync(process.execPath, [CLI, ...args], { input, encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`pigeon ${args.join(' ')}: exit ${r.status}: ${r.stderr}`);
  return r.stdout;
};
const HOSTS = { A: '127.0.0.2', B: '127.0.0.3' };

async function startServe(dir) {
  const p = spawn(process.execPath, [CLI, '-c', dir, 'serve', '--workers', String(WORKERS)], { stdio: ['ignore', 'ignore', 'pipe'] });
  roots.push(p);
  await new Promise((res, rej) => {
    let e = '';
    p.stderr.on('data', (d) => {
      e += d;
      if (/ready/.test(e)) res();
    });
    p.on('exit', () => rej(new Error(`pigeon serve ${dir} exited: ${e}`)));
  });
  return p;
}

async function cluster(kind) {
  const dirs = { A: join(base, kind, 'A'), B: join(base, kind, 'B') };
  spawnSync('mkdir', ['-p', join(base, kind)]);
  const ports = {};
  for (const [n, h] of Object.entries(HOSTS)) ports[n] = { imap: await freePort(h), lmtp: await freePort(h), peer: await freePort(h) };
  const listen = (n) => Object.entries(ports[n]).flatMap(([proto, p]) => ['--listen', `${proto}=${HOSTS[n]}:${p}`]);
  run(['init', dirs.A, '--node', 'A', ...listen('A'), ...(kind === 'postgres' ? ['--db', PG_URL] : [])]);
  run(['init', dirs.B, '--node', 'B', '--ca-from', dirs.A, '--db', kind === 'postgres' ? PG_URL : join(dirs.A, 'pigeon.db'), ...listen('B')]);
  for (const d of Object.values(dirs)) writeFileSync(join(d, 'conf.d', '50-bench.yaml'), `log:\n  level: ${process.env.BENCH_DB_LOG ?? 'warn'}\n  file: pigeon.log\n`);
  const pig = (args, input) => run(['-c', dirs.A, ...args], input);
  pig(['domain', 'add', 'example.test']);
  const hash = pig(['pw', '-s', 'SSHA256'], `${PASS}\n`).trim();
  writeFileSync(join(base, kind, 'users.passwd'), `${USER}:${hash}\n`);
  pig(['user', 'import', 'passwd-file', join(base, kind, 'users.passwd')]);
  pig(['config', 'set', '--domain', 'example.test', 'mailstore.creator', 'cas']);
  await startServe(dirs.B);
  await startServe(dirs.A);
  return { kind, dirs, ports, pig };
}

// ---------------------------------------------------------------- workloads
const srcAddr = (i) => `127.${1 + Math.floor(i / 62500)}.${Math.floor(i / 250) % 250}.${1 + (i % 250)}`;

async function loginCycle(c0, w) {
  const t0 = process.hrtime.bigint();
  const c = await open(c0.ports.A.imap, { host: HOSTS.A, localAddress: srcAddr(w) });
  await until(c, GREETING);
  c.s.write(`a LOGIN ${USER} ${PASS}\r\n`);
  const r = await until(c, /^a (OK|NO|BAD)[^\r\n]*\r\n/m);
  if (!/^a OK/m.test(r)) throw new Error(`login failed (${c0.kind}): ${r.trim()}`);
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  c.s.write('b LOGOUT\r\n');
  await until(c, /^b OK[^\r\n]*\r\n/m);
  c.s.destroy();
  return ms;
}
async function loginRound(c, n, conc) {
  const lat = [];
  let next = 0;
  const t0 = process.hrtime.bigint();
  await Promise.all(
    Array.from({ length: conc }, async (_, w) => {
      while (next < n) {
        next++;
        lat.push(await loginCycle(c, w));
      }
    }),
  );
  return { per_second: n / (Number(process.hrtime.bigint() - t0) / 1e9), p50_ms: quantile(lat, 0.5), p99_ms: quantile(lat, 0.99) };
}

const MSG4K = (() => {
  const head = `From: bob@remote.test\r\nTo: ${USER}\r\nSubject: bench\r\n\r\n`;
  const line = 'The quick brown fox jumps over the lazy dog. 0123456789 abcdefghij\r\n';
  let body = '';
  while (head.length + body.length + line.length <= 4096) body += line;
  return head + body + 'x'.repeat(4096 - head.length - body.length - 2) + '\r\n';
})();
function lmtpConn(port, host, rcpt, count, w) {
  return lmtpSession(port, { host, localAddress: srcAddr(100 + w), rcpt, count, message: MSG4K });
}
async function lmtpRound(c, conns) {
  const per = Math.ceil(LMTP_MSGS / conns);
  const t0 = process.hrtime.bigint();
  await Promise.all(Array.from({ length: conns }, (_, w) => lmtpConn(c.ports.A.lmtp, HOSTS.A, USER, per, w)));
  return { per_second: (per * conns) / (Number(process.hrtime.bigint() - t0) / 1e9) };
}
let raceN = 0;
async function raceRound(c) {
  const user = `race${raceN++}@example.test`;
  c.pig(['user', 'add', user, '--password-stdin'], `${PASS}\n`);
  const t0 = process.hrtime.bigint();
  await Promise.all(Array.from({ length: 30 }, (_, i) => (i % 2 === 0 ? 'A' : 'B')).map((n, i) => lmtpConn(c.ports[n].lmtp, HOSTS[n], user, 1, i)));
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  const local = user.split('@')[0];
  const counts = ['A', 'B'].map((n) => {
    const d = join(c.dirs[n], 'mail', 'example.test', local, 'new');
    return existsSync(d) ? readdirSync(d).length : 0;
  });
  if (counts.filter((x) => x > 0).length !== 1 || counts[0] + counts[1] !== 30) {
    const logs = ['A', 'B'].map((n) => `--- ${n}\n${readFileSync(join(c.dirs[n], 'pigeon.log'), 'utf8').split('\n').filter((l) => l.includes(local)).join('\n')}`).join('\n');
    throw new Error(`race (${c.kind}): per node ${counts.join('/')}, expected all 30 in one mailbox; ${c.pig(['user', 'show', user, '--json'])}\n${logs}`);
  }
  return { ms };
}

// ---------------------------------------------------------------- rounds
const clusters = { sqlite: await cluster('sqlite'), postgres: await cluster('postgres') };
for (const c of Object.values(clusters)) await loginRound(c, 64, 8); // warm-up: JIT, allocation, pools

async function rounds(fn) {
  const out = { sqlite: [], postgres: [] };
  for (let r = 0; r < ROUNDS; r++) for (const k of r % 2 === 0 ? ['sqlite', 'postgres'] : ['postgres', 'sqlite']) out[k].push(await fn(clusters[k]));
  const sum = { rounds: ROUNDS };
  for (const k of ['sqlite', 'postgres']) {
    sum[k] = {};
    for (const f of Object.keys(out[k][0])) sum[k][f] = r2(median(out[k].map((x) => x[f])));
  }
  sum.ratio = {};
  for (const f of Object.keys(sum.sqlite)) if (sum.sqlite[f]) sum.ratio[f] = r2(sum.postgres[f] / sum.sqlite[f]);
  sum.raw = out;
  return sum;
}

const results = {
  setup: {
    postgres: `PostgreSQL ${pgVersion} (private server, TCP 127.0.0.1, fsync on), database_pool_size 4`,
    sqlite: 'node A\'s pigeon.db, shared by B',
    nodes: `two nodes per database, pigeon serve --workers ${WORKERS} each`,
    rounds: ROUNDS,
    quick: QUICK,
  },
};
if (ONLY.has('login')) {
  log(`login c=32 (${LOGINS} per round per database, ${ROUNDS} rounds)`);
  results.login_c32 = await rounds((c) => loginRound(c, LOGINS, 32));
}
if (ONLY.has('lmtp')) {
  log(`LMTP 4 KB, 1 connection (${LMTP_MSGS} per round)`);
  results.lmtp_c1 = await rounds((c) => lmtpRound(c, 1));
  log('LMTP 4 KB, 4 connections');
  results.lmtp_c4 = await rounds((c) => lmtpRound(c, 4));
}
if (ONLY.has('race')) {
  log('30 first deliveries at once for a new user, across A and B');
  results.race30 = await rounds((c) => raceRound(c));
}

const line = (name, k, f, unit) => !results[k] ? `  ${name}: not run` : `  ${name.padEnd(30)} SQLite ${String(results[k].sqlite[f]).padStart(8)} ${unit}   PostgreSQL ${String(results[k].postgres[f]).padStart(8)} ${unit}   ratio ${results[k].ratio[f]}`;
console.error(
  [
    `bench-db: medians of ${ROUNDS} rounds`,
    line('login c=32 logins/s', 'login_c32', 'per_second', '/s'),
    line('login c=32 p50', 'login_c32', 'p50_ms', 'ms'),
    line('LMTP 1 conn', 'lmtp_c1', 'per_second', 'msg/s'),
    line('LMTP 4 conns', 'lmtp_c4', 'per_second', 'msg/s'),
    line('30-way allocation race', 'race30', 'ms', 'ms'),
  ].join('\n'),
);
if (JSON_OUT) writeFileSync(JSON_OUT, `${JSON.stringify(results, null, 2)}\n`);
process.exit(0);
