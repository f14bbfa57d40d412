#!/usr/bin/env node
/**
 * NAME        scripts/bench-pg-store — the PostgreSQL store's login read, on a warm pool
 * SYNOPSIS    node scripts/bench-pg-store.mjs [--users N] [--seconds S] [--pool N]   (after npm run build)
 * DESCRIPTION Starts a private PostgreSQL server (initdb + pg_ctl as the `postgres` user, unix socket
 *             and a loopback port, fsync off like the tests' servers), fills it through the store
 *             (N users in 20 domains, settings rows at every scope), then times `store.lookup` —
 *             the one statement per login or delivery — over TCP on 127.0.0.1:
 *               c=1   one lookup in flight at a time (latency of a round trip on a warm connection)
 *               c=8   eight in flight at once (pipelined on the pool)
 *             each for S seconds after a warm-up. Prints p50/p90/p99 (microseconds) and lookups/s
 *             per row as one JSON line on stdout and a human table on stderr. Stops and removes
 *             the server at the end. A benchmark, not a test: it asserts nothing.
 * SEE ALSO    src/store/postgres.ts, scripts/bench-config.mjs (the same read on SQLite)
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, chownSync, readdirSync, existsSync, readFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const arg = (name, def) => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : def;
};
const USERS = arg('users', 2000);
const SECONDS = arg('seconds', 5);
const POOL = arg('pool', 4);
const DOMAINS = 20;

let mods;
try {
  mods = { pg: await import('../dist/src/store/postgres.js') };
} catch (e) {
  console.error(`bench-pg-store: cannot load dist/ (${e.code ?? e.message}); build first: npm run build`);
  process.exit(1);
}

const base = '/usr/lib/postgresql';
const version = existsSync(base) ? readdirSync(base).filter((v) => /^\d+$/.test(v)).sort((a, b) => b - a).find((v) => existsSync(join(base, v, 'bin', 'initdb'))) : undefined;
if (!version) {
  console.error('bench-pg-store: PostgreSQL is missing: apt-get install postgresql (or scripts/install-deps.sh)');
  process.exit(69);
}
const bin = join(base, version, 'bin');
const pw = readFileSync('/etc/passwd', 'utf8').split('\n').map((l) => l.split(':')).find((f) => f[0] === 'postgres');
const ids = { uid: Number(pw[2]), gid: Number(pw[3]) };
const as = (cmd, args) => {
  const r = spawnSync(join(bin, cmd), args, { ...ids, encoding: 'utf8', cwd: '/', timeout: 120_000 });
  if (r.status !== 0) throw new Error(`${cmd} failed: ${r.stdout}${r.stderr}`);
  return r.stdout;
};
const port = await new Promise((res) => {
  const s = createServer().listen(0, '127.0.0.1', () => {
    const p = s.address().port;
    s.close(() => res(p));
  });
});

const root = mkdtempSync(join(tmpdir(), 'pigeon-bench-pg-'));
chownSync(root, ids.uid, ids.gid);
const data = join(root, 'data');
let started = false;
try {
  as('initdb', ['-D', data, '-A', 'trust', '-U', 'pigeon', '--no-sync', '-E', 'UTF8', '--locale=C']);
  as('pg_ctl', ['-D', data, '-l', join(root, 'log'), '-w', '-o', `-k ${root} -p ${port} -c listen_addresses=127.0.0.1 -c fsync=off`, 'start']);
  started = true;
  as('psql', ['-h', root, '-p', String(port), '-U', 'pigeon', '-d', 'postgres', '-c', 'CREATE DATABASE pigeon']);
  const url = `postgres://pigeon@127.0.0.1:${port}/pigeon?sslmode=disable`;
  const store = await mods.pg.openPostgresStore(url, { poolMax: POOL });
  await store.migrate();
  await store.setSetting({ scope: 'global', name: null }, 'mailstore', 'format', 'maildir', []);
  await store.setSetting({ scope: 'global', name: null }, 'imap', 'backend', 'dovecot', []);
  const addresses = [];
  for (let d = 0; d < DOMAINS; d++) {
    const domain = `d${d}.bench.test`;
    await store.addDomain(domain);
    await store.setSetting({ scope: 'domain', name: domain }, 'vacation', 'enabled', false, []);
    const entries = [];
    for (let u = 0; u < Math.ceil(USERS / DOMAINS); u++) entries.push({ address: `u${u}@${domain}`, hash: '{PLAIN}x' });
    await store.importUsers(entries, false);
    for (const e of entries) addresses.push(e.address);
  }
  for (let i = 0; i < addresses.length; i += 10) await store.setSetting({ scope: 'user', name: addresses[i] }, 'forward', 'to', ['x@y.test'], []);

  const pct = (xs, p) => xs[Math.min(xs.length - 1, Math.floor((p / 100) * xs.length))];
  async function run(concurrency) {
    let n = 0;
    const warmEnd = Date.now() + 1000;
    const lat = [];
    const worker = async (end, record) => {
      while (Date.now() < end) {
        const a = addresses[n++ % addresses.length];
        const t0 = process.hrtime.bigint();
        const r = await store.lookup(a);
        if (record) lat.push(Number(process.hrtime.bigint() - t0) / 1000);
        if (!r) throw new Error(`no user ${a}`);
      }
    };
    await Promise.all(Array.from({ length: concurrency }, () => worker(warmEnd, false)));
    const t0 = Date.now();
    const end = t0 + SECONDS * 1000;
    await Promise.all(Array.from({ length: concurrency }, () => worker(end, true)));
    const secs = (Date.now() - t0) / 1000;
    lat.sort((x, y) => x - y);
    return { concurrency, lookups: lat.length, per_s: Math.round(lat.length / secs), p50_us: Math.round(pct(lat, 50)), p90_us: Math.round(pct(lat, 90)), p99_us: Math.round(pct(lat, 99)) };
  }
  const rows = [await run(1), await run(8)];
  await store.close();
  const result = { bench: 'pg-store-lookup', postgres: version, users: addresses.length, pool_max: POOL, seconds: SECONDS, rows };
  console.log(JSON.stringify(result));
  console.error(`lookup on PostgreSQL ${version}, ${addresses.length} users, pool ${POOL}, TCP 127.0.0.1:`);
  for (const r of rows) console.error(`  c=${r.concurrency}: p50 ${r.p50_us} µs, p90 ${r.p90_us} µs, p99 ${r.p99_us} µs, ${r.per_s} lookups/s`);
} finally {
  if (started) spawnSync(join(bin, 'pg_ctl'), ['-D', data, '-m', 'immediate', '-w', 'stop'], { ...ids, cwd: '/' });
  rmSync(root, { recursive: true, force: true });
}
