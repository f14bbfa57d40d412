/**
 * Concurrent writers on one SQLite file: CLI processes started at the same moment all succeed and
 * nothing is lost; two processes creating the same user or domain: exactly one wins, the other
 * exits 73; compare-and-set of a user's allocation refuses a stale version.
 * Needs `npx tsc -p tsconfig.json` first (npm test does it).
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { openDb } from '../src/db.js';
import { Store } from '../src/store.js';
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

function openStore(): Store {
  return new Store(openDb(dbFile), dbFile);
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

  const store = openStore();
  t.teardown(() => store.close());
  t.same(store.listUsers('example.test').map((u) => u.address).sort(), users.slice().sort(), 'every user is there');
  for (const u of store.listUsers('example.test')) t.ok(u.password?.startsWith('{ARGON2ID}'), `${u.address} has a password`);
  const eff = resolve(store.lookup('user0@example.test')?.rows ?? []);
  t.match(eff['mailstore.quota'], { value: 1234, from: 'global' });
  t.match(eff['vacation.days'], { value: 9, from: 'domain' });
  t.match(eff['forward.keep'], { value: false, from: 'global' });
  t.match(eff['imap.backend'], { value: 'courier', from: 'domain' });

  // and the passwords each writer set belong to its own user
  const logins = await Promise.all(users.map((u, i) => start([...C, 'auth', 'test', u], `pw-${i}\n`)));
  logins.forEach((r, i) => t.equal(r.code, 0, `${users[i] ?? ''} logs in with the password its writer gave ${r.err}`));
});

t.test('two processes add the same user: exactly one succeeds, the other exits 73', async (t) => {
  const store = openStore();
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
    t.equal(store.listUsers('example.test').filter((u) => u.address === addr).length, 1, 'one row');
    // the stored password is the winner's
    const winnerPw = a?.code === 0 ? 'first' : 'second';
    t.equal((await start([...C, 'auth', 'test', addr], `${winnerPw}\n`)).code, 0, 'the winner\'s password is the one stored');
  }
  const [d1, d2] = await Promise.all([start([...C, 'domain', 'add', 'twin.test']), start([...C, 'domain', 'add', 'twin.test'])]);
  t.same([d1?.code, d2?.code].sort(), [0, 73], 'same for two processes adding one domain');
});

t.test('a write transaction holds the write lock from its first statement (no upgrade race)', async (t) => {
  // Two processes racing between "check" and "insert" are safe only if the check already runs
  // under the write lock (BEGIN IMMEDIATE). Process timing rarely hits that window, so test it
  // directly: while one connection is inside a write, after only a read, another cannot write.
  const a = openStore();
  const b = openStore();
  t.teardown(() => {
    a.close();
    b.close();
  });
  b.db.pragma('busy_timeout = 200');
  let inner: unknown = null;
  a.write(() => {
    a.getUser('nobody@example.test');
    try {
      b.addDomain('inner.test');
    } catch (e) {
      inner = e;
    }
    a.db.prepare('INSERT INTO domains (name) VALUES (?)').run('outer.test');
  });
  t.match(inner, { code: 'DB_LOCKED', exit: 75 }, 'the other writer is told the database is locked');
  const names = a.listDomains().map((d) => d.name);
  t.ok(names.includes('outer.test'), 'the first write committed');
  t.notOk(names.includes('inner.test'), 'the refused write left nothing');
});

t.test('compare-and-set of the allocation refuses a stale version', async (t) => {
  const a = openStore();
  const b = openStore(); // a second connection: another process or node
  t.teardown(() => {
    a.close();
    b.close();
  });
  const u = a.addUser('cas@example.test', null, null);
  t.equal(u.version, 0, 'a new user starts at version 0');
  const seenByA = a.mustUser('cas@example.test');
  const seenByB = b.mustUser('cas@example.test');
  t.equal(seenByA.version, seenByB.version, 'both read the same version');

  const allocA = { format: 'maildir' as const, path: '/srv/mail/a/cas', node: 'node-a' };
  const allocB = { format: 'mbox' as const, path: '/srv/mail/b/cas', node: 'node-b' };
  t.equal(a.casAllocation(seenByA.id, seenByA.version, 'node-a', allocA), true, 'the first writer wins');
  t.equal(b.casAllocation(seenByB.id, seenByB.version, 'node-b', allocB), false, 'the second, with the stale version, loses');
  const now = b.mustUser('cas@example.test');
  t.equal(now.home, 'node-a', 'home is the winner\'s');
  t.same(now.allocation, allocA, 'allocation is the winner\'s');
  t.equal(now.version, seenByA.version + 1, 'the version moved on');
  t.equal(b.casAllocation(now.id, now.version, 'node-b', allocB), true, 'after re-reading, a CAS with the current version succeeds');
  t.equal(a.casAllocation(now.id, now.version, 'node-a', allocA), false, 'and that version is stale now');
  t.equal(a.casAllocation(now.id + 999, 0, 'node-a', allocA), false, 'no such user id: false');
  t.same(a.mustUser('cas@example.test').allocation, allocB);

  // any other change to the user also invalidates an allocation read before it
  const before = a.mustUser('cas@example.test');
  a.setState('cas@example.test', 'disabled');
  t.equal(b.casAllocation(before.id, before.version, 'node-c', allocA), false, 'a state change bumps the version');
});
