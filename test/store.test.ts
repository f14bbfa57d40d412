// The asynchronous store contract (src/store.ts) on SQLite: the calls the proxy, delivery, the
// registry and `pigeon db copy` rely on, through openStore as every caller opens it. Written
// against the contract only, so the same checks can run on PostgreSQL.
import t, { type Test } from 'tap';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { openStore, parseDbUrl, type Store, type StoreChange } from '../src/store.js';

async function fresh(t: Test, name = 'pigeon.db'): Promise<{ store: Store; file: string }> {
  const file = join(t.testdir(), name);
  const store = await openStore(`sqlite:${file}`, { create: true });
  t.teardown(() => store.close());
  return { store, file };
}

/** Resolves with the first change `pred` accepts (the SQLite store polls about once a second). */
function nextChange(store: Store, pred: (c: StoreChange) => boolean): Promise<StoreChange> {
  return new Promise((resolve) => {
    // the store's poll timer does not keep a process alive by itself (a daemon has its listeners)
    const alive = setInterval(() => undefined, 60_000);
    const off = store.onChange((c) => {
      if (!pred(c)) return;
      off();
      clearInterval(alive);
      resolve(c);
    });
  });
}

t.test('URLs: sqlite:PATH, a plain path, postgres (not built here), anything else refused without its password', async (t) => {
  t.same(parseDbUrl('sqlite:/srv/p.db'), { kind: 'sqlite', path: '/srv/p.db' });
  t.same(parseDbUrl('p.db'), { kind: 'sqlite', path: 'p.db' });
  t.same(parseDbUrl('postgresql://u@h/db'), { kind: 'postgres', url: 'postgresql://u@h/db' });
  // the whole user-info part is masked (src/store/pg-url.ts redactUrl): no password, whatever it holds
  t.throws(() => parseDbUrl('mysql://u:secret@h/db'), { code: 'CONFIG_INVALID', message: /mysql:\/\/\*\*\*@h\/db/ });
  t.throws(() => parseDbUrl('mysql://u:s:e@cr@et@h/db'), { code: 'CONFIG_INVALID', message: /^(?![\s\S]*(s:e|cr@et))/ }, 'a password with : and @ does not leak partly');
  t.throws(() => parseDbUrl(''), { code: 'CONFIG_INVALID' });
  await t.rejects(openStore(join(t.testdir(), 'missing.db')), { code: 'DB_MISSING', exit: 78 }, 'a missing file is not created unless asked');
});

t.test('users, settings and the one lookup; settingRows names the scope', async (t) => {
  const { store } = await fresh(t);
  t.equal(store.kind, 'sqlite');
  await store.addDomain('Example.TEST');
  const u = await store.addUser('Alice@example.test', '{PLAIN}x', null);
  t.match(u, { address: 'alice@example.test', domain: 'example.test', home: null, allocation: null, version: 0, movingTo: null });
  await t.rejects(store.addUser('alice@example.test', null, null), { code: 'DUPLICATE' });
  await t.rejects(store.addUser('bob@nowhere.test', null, null), { code: 'NO_SUCH_DOMAIN' });
  await store.setSetting({ scope: 'global', name: null }, 'imap', 'backend', 'courier', []);
  await store.setSetting({ scope: 'domain', name: 'example.test' }, 'imap', 'backend', 'dovecot', ['override']);
  await store.setSetting({ scope: 'user', name: 'alice@example.test' }, 'mailstore', 'quota', 5, []);
  const l = await store.lookup('alice@example.test');
  t.equal(l?.user.address, 'alice@example.test');
  t.same(l?.rows.map((r) => `${r.scope} ${r.module}.${r.key}`).sort(), ['domain imap.backend', 'global imap.backend', 'user mailstore.quota']);
  t.equal(await store.lookup('nobody@example.test'), null);
  t.same(
    (await store.settingRows('imap', 'backend')).map((r) => [r.scope, r.name, r.value, r.flags]),
    [
      ['domain', 'example.test', 'dovecot', ['override']],
      ['global', null, 'courier', []],
    ],
    'every row of imap.backend, with the domain it belongs to',
  );
  t.equal(await store.unsetSetting({ scope: 'global', name: null }, 'imap', 'backend'), true);
  t.equal(await store.unsetSetting({ scope: 'global', name: null }, 'imap', 'backend'), false, 'nothing left to unset');
  const r = await store.importUsers(
    [
      { address: 'x@new.test', hash: '{PLAIN}a' },
      { address: 'y@new.test', hash: '{PLAIN}b' },
    ],
    true,
  );
  t.same(r.createdDomains, ['new.test']);
  await t.rejects(store.importUsers([{ address: 'z@new.test', hash: '{PLAIN}c' }, { address: 'x@new.test', hash: '{PLAIN}d' }], false), { code: 'DUPLICATE' });
  t.equal(await store.getUser('z@new.test'), null, 'an import that fails writes nothing');
});

t.test('onChange reports registry changes and users being moved (polled on SQLite)', async (t) => {
  const { store, file } = await fresh(t);
  await store.addDomain('example.test');
  const u = await store.addUser('mover@example.test', null, 'n1');
  // another process (a CLI) changes the registry and marks a move
  const other = await openStore(file);
  t.teardown(() => other.close());
  const nodes = nextChange(store, (c) => c.kind === 'nodes');
  await new Promise((r) => setImmediate(r));
  await other.registerSelf({ name: 'n2', fingerprint: 'AA:BB', certExpires: '2030-01-01T00:00:00Z', peerAddress: '127.0.0.1:7002' }, { heartbeat: true });
  t.same(await nodes, { kind: 'nodes' }, 'a node that joined');
  const moved = nextChange(store, (c) => c.kind === 'user');
  t.equal(await other.casMoving(u.id, u.version, 'n2'), true);
  t.same(await moved, { kind: 'user', address: 'mover@example.test' }, 'a user being moved');
  t.same(await store.movingUsers(), ['mover@example.test']);
  const disabled = nextChange(store, (c) => c.kind === 'nodes');
  await other.setNodeState('n2', 'disabled');
  await disabled;
  t.equal((await store.getNode('n2'))?.state, 'disabled', 'and a node that was disabled');
});

