// The ConfigStore contract (src/store/types.ts), asserted against every implementation in
// FACTORIES: what callers rely on, from domains to dump/load. Each subtest gets a fresh, empty
// database; `open()` opens another store object on the same database (a second process, or a
// second node), which the races and the notifications need. PostgreSQL runs on a private server
// started for this file (test/helpers/postgres.ts). The SQLite store joins by one line in
// FACTORIES.
import { openStore } from '../src/store.js';
import t, { type Test } from 'tap';
import { AppError } from '../src/errors.js';
import type { ConfigStore, StoreChange } from '../src/store/types.js';
import { openPostgresStore } from '../src/store/postgres.js';
import { startPostgres, type PgServer } from './helpers/postgres.js';
import { scratchDir } from './helpers/instance.js';
import { join } from 'node:path';

interface Fresh {
  /** a store on this test's database; the first call's store is migrated unless `migrated: false` */
  open(): Promise<ConfigStore>;
}

interface Factory {
  readonly name: string;
  /** set up what every test of this implementation shares; false when it cannot run here */
  setup(t: Test): Promise<boolean>;
  /** a new, empty database (migrated to the latest schema unless `migrated` is false) */
  fresh(t: Test, opts?: { migrated?: boolean }): Promise<Fresh>;
}

function postgresFactory(): Factory {
  let pg: PgServer | null = null;
  let n = 0;
  return {
    name: 'postgres',
    async setup(t) {
      pg = await startPostgres(t);
      return pg !== null;
    },
    async fresh(t, opts = {}) {
      const server = pg;
      if (!server) throw new Error('setup first');
      const db = `contract_${process.pid}_${++n}`;
      server.psql(`CREATE DATABASE ${db}`);
      const url = `postgres://pigeon@127.0.0.1:${server.port}/${db}`;
      let first = true;
      return {
        async open() {
          const s = await openPostgresStore(url);
          t.teardown(() => s.close());
          if (first && opts.migrated !== false) await s.migrate();
          first = false;
          return s;
        },
      };
    },
  };
}

/** a store in one file per test database (SQLite); `open(path)` opens, creating the file */
function fileFactory(name: string, openFile: (path: string) => Promise<ConfigStore>): Factory {
  let n = 0;
  return {
    name,
    setup: async () => true,
    async fresh(t, opts = {}) {
      const file = join(scratchDir(t), `store-${++n}.db`);
      let first = true;
      return {
        async open() {
          const s = await openFile(file);
          t.teardown(() => s.close());
          if (first && opts.migrated !== false) await s.migrate();
          first = false;
          return s;
        },
      };
    },
  };
}

const FACTORIES: Factory[] = [
  postgresFactory(),
  fileFactory('sqlite', (path) => openStore(`sqlite:${path}`, { create: true })),
];

async function code(p: Promise<unknown>): Promise<string> {
  try {
    await p;
    return 'resolved';
  } catch (e) {
    return e instanceof AppError ? e.code : `not an AppError: ${String(e)}`;
  }
}

/** the next change that `match` accepts, or a rejection after `ms` */
function nextChange(s: ConfigStore, match: (c: StoreChange) => boolean, ms: number): Promise<StoreChange> {
  return new Promise((res, rej) => {
    const timer = setTimeout(() => {
      off();
      rej(new Error(`no matching change within ${ms} ms`));
    }, ms);
    const off = s.onChange((c) => {
      if (!match(c)) return;
      clearTimeout(timer);
      off();
      res(c);
    });
  });
}

const ALLOC = { format: 'maildir' as const, path: '/var/mail/a/alice', node: 'n1' };
const ME = { name: 'n1', fingerprint: 'AA:01', certExpires: '2030-01-01T00:00:00Z', peerAddress: '127.0.0.2:7000' };

