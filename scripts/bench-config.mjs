#!/usr/bin/env node
/**
 * NAME        scripts/bench-config — cost of one effective-config read
 * SYNOPSIS    node scripts/bench-config.mjs [--iterations N] [--users N]   (after npx tsc -p tsconfig.json)
 * DESCRIPTION Builds a throw-away instance (pigeon init) with a few hundred users in 20 domains and a
 *             realistic number of settings rows at each scope, then times what a login or a delivery
 *             does once per user: `await store.lookup(address)` (the one SQL read, through the asynchronous store) +
 *             `resolve(rows)`.
 *             Prints median, p90, p99 (microseconds) and ops/s, as one JSON line and one human line.
 *             A benchmark, not a test: it asserts nothing.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const arg = (name, def) => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : def;
};
const ITERATIONS = arg('iterations', 20000);
const WARMUP = Math.min(2000, ITERATIONS);
const USERS_PER_DOMAIN = Math.max(1, Math.round(arg('users', 500) / 20));
const DOMAINS = 20;

let mods;
try {
  mods = {
    init: await import('../dist/src/init.js'),
    store: await import('../dist/src/store.js'),
    resolve: await import('../dist/src/resolve.js'),
  };
} catch (e) {
  console.error(`bench-config: cannot load dist/ (${e.code ?? e.message}); build first: npx tsc -p tsconfig.json`);
  process.exit(1);
}

const root = mkdtempSync(join(tmpdir(), 'pigeon-bench-'));
try {
  const { dbPath } = await mods.init.initInstance({ dir: join(root, 'inst'), node: 'bench1', listen: [], db: undefined, caFrom: undefined });
  const store = await mods.store.openStore(dbPath);
  // one real hash for everyone: row size as in production without hashing hundreds of passwords
  const hash = '{ARGON2ID}$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$0123456789abcdefghijklmnopqrstuvwxyzABCDE';
  const G = { scope: 'global', name: null };
  const rows = { global: 0, domain: 0, user: 0 };
  const set = async (ref, module, key, value, flags = []) => {
    await store.setSetting(ref, module, key, value, flags);
    rows[ref.scope]++;
  };
  // global: a site policy, one forced value, one module nobody may configure
  await set(G, 'login', 'plaintext', 'never');
  await set(G, 'mailstore', 'format', 'maildir');
  await set(G, 'mailstore', 'creator', 'cas');
  await set(G, 'mailstore', 'quota', 1_000_000_000, ['override']);
  await set(G, 'vacation', 'days', 7);
  await set(G, 'forward', 'keep', true);
  await set(G, 'imap', 'backend', 'dovecot');
  await set(G, 'pop3', 'backend', 'dovecot');
  const addresses = [];
  for (let d = 0; d < DOMAINS; d++) {
    const domain = `domain${d}.example`;
    await store.addDomain(domain);
    const D = { scope: 'domain', name: domain };
    await set(D, 'mailstore', 'quota', 500_000_000 + d);
    await set(D, 'imap', 'backend', d % 3 === 0 ? 'courier' : 'dovecot');
    if (d % 4 === 0) await set(D, 'forward', '*', null, ['ignore']);
    if (d % 5 === 0) await set(D, 'vacation', 'subject', `Away from ${domain}`, ['override']);
    for (let u = 0; u < USERS_PER_DOMAIN; u++) {
      const address = `user${u}@${domain}`;
      await store.addUser(address, hash, u % 2 === 0 ? 'bench1' : null);
      addresses.push(address);
      const U = { scope: 'user', name: address };
      if (u % 3 === 0) {
        await set(U, 'vacation', 'enabled', true);
        await set(U, 'vacation', 'body', 'I am away until Monday. For urgent matters write to the office.');
      }
      if (u % 4 === 1) {
        await set(U, 'forward', 'enabled', true);
        await set(U, 'forward', 'to', [`${u}@elsewhere.example`, `backup${u}@elsewhere.example`]);
      }
      if (u % 5 === 2) await set(U, 'mailstore', 'quota', 2_000_000_000);
    }
  }

  const read = async (address) => {
    const l = await store.lookup(address);
    if (!l) throw new Error(`lookup(${address}) found nothing`);
    return mods.resolve.resolve(l.rows);
  };
  // sanity: the read does what a login needs
  const sample = await read(addresses[0]);
  if (sample['mailstore.quota']?.from !== 'global' || sample['vacation.enabled']?.value !== true) {
    throw new Error('unexpected effective config in the benchmark instance');
  }

  for (let i = 0; i < WARMUP; i++) await read(addresses[(i * 7919) % addresses.length]);
  const us = new Float64Array(ITERATIONS);
  const lookupUs = new Float64Array(ITERATIONS);
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < ITERATIONS; i++) {
    const address = addresses[(i * 7919) % addresses.length];
    const a = process.hrtime.bigint();
    const l = await store.lookup(address);
    const b = process.hrtime.bigint();
    mods.resolve.resolve(l.rows);
    const c = process.hrtime.bigint();
    us[i] = Number(c - a) / 1000;
    lookupUs[i] = Number(b - a) / 1000;
  }
  const totalS = Number(process.hrtime.bigint() - t0) / 1e9;
  await store.close();

  const pct = (xs, p) => {
    const s = Float64Array.from(xs).sort();
    return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
  };
  const round = (x) => Math.round(x * 10) / 10;
  const result = {
    bench: 'config-read',
    what: 'store.lookup(address) + resolve(rows)',
    iterations: ITERATIONS,
    users: addresses.length,
    domains: DOMAINS,
    settings_rows: rows,
    median_us: round(pct(us, 50)),
    p90_us: round(pct(us, 90)),
    p99_us: round(pct(us, 99)),
    ops_per_s: Math.round(ITERATIONS / totalS),
    lookup_median_us: round(pct(lookupUs, 50)),
    resolve_median_us: round(pct(us, 50) - pct(lookupUs, 50)),
    node: process.version,
  };
  console.log(JSON.stringify(result));
  console.log(
    `config read (lookup + resolve), ${result.users} users, ${rows.global}/${rows.domain}/${rows.user} global/domain/user rows: ` +
      `median ${result.median_us} us, p90 ${result.p90_us} us, p99 ${result.p99_us} us, ${result.ops_per_s} ops/s ` +
      `(lookup alone: median ${result.lookup_median_us} us)`,
  );
} finally {
  rmSync(root, { recursive: true, force: true });
}