t.test('dump and load: every table into an empty database, refused into one that is not', async (t) => {
  const { store } = await fresh(t, 'a.db');
  await store.addDomain('example.test');
  const u = await store.addUser('a@example.test', '{PLAIN}x', null);
  await store.casAllocation(u.id, u.version, 'n1', { format: 'maildir', path: '/srv/mail/example.test/a', node: 'n1' });
  await store.setSetting({ scope: 'user', name: 'a@example.test' }, 'forward', 'to', ['b@elsewhere.test'], []);
  await store.registerSelf({ name: 'n1', fingerprint: 'F1', certExpires: '2030-01-01T00:00:00Z', peerAddress: null }, { heartbeat: false });
  await store.registerSelf({ name: 'n9', fingerprint: 'F9', certExpires: '2030-01-01T00:00:00Z', peerAddress: null }, { heartbeat: false });
  await store.removeNode('n9');
  const dump = await store.dump();
  t.same(
    dump.map((d) => [d.table, d.rows.length]),
    [
      ['domains', 1],
      ['users', 1],
      ['settings', 1],
      ['nodes', 1],
      ['revoked', 1],
    ],
  );
  const { store: copy } = await fresh(t, 'b.db');
  await copy.load(dump);
  t.same(await copy.dump(), dump, 'the copy holds the same rows');
  t.same(await copy.lookup('a@example.test'), await store.lookup('a@example.test'), 'and answers the same lookup');
  await t.rejects(copy.load(dump), { message: /not empty/ }, 'a second load is refused');
  t.same(await copy.schemaStatus(), { version: 2, minUsable: 2, latest: 2 });
  t.same(await copy.migrate(), { from: 2, to: 2 }, 'nothing to migrate');
});

t.test('withDeadline: a locked database is waited for until the deadline; a passed deadline tries once', async (t) => {
  const { store, file } = await fresh(t);
  const lock = new Database(file);
  t.teardown(() => {
    if (lock.inTransaction) lock.exec('ROLLBACK');
    lock.close();
  });
  lock.exec('BEGIN IMMEDIATE');
  let s = Date.now();
  await t.rejects(store.withDeadline(Date.now()).addDomain('a.test'), { code: 'DB_LOCKED' });
  t.ok(Date.now() - s < 500, `a passed deadline: one try (${Date.now() - s} ms)`);
  s = Date.now();
  await t.rejects(store.withDeadline(Date.now() + 300).addDomain('a.test'), { code: 'DB_LOCKED' });
  t.ok(Date.now() - s >= 250, `waited until the deadline (${Date.now() - s} ms)`);
  await store.withDeadline(Date.now()).close();
  lock.exec('ROLLBACK');
  t.equal(await store.addDomain('a.test'), 'a.test', "closing a view closed nothing: the store still works");
});

t.test('a user looked up again is answered from the last lookup only while the database is unchanged', async (t) => {
  const { store, file } = await fresh(t);
  await store.addDomain('example.test');
  await store.addUser('alice@example.test', '{PLAIN}one', null);
  const first = await store.lookup('alice@example.test');
  const again = await store.lookup('alice@example.test');
  t.equal(again, first, 'nothing changed: the same answer, not a second query');
  t.ok(Object.isFrozen(again) && Object.isFrozen(again?.user) && Object.isFrozen(again?.rows), 'shared, so frozen');
  t.throws(() => (again?.rows as unknown[]).push(1), TypeError, 'nobody can change what another caller reads');

  // a change through this very connection (data_version does not count those; total_changes does)
  await store.setPassword('alice@example.test', '{PLAIN}two');
  t.equal((await store.lookup('alice@example.test'))?.user.password, '{PLAIN}two', 'own write seen at once');
  await store.setSetting({ scope: 'user', name: 'alice@example.test' }, 'mailstore', 'quota', 7, []);
  t.same((await store.lookup('alice@example.test'))?.rows.map((r) => `${r.module}.${r.key}=${String(r.value)}`), ['mailstore.quota=7'], 'own setting seen at once');
  await store.setSetting({ scope: 'global', name: null }, 'imap', 'backend', 'courier', []);
  t.equal((await store.lookup('alice@example.test'))?.rows.length, 2, 'a global row (not the user\'s own) seen at once');

  // changes by another connection: another process (the CLI) or another store in this one
  const other = new Database(file);
  t.teardown(() => other.close());
  other.prepare("UPDATE users SET password = '{PLAIN}three' WHERE address = 'alice@example.test'").run();
  t.equal((await store.lookup('alice@example.test'))?.user.password, '{PLAIN}three', 'another connection\'s write seen at once');
  other.prepare("UPDATE users SET state = 'disabled' WHERE address = 'alice@example.test'").run();
  t.equal((await store.lookup('alice@example.test'))?.user.state, 'disabled');
  other.prepare("DELETE FROM settings WHERE scope = 'user'").run();
  other.prepare("DELETE FROM users WHERE address = 'alice@example.test'").run();
  t.equal(await store.lookup('alice@example.test'), null, 'a user removed elsewhere is gone at once');
  await store.addUser('alice@example.test', '{PLAIN}four', null);
  t.equal((await store.lookup('alice@example.test'))?.user.password, '{PLAIN}four', 'and a new one with the same address is the new one');
});
