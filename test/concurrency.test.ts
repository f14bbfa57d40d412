/**
 * Concurrent writers on one SQLite file: CLI processes started at the same moment all succeed and
 * nothing is lost; two processes creating the same user or domain: exactly one wins, the other
 * exits 73; a locked database is waited for without blocking the event loop, then DB_LOCKED, and
 * the refused write leaves nothing; compare-and-set of a user's allocation refuses a stale version.
 * Needs `npx tsc -p tsconfig.json` first (npm test does it).
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { openStore as open, type Store } from '../src/store.js';
import { resolve } from '../src/resolve.js';

import { CLI_JS as CLI, cleanEnv, startCli, type CliRun } from './helpers/cli.js';
import { scratchDir } from './helpers/instance.js';

type Run = CliRun;
const start = startCli;

const root = scratchDir(t);
const inst = join(root, 'inst');
const dbFile = join(inst, 'pigeon.db');
const C = ['-c', inst];
const init = spawnSync(process.execPath, [CLI, 'init', inst], { encoding: 'utf8', env: cleanEnv() });
if (init.status !== 0) throw new Error(`pigeon init failed: ${init.stderr}`);
const dom = spawnSync(process.execPath, [CLI, ...C, 'domain', 'add', 'example.test'], { encoding: 'utf8', env: cleanEnv() });
if (dom.status !== 0) throw new Error(`domain add failed: ${dom.stderr}`);

function openStore(): Promise<Store> {
  return open(dbFile);
}

t.test('12 writers at once: 8 user adds and 4 config sets all succeed, nothing lost', async (t) => {
  const users = Array.from({ length: 8 }, (_, i) => `user${i}@example.test`);
  const sets: [string, string[]][] = [
    ['mailstore.quota', ['--global', 'mailstore.quota', '1234']],
    ['vacation.days', ['--domain', 'example.test', 'vacation.days', '9']],
    ['forward.keep', ['--global', 'forward.keep', 'false']],
    ['imap.backend', ['--domain', 'example.test', 'imap.backend', 'courier']],
  ];
  const runs = await Promise.all([
    ...users.map((u, i) => start([...C, 'user', 'add', u, '--password-stdin'], `pw-${i}\n`)),
    ...sets.map(([, args]) => start([...C, 'config', 'set', ...args])),
  ]);
  runs.forEach((r, i) => t.equal(r.code, 0, `writer ${i} exits 0 ${r.err}`));

  const store = await openStore();
  t.teardown(() => store.close());
  t.same((await store.listUsers('example.test')).map((u) => u.address).sort(), users.slice().sort(), 'every user is there');
  for (const u of await store.listUsers('example.test')) t.ok(u.password?.startsWith('{ARGON2ID}'), `${u.address} has a password`);
  const eff = resolve((await store.lookup('user0@example.test'))?.rows ?? []);
  t.match(eff['mailstore.quota'], { value: 1234, from: 'global' });
  t.match(eff['vacation.days'], { value: 9, from: 'domain' });
  t.match(eff['forward.keep'], { value: false, from: 'global' });
  t.match(eff['imap.backend'], { value: 'courier', from: 'domain' });

  // and the passwords each writer set belong to its own user
  const logins = await Promise.all(users.map((u, i) => start([...C, 'auth', 'test', u], `pw-${i}\n`)));
  logins.forEach((r, i) => t.equal(r.code, 0, `${users[i] ?? ''} logs in with the password its writer gave ${r.err}`));
});

t.test('two processes add the same user: exactly one succeeds, the other exits 73', async (t) => {
  const store = await openStore();
  t.teardown(() => store.close());
  for (let round = 0; round < 3; round++) {
    const addr = `twin${round}@example.test`;
    const [a, b] = await Promise.all([
      start([...C, 'user', 'add', addr, '--password-stdin'], 'first\n'),
      start([...C, 'user', 'add', addr, '--password-stdin'], 'second\n'),
    ]);
    t.same([a?.code, b?.code].sort(), [0, 73], `round ${round}: one 0, one 73`);
    const loser = a?.code === 73 ? a : b;
    t.match(loser?.err, `user ${addr} already exists`, 'the loser says why');
    t.equal((await store.listUsers('example.test')).filter((u) => u.address === addr).length, 1, 'one row');
    // the stored password is the winner's
    const winnerPw = a?.code === 0 ? 'first' : 'second';
    t.equal((await start([...C, 'auth', 'test', addr], `${winnerPw}\n`)).code, 0, 'the winner\'s password is the one stored');
  }
  const [d1, d2] = await Promise.all([start([...C, 'domain', 'add', 'twin.test']), start([...C, 'domain', 'add', 'twin.test'])]);
  t.same([d1?.code, d2?.code].sort(), [0, 73], 'same for two processes adding one domain');
});

t.test('a locked database: the store waits without blocking the event loop, then DB_LOCKED, nothing written', async (t) => {
  // Another process holds the write lock (as a pigeon write does from its first statement:
  // BEGIN IMMEDIATE). better-sqlite3 is synchronous: a store that let SQLite wait for the lock
  // would freeze this whole process (every session of a worker) for the busy timeout.
  const store = await openStore();
  const other = new Database(dbFile);
  t.teardown(async () => {
    if (other.inTransaction) other.exec('ROLLBACK');
    other.close();
    await store.close();
  });
  other.exec('BEGIN IMMEDIATE');
  let ticks = 0;
  const ticker = setInterval(() => ticks++, 10);
  const started = Date.now();
  const refused = await store
    .withDeadline(Date.now() + 600)
    .addDomain('inner.test')
    .then(
      () => null,
      (e: unknown) => e,
    );
  clearInterval(ticker);
  const waited = Date.now() - started;
  t.match(refused, { code: 'DB_LOCKED', exit: 75 }, 'the writer is told the database is locked');
  t.ok(waited >= 500, `it waited for the lock until its deadline (${waited} ms)`);
  // a 10 ms timer fires about 60 times in 600 ms when the loop runs; a blocked loop fires it once
  t.ok(ticks >= 10, `the event loop ran while the write waited (${ticks} timer ticks in ${waited} ms)`);
  t.ok(await store.withDeadline(Date.now()).lookup('nobody@example.test').then(() => true), 'reads go on meanwhile (WAL)');
  // a write that starts waiting and gets the lock when it is released succeeds
  const late = store.addDomain('later.test');
  setTimeout(() => other.exec('ROLLBACK'), 100);
  t.equal(await late, 'later.test', 'a waiting write goes through once the lock is released');
  const names = (await store.listDomains()).map((d) => d.name);
  t.notOk(names.includes('inner.test'), 'the refused write left nothing');
  t.ok(names.includes('later.test'), 'the waiting write committed');
});

t.test('compare-and-set of the allocation refuses a stale version', async (t) => {
  const a = await openStore();
  const b = await openStore(); // a second connection: another process or node
  t.teardown(async () => {
    await a.close();
    await b.close();
  });
  const u = await a.addUser('cas@example.test', null, null);
  t.equal(u.version, 0, 'a new user starts at version 0');
  const seenByA = await a.mustUser('cas@example.test');
  const seenByB = await b.mustUser('cas@example.test');
  t.equal(seenByA.version, seenByB.version, 'both read the same version');

  const allocA = { format: 'maildir' as const, path: '/srv/mail/a/cas', node: 'node-a' };
  const allocB = { format: 'mbox' as const, path: '/srv/mail/b/cas', node: 'node-b' };
  t.equal(await a.casAllocation(seenByA.id, seenByA.version, 'node-a', allocA), true, 'the first writer wins');
  t.equal(await b.casAllocation(seenByB.id, seenByB.version, 'node-b', allocB), false, 'the second, with the stale version, loses');
  const now = await b.mustUser('cas@example.test');
  t.equal(now.home, 'node-a', 'home is the winner\'s');
  t.same(now.allocation, allocA, 'allocation is the winner\'s');
  t.equal(now.version, seenByA.version + 1, 'the version moved on');
  t.equal(await b.casAllocation(now.id, now.version, 'node-b', allocB), true, 'after re-reading, a CAS with the current version succeeds');
  t.equal(await a.casAllocation(now.id, now.version, 'node-a', allocA), false, 'and that version is stale now');
  t.equal(await a.casAllocation(now.id + 999, 0, 'node-a', allocA), false, 'no such user id: false');
  t.same((await a.mustUser('cas@example.test')).allocation, allocB);

  // any other change to the user also invalidates an allocation read before it
  const before = await a.mustUser('cas@example.test');
  await a.setState('cas@example.test', 'disabled');
  t.equal(await b.casAllocation(before.id, before.version, 'node-c', allocA), false, 'a state change bumps the version');
});