for (const f of FACTORIES) {
  t.test(f.name, async (t) => {
    if (!(await f.setup(t))) return;

    t.test('domains', async (t) => {
      const s = await (await f.fresh(t)).open();
      t.equal(await s.addDomain('Example.TEST'), 'example.test', 'stored lower-case');
      t.equal(await code(s.addDomain('example.test')), 'DUPLICATE');
      t.equal(await code(s.addDomain('not a domain')), 'INVALID_DOMAIN');
      await s.addDomain('b.test');
      await s.addUser('alice@example.test', '{PLAIN}x', null);
      await s.setSetting({ scope: 'domain', name: 'example.test' }, 'mailstore', 'format', 'mbox', []);
      t.match(await s.listDomains(), [
        { name: 'b.test', users: 0, created: /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/ },
        { name: 'example.test', users: 1 },
      ]);
      const before = await s.mustUser('alice@example.test');
      t.same(await s.renameDomain('example.test', 'c.test'), { users: 1 });
      const after = await s.mustUser('alice@c.test');
      t.equal(after.id, before.id, 'the same user');
      t.equal(after.version, before.version + 1, 'version bumped');
      t.equal(await s.getUser('alice@example.test'), null);
      t.match(await s.rowsFor({ scope: 'domain', name: 'c.test' }), [{ scope: 'domain', module: 'mailstore', key: 'format', value: 'mbox' }], 'settings stay');
      t.equal(await code(s.renameDomain('c.test', 'b.test')), 'DUPLICATE');
      t.equal(await code(s.renameDomain('nope.test', 'x.test')), 'NO_SUCH_DOMAIN');
      t.equal(await code(s.delDomain('c.test')), 'DOMAIN_NOT_EMPTY');
      t.equal(await code(s.delDomain('nope.test')), 'NO_SUCH_DOMAIN');
      await s.delUser('alice@c.test');
      await s.delDomain('c.test');
      t.same(
        (await s.listDomains()).map((d) => d.name),
        ['b.test'],
      );
      await s.addDomain('c.test');
      t.same(await s.rowsFor({ scope: 'domain', name: 'c.test' }), [], 'a deleted domain leaves no settings behind');
    });

    t.test('users', async (t) => {
      const s = await (await f.fresh(t)).open();
      t.equal(await code(s.addUser('alice@example.test', 'h', null)), 'NO_SUCH_DOMAIN');
      await s.addDomain('example.test');
      const a = await s.addUser('Alice@Example.test', '{PLAIN}pw', null);
      t.match(a, { address: 'alice@example.test', domain: 'example.test', password: '{PLAIN}pw', state: 'active', home: null, allocation: null, movingTo: null, version: 0 });
      t.equal(await code(s.addUser('alice@example.test', 'h', null)), 'DUPLICATE');
      t.equal(await code(s.addUser('bad address', 'h', null)), 'INVALID_ADDRESS');
      t.equal((await s.getUser('ALICE@example.test'))?.id, a.id, 'getUser normalises');
      t.equal(await s.getUser('nobody@example.test'), null);
      t.equal(await code(s.mustUser('nobody@example.test')), 'NO_SUCH_USER');
      await s.setPassword('alice@example.test', '{PLAIN}new');
      await s.setState('alice@example.test', 'disabled');
      t.match(await s.mustUser('alice@example.test'), { password: '{PLAIN}new', state: 'disabled', version: 2 });
      t.equal(await code(s.setPassword('nobody@example.test', 'x')), 'NO_SUCH_USER');
      t.equal(await code(s.setState('nobody@example.test', 'active')), 'NO_SUCH_USER');
      const b = await s.addUser('bob@example.test', null, 'n2');
      t.equal(b.home, 'n2');
      await s.addDomain('a.test');
      await s.addUser('zed@a.test', null, null);
      t.same(
        (await s.listUsers()).map((u) => u.address),
        ['zed@a.test', 'alice@example.test', 'bob@example.test'],
        'by domain, then address',
      );
      t.same(
        (await s.listUsers('example.test')).map((u) => u.address),
        ['alice@example.test', 'bob@example.test'],
      );
      t.equal(await code(s.listUsers('nope.test')), 'NO_SUCH_DOMAIN');

      await s.setSetting({ scope: 'user', name: 'alice@example.test' }, 'vacation', 'enabled', true, []);
      t.ok(await s.casAllocation(a.id, (await s.mustUser('alice@example.test')).version, 'n1', ALLOC));
      const r = await s.renameUser('alice@example.test', 'alicia@a.test');
      t.match(r, { id: a.id, address: 'alicia@a.test', domain: 'a.test', allocation: ALLOC, home: 'n1' }, 'allocation stays with the user');
      t.match((await s.lookup('alicia@a.test'))?.rows, [{ scope: 'user', module: 'vacation', key: 'enabled', value: true }], 'settings stay with the user');
      t.equal(await code(s.renameUser('alicia@a.test', 'bob@example.test')), 'DUPLICATE');
      t.equal(await code(s.renameUser('alicia@a.test', 'x@nope.test')), 'NO_SUCH_DOMAIN');
      t.equal(await code(s.renameUser('nobody@a.test', 'x@a.test')), 'NO_SUCH_USER');
      const gone = await s.delUser('alicia@a.test');
      t.equal(gone.allocation?.path, ALLOC.path, 'delUser returns the record');
      t.equal(await s.getUser('alicia@a.test'), null);
      await s.addUser('alicia@a.test', null, null);
      t.same((await s.lookup('alicia@a.test'))?.rows, [], 'a deleted user leaves no settings behind');
      t.equal(await code(s.delUser('nobody@a.test')), 'NO_SUCH_USER');
    });

    t.test('importUsers: all or nothing', async (t) => {
      const s = await (await f.fresh(t)).open();
      await s.addDomain('example.test');
      await s.addUser('taken@example.test', 'h', null);
      t.equal(await code(s.importUsers([{ address: 'new1@example.test', hash: '{PLAIN}1' }, { address: 'taken@example.test', hash: '{PLAIN}2' }], false)), 'DUPLICATE');
      t.equal(await s.getUser('new1@example.test'), null, 'nothing of a refused import');
      t.equal(await code(s.importUsers([{ address: 'new1@example.test', hash: 'h' }, { address: 'x@other.test', hash: 'h' }], false)), 'NO_SUCH_DOMAIN');
      t.equal(await s.getUser('new1@example.test'), null);
      t.same(await s.importUsers([{ address: 'new1@example.test', hash: '{PLAIN}1' }, { address: 'x@other.test', hash: '{PLAIN}2' }], true), { createdDomains: ['other.test'] });
      t.match(await s.mustUser('x@other.test'), { password: '{PLAIN}2', domain: 'other.test' });
      t.match(await s.mustUser('new1@example.test'), { password: '{PLAIN}1' });
    });

    t.test('settings, flags and lookup', async (t) => {
      const s = await (await f.fresh(t)).open();
      await s.addDomain('example.test');
      await s.addDomain('other.test');
      const u = await s.addUser('alice@example.test', 'h', null);
      await s.addUser('bob@other.test', 'h', null);
      t.same(await s.lookup('alice@example.test'), { user: u, rows: [] }, 'no settings: the user alone');
      t.equal(await s.lookup('nobody@example.test'), null);
      await s.setSetting({ scope: 'global', name: null }, 'mailstore', 'format', 'maildir', ['override']);
      await s.setSetting({ scope: 'domain', name: 'example.test' }, 'vacation', '*', null, ['ignore']);
      await s.setSetting({ scope: 'domain', name: 'other.test' }, 'vacation', 'enabled', true, []);
      await s.setSetting({ scope: 'user', name: 'alice@example.test' }, 'vacation', 'enabled', true, []);
      await s.setSetting({ scope: 'user', name: 'alice@example.test' }, 'forward', 'to', ['a@b.test', 'c@d.test'], []);
      await s.setSetting({ scope: 'user', name: 'bob@other.test' }, 'forward', 'to', ['x@y.test'], []);
      const l = await s.lookup('alice@example.test');
      t.equal(l?.user.id, u.id);
      const key = (r: { scope: string; module: string; key: string }): string => `${r.scope}:${r.module}.${r.key}`;
      t.same(
        l?.rows.map(key).sort(),
        ['domain:vacation.*', 'global:mailstore.format', 'user:forward.to', 'user:vacation.enabled'],
        'global + own domain + own user rows, nobody else’s',
      );
      t.match(
        l?.rows.find((r) => r.key === 'format'),
        { value: 'maildir', flags: ['override'] },
      );
      t.match(
        l?.rows.find((r) => r.key === '*'),
        { value: null, flags: ['ignore'] },
      );
      t.same(l?.rows.find((r) => r.module === 'forward')?.value, ['a@b.test', 'c@d.test'], 'JSON values round-trip');
      // upsert: value and flags replaced
      await s.setSetting({ scope: 'global', name: null }, 'mailstore', 'format', 'mbox', []);
      t.match(
        (await s.rowsFor({ scope: 'global', name: null })).find((r) => r.key === 'format'),
        { value: 'mbox', flags: [] },
      );
      t.same((await s.rowsFor({ scope: 'global', name: null })).map(key), ['global:mailstore.format'], 'global scope: global rows only');
      t.same((await s.rowsFor({ scope: 'domain', name: 'Example.TEST' })).map(key).sort(), ['domain:vacation.*', 'global:mailstore.format'], 'domain scope: global + domain');
      t.same((await s.rowsFor({ scope: 'user', name: 'alice@example.test' })).map(key).sort(), ['domain:vacation.*', 'global:mailstore.format', 'user:forward.to', 'user:vacation.enabled']);
      t.equal(await code(s.rowsFor({ scope: 'user', name: 'nobody@example.test' })), 'NO_SUCH_USER');
      t.equal(await code(s.rowsFor({ scope: 'domain', name: 'nope.test' })), 'NO_SUCH_DOMAIN');
      t.equal(await code(s.setSetting({ scope: 'user', name: 'nobody@example.test' }, 'a', 'b', 1, [])), 'NO_SUCH_USER');
      t.equal(await code(s.setSetting({ scope: 'domain', name: 'nope.test' }, 'a', 'b', 1, [])), 'NO_SUCH_DOMAIN');
      t.match(await s.settingRows('vacation', 'enabled'), [
        { scope: 'domain', name: 'other.test', value: true },
        { scope: 'user', name: 'alice@example.test', value: true },
      ]);
      t.match(await s.settingRows('mailstore', 'format'), [{ scope: 'global', name: null, value: 'mbox' }]);
      t.equal(await s.unsetSetting({ scope: 'user', name: 'alice@example.test' }, 'vacation', 'enabled'), true);
      t.equal(await s.unsetSetting({ scope: 'user', name: 'alice@example.test' }, 'vacation', 'enabled'), false, 'nothing left to unset');
      t.same((await s.lookup('alice@example.test'))?.rows.map(key).sort(), ['domain:vacation.*', 'global:mailstore.format', 'user:forward.to']);
    });

    t.test('cas: versions, and 20 racing allocators across two stores: exactly one wins', async (t) => {
      const fr = await f.fresh(t);
      const a = await fr.open();
      const b = await fr.open();
      await a.addDomain('example.test');
      const u = await a.addUser('alice@example.test', 'h', null);
      t.equal(await a.casAllocation(u.id, u.version + 1, 'n1', ALLOC), false, 'a wrong version changes nothing');
      t.equal((await a.mustUser('alice@example.test')).allocation, null);
      const results = await Promise.all(
        Array.from({ length: 20 }, (_, i) => (i % 2 ? a : b).casAllocation(u.id, u.version, `n${i}`, { format: 'maildir', path: `/m/${i}`, node: `n${i}` })),
      );
      t.equal(results.filter(Boolean).length, 1, 'exactly one allocator won');
      const won = results.indexOf(true);
      t.match(await b.mustUser('alice@example.test'), { home: `n${won}`, allocation: { path: `/m/${won}` }, version: u.version + 1 }, 'the winner’s allocation is the one stored');

      const v = (await a.mustUser('alice@example.test')).version;
      t.equal(await a.casMoving(u.id, v, 'n9'), true);
      t.equal(await a.casMoving(u.id, v, 'n8'), false, 'stale version');
      t.same(await b.movingUsers(), ['alice@example.test']);
      t.equal((await a.mustUser('alice@example.test')).movingTo, 'n9');
      t.equal(await b.casMoved(u.id, v + 1, 'n9', { format: 'maildir', path: '/m/moved', node: 'n9' }), true);
      t.match(await a.mustUser('alice@example.test'), { home: 'n9', movingTo: null, allocation: { path: '/m/moved' }, version: v + 2 });
      t.same(await a.movingUsers(), []);
      t.equal(await a.casMoved(u.id, v + 1, 'n1', ALLOC), false);
    });

    t.test('userLock: one holder at a time, across stores', async (t) => {
      const fr = await f.fresh(t);
      const a = await fr.open();
      const b = await fr.open();
      const lockA = a.userLock;
      const lockB = b.userLock;
      if (a.kind === 'sqlite') {
        // nodes sharing a SQLite file share a host: the creator keeps its host-local lock file
        t.equal(lockA, null, 'SQLite offers no cluster-wide lock');
        return;
      }
      if (lockA === null || lockB === null) throw new Error(`${a.kind}: userLock is null`);
      const events: string[] = [];
      let release: () => void = () => undefined;
      const holding = new Promise<void>((r) => (release = r));
      let held: () => void = () => undefined;
      const isHeld = new Promise<void>((r) => (held = r));
      const first = lockA(7, 5000, async () => {
        events.push('A in');
        held();
        await holding;
        events.push('A out');
        return 'A';
      });
      await isHeld;
      t.equal(await code(lockB(7, 300, async () => 'never')), 'TEMPFAIL', 'a waiter gives up after waitMs');
      t.equal(await lockB(8, 1000, async () => 'other user'), 'other user', 'another user’s lock is independent');
      const second = lockB(7, 20_000, async () => {
        events.push('B in');
        return 'B';
      });
      // B is now waiting on the server; let A go, and B gets in after A left
      setImmediate(() => release());
      t.same(await Promise.all([first, second]), ['A', 'B']);
      t.same(events, ['A in', 'A out', 'B in'], 'B entered only after A left');
      t.equal(await code(lockA(7, 1000, async () => Promise.reject(new AppError('IO', 'inside')))), 'IO', 'an error inside passes through');
      t.equal(await lockB(7, 1000, async () => 'free again'), 'free again', 'and the lock was released');
    });

    t.test('nodes: register, conflict, re-issue, disable, remove, revoke', async (t) => {
      const fr = await f.fresh(t);
      const s = await fr.open();
      t.same(await s.registerSelf(ME, { heartbeat: false }), { created: true, promoted: false, state: 'active' });
      t.match(await s.getNode('n1'), { name: 'n1', fingerprint: 'AA:01', peerAddress: '127.0.0.2:7000', state: 'active', lastSeen: null, certExpires: ME.certExpires });
      t.same(await s.registerSelf({ ...ME, peerAddress: null }, { heartbeat: true }), { created: false, promoted: false, state: 'active' });
      const seen = await s.getNode('n1');
      t.equal(seen?.peerAddress, '127.0.0.2:7000', 'a null peer address keeps the known one');
      t.match(seen?.lastSeen, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/, 'heartbeat sets last_seen');
      t.equal(await code(s.registerSelf({ ...ME, fingerprint: 'BB:02' }, { heartbeat: false })), 'NODE_CONFLICT', 'one name, another certificate');
      t.equal(await s.announceCertificate('n1', 'CC:03', '2031-01-01T00:00:00Z'), 'next');
      t.equal((await s.getNode('n1'))?.nextFingerprint, 'CC:03');
      t.same(await s.registerSelf({ ...ME, fingerprint: 'CC:03', certExpires: '2031-01-01T00:00:00Z' }, { heartbeat: true }), { created: false, promoted: true, state: 'active' });
      t.match(await s.getNode('n1'), { fingerprint: 'CC:03', nextFingerprint: null, certExpires: '2031-01-01T00:00:00Z' });
      t.equal(await s.announceCertificate('n2', 'DD:04', '2030-01-01T00:00:00Z'), 'new', 'a certificate for an unknown node makes its row');
      t.match(await s.getNode('n2'), { fingerprint: 'DD:04', lastSeen: null, peerAddress: null });
      await s.unregisterUnseen('n2', 'XX:99');
      t.not(await s.getNode('n2'), null, 'another fingerprint: kept');
      await s.unregisterUnseen('n2', 'DD:04');
      t.equal(await s.getNode('n2'), null, 'never seen, same fingerprint: undone');
      await s.unregisterUnseen('n1', 'CC:03');
      t.not(await s.getNode('n1'), null, 'a node that served stays');
      await s.heartbeat('n1');
      t.match(await s.setNodeState('n1', 'disabled'), { name: 'n1', state: 'disabled' });
      t.same(await s.registerSelf({ ...ME, fingerprint: 'CC:03' }, { heartbeat: true }), { created: false, promoted: false, state: 'disabled' }, 'registration reports the state');
      t.equal(await code(s.setNodeState('nope', 'active')), 'NO_SUCH_NODE');
      await s.registerSelf({ name: 'n3', fingerprint: 'EE:05', certExpires: ME.certExpires, peerAddress: '127.0.0.4:7000' }, { heartbeat: true });
      t.same(
        (await s.listNodes()).map((n) => n.name),
        ['n1', 'n3'],
      );

      await s.addDomain('example.test');
      const u = await s.addUser('alice@example.test', 'h', 'n1');
      await s.addUser('bob@example.test', 'h', null);
      const c = await s.addUser('carol@example.test', 'h', null);
      t.ok(await s.casMoving(c.id, c.version, 'n1'));
      t.same([...(await s.usersPerNode())], [['n1', 1]]);
      t.equal(await code(s.removeNode('n1')), 'NODE_BUSY', 'refused while users live there');
      t.ok(await s.casAllocation(u.id, u.version, 'n3', { ...ALLOC, node: 'n3' }));
      t.equal(await code(s.removeNode('n1')), 'NODE_BUSY', 'refused while a user moves there');
      t.ok(await s.casMoving(c.id, c.version + 1, null));
      t.same(await s.removeNode('n1'), { revoked: 1 });
      t.equal(await s.getNode('n1'), null);
      t.ok((await s.revokedFingerprints()).has('CC:03'));
      t.equal(await code(s.registerSelf({ ...ME, fingerprint: 'CC:03' }, { heartbeat: true })), 'NODE_REMOVED', 'a removed node that comes back is refused');
      t.equal(await code(s.removeNode('n1')), 'NO_SUCH_NODE');
      t.same(await s.registerSelf({ ...ME, fingerprint: 'FF:06' }, { heartbeat: true }), { created: true, promoted: false, state: 'active' }, 'the name again, with a new certificate');
      await s.announceCertificate('n3', 'GG:07', ME.certExpires);
      await s.casAllocation(u.id, u.version + 1, 'n1', ALLOC);
      t.same(await s.removeNode('n3'), { revoked: 2 }, 'current and next certificate revoked');
      t.ok((await s.revokedFingerprints()).has('GG:07'));
    });

    t.test('onChange: registry and user changes reach another store within a second', async (t) => {
      const fr = await f.fresh(t);
      const a = await fr.open();
      const b = await fr.open();
      await a.registerSelf(ME, { heartbeat: true });
      await a.addDomain('example.test');
      await a.addUser('alice@example.test', 'h', null);
      // one subscription for the whole test: the store LISTENs while it has a subscriber
      b.onChange(() => undefined);
      // subscribe, then make changes until one arrives: from then on the subscription is live
      let live = false;
      const ready = nextChange(b, (c) => c.kind === 'nodes', 10_000).then(() => (live = true));
      for (let i = 0; !live && i < 100; i++) {
        // a new value every time (toggling a state back and forth can look unchanged to a poller)
        await a.announceCertificate('n1', `AA:${String(i).padStart(2, '0')}`, '2030-01-01T00:00:00Z');
        await Promise.race([ready, new Promise((r) => setTimeout(r, 100))]);
      }
      await ready;
      await a.setNodeState('n1', 'active');
      // notifications arrive in commit order: once this one is here, no earlier one is still on its way
      const synced = nextChange(b, (c) => c.kind === 'user' && c.address === 'alice@example.test', 5000);
      await a.setPassword('alice@example.test', 'sync');
      await synced;
      const cases: [string, () => Promise<unknown>, (c: StoreChange) => boolean][] = [
        ['node disabled', () => a.setNodeState('n1', 'disabled'), (c) => c.kind === 'nodes'],
        ['node removed', async () => a.removeNode('n1'), (c) => c.kind === 'nodes'],
        ['password', () => a.setPassword('alice@example.test', 'h2'), (c) => c.kind === 'user' && c.address === 'alice@example.test'],
        ['state', () => a.setState('alice@example.test', 'disabled'), (c) => c.kind === 'user' && c.address === 'alice@example.test'],
      ];
      for (const [what, change, match] of cases) {
        const got = nextChange(b, match, 5000);
        const t0 = Date.now();
        await change();
        await got;
        const ms = Date.now() - t0;
        t.ok(ms < 1500, `${what}: delivered in ${ms} ms`);
      }
      const u = await a.mustUser('alice@example.test');
      const got = nextChange(b, (c) => c.kind === 'user' && c.address === 'alice@example.test', 5000);
      await a.casAllocation(u.id, u.version, 'n1', ALLOC);
      t.same(await got, { kind: 'user', address: 'alice@example.test' }, 'allocation');
      const moving = nextChange(b, (c) => c.kind === 'user', 5000);
      await a.casMoving(u.id, u.version + 1, 'n2');
      t.ok(await moving, 'moving_to');
    });

    t.test('dump and load: every table, every column, into an empty database only', async (t) => {
      const src = await (await f.fresh(t)).open();
      await src.addDomain('example.test');
      await src.addDomain('other.test');
      await src.delDomain('other.test'); // a gap in the ids
      await src.addDomain('third.test');
      const u = await src.addUser('alice@example.test', '{BLF-CRYPT}$2y$05$abc', 'n1');
      await src.casAllocation(u.id, u.version, 'n1', ALLOC);
      await src.casMoving(u.id, u.version + 1, 'n3');
      await src.addUser('bob@third.test', null, null);
      await src.setState('bob@third.test', 'disabled');
      await src.setSetting({ scope: 'global', name: null }, 'mailstore', 'format', 'maildir', ['override']);
      await src.setSetting({ scope: 'domain', name: 'third.test' }, 'vacation', '*', null, ['ignore']);
      await src.setSetting({ scope: 'user', name: 'alice@example.test' }, 'forward', 'to', ['x@y.test'], []);
      await src.registerSelf(ME, { heartbeat: true });
      await src.announceCertificate('n1', 'AA:02', '2031-01-01T00:00:00Z');
      await src.registerSelf({ ...ME, name: 'n2', fingerprint: 'BB:01' }, { heartbeat: false });
      await src.removeNode('n2');
      const dump = await src.dump();
      t.same(
        dump.map((d) => [d.table, d.rows.length]),
        [
          ['domains', 2],
          ['users', 2],
          ['settings', 3],
          ['nodes', 1],
          ['revoked', 1],
        ],
      );
      t.same(Object.keys(dump.find((d) => d.table === 'users')?.rows[0] ?? {}).sort(), ['address', 'allocation', 'created', 'domain_id', 'home', 'id', 'moving_to', 'password', 'state', 'version']);
      t.same(Object.keys(dump.find((d) => d.table === 'nodes')?.rows[0] ?? {}).sort(), ['cert_expires', 'fingerprint', 'last_seen', 'name', 'next_fingerprint', 'peer_address', 'state']);

      const dst = await (await f.fresh(t)).open();
      await dst.load(dump);
      t.same(await dst.dump(), dump, 'the copy dumps the same, row for row');
      t.match(await dst.lookup('alice@example.test'), { user: { password: '{BLF-CRYPT}$2y$05$abc', allocation: ALLOC, movingTo: 'n3' }, rows: [{}, {}] });
      t.equal(await code(dst.registerSelf({ ...ME, name: 'n2', fingerprint: 'BB:01' }, { heartbeat: false })), 'NODE_REMOVED', 'revocations copied');
      const d = await dst.addDomain('new.test');
      t.equal(d, 'new.test', 'ids continue after the copied ones');
      const maxId = Math.max(...(dump.find((x) => x.table === 'domains')?.rows.map((r) => Number(r['id'])) ?? [0]));
      const newId = (await dst.addUser('n@new.test', null, null)).domainId;
      t.ok(newId > maxId, `new domain id ${newId} > copied ${maxId}`);
      t.equal(await code(dst.load(dump)), 'DUPLICATE', 'a non-empty database is refused');
      const other = await (await f.fresh(t)).open();
      const broken = dump.map((x) => (x.table === 'users' ? { ...x, rows: [{ ...x.rows[0], extra: 1 }] } : x));
      t.equal(await code(other.load(broken)), 'INVALID_VALUE', 'an unknown column is refused');
      t.same(
        (await other.dump()).map((x) => x.rows.length),
        [0, 0, 0, 0, 0],
        'and nothing was loaded',
      );
    });

    t.test('schemaStatus and migrate: two migrators at once, one does the work', async (t) => {
      const fr = await f.fresh(t, { migrated: false });
      const a = await fr.open();
      const b = await fr.open();
      const before = await a.schemaStatus();
      t.ok(before.minUsable <= before.latest && before.minUsable >= 1, 'minUsable ≤ latest');
      const [ra, rb] = await Promise.all([a.migrate(), b.migrate()]);
      t.equal(ra.to, before.latest);
      t.equal(rb.to, before.latest);
      const worked = [ra, rb].filter((r) => r.from < r.to);
      t.ok(worked.length <= 1, 'at most one migrator applied anything');
      if (before.version === 0) t.equal(worked.length, 1, 'from an empty database, exactly one did');
      t.same(await b.schemaStatus(), { version: before.latest, minUsable: before.minUsable, latest: before.latest });
      t.same(await a.migrate(), { from: before.latest, to: before.latest }, 'nothing left to do');
      await a.addDomain('works.test');
    });
  });
}
