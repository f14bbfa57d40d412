// Allocation under the `cas` creator when another node wins between two reads: node B reads the
// new user (no home), node A then allocates it, and B must not overwrite A's allocation with a
// compare-and-set against the newer version it reads afterwards (that stored mail on both nodes:
// scripts/bench-db.mjs's 30-way race saw 27/3 and 16/14 splits on SQLite and PostgreSQL). The
// interleaving is made exact with a real SQLite store whose second user read first lets A win.
import t, { type Test } from 'tap';
import { join } from 'node:path';
import { mkdirSync, chownSync, chmodSync, existsSync, writeFileSync } from 'node:fs';
import { openStore, type Store, type UserRecord } from '../src/store.js';
import { placeUser } from '../src/allocation.js';
import { LocalWriter } from '../src/writer/local-writer.js';
import { resolveMailUser, type MailUser } from '../src/mailuser.js';
import { resolve } from '../src/resolve.js';
import { scratchDir } from './helpers/instance.js';

/** A scratch directory with node B's mail root (owned by the mail user) and a SQLite store with example.test. */
async function nodeB(t: Test): Promise<{ dir: string; mailUser: MailUser; store: Store }> {
  const dir = scratchDir(t);
  const mailUser = resolveMailUser('mail');
  chmodSync(dir, 0o755);
  mkdirSync(join(dir, 'B'));
  chownSync(join(dir, 'B'), mailUser.uid, mailUser.gid);
  const store = await openStore(`sqlite:${join(dir, 'pigeon.db')}`, { create: true });
  t.teardown(() => store.close());
  await store.addDomain('example.test');
  return { dir, mailUser, store };
}

t.test('cas: another node allocating between two reads is not overwritten', async (t) => {
  const { dir, mailUser, store } = await nodeB(t);
  const user = await store.addUser('race@example.test', null, null);
  const aAllocation = { format: 'maildir' as const, path: join(dir, 'A', 'example.test', 'race'), node: 'A' };
  let reads = 0;
  let aWon: boolean | null = null;
  // node B's view of the store: before its second read of the user, node A allocates the user
  const viewOfB = new Proxy(store, {
    get(target, prop, receiver) {
      const v: unknown = Reflect.get(target, prop, receiver);
      if (prop !== 'mustUser' || typeof v !== 'function') return typeof v === 'function' ? v.bind(target) : v;
      return async (address: string): Promise<UserRecord> => {
        if (++reads === 2 && aWon === null) {
          const seen = await target.mustUser(address);
          aWon = await target.casAllocation(seen.id, seen.version, 'A', aAllocation);
        }
        return target.mustUser(address);
      };
    },
  }) as Store;
  const config = resolve([
    { scope: 'global', module: 'mailstore', key: 'creator', value: 'cas', flags: [] },
  ]);
  const p = await placeUser({ store: viewOfB, node: 'B', mailRoot: join(dir, 'B'), mailUser }, user, config);
  const row = await store.mustUser('race@example.test');
  if (aWon === true) {
    t.same(p, { kind: 'remote', node: 'A', allocation: aAllocation, user: row }, 'A won first: B delivers to A');
    t.equal(row.home, 'A', 'and the database still says A');
  } else {
    t.equal(p.kind, 'local', 'B won first');
    t.equal(row.home, 'B');
  }
  t.equal(row.home === 'A' ? 'A' : 'B', p.kind === 'remote' ? p.node : 'B', 'the placement B acts on is the one the database holds');
});

t.test('cas: many first deliveries at once in one process allocate once, none fails', async (t) => {
  const { dir, mailUser, store } = await nodeB(t);
  const config = resolve([{ scope: 'global', module: 'mailstore', key: 'creator', value: 'cas', flags: [] }]);
  const ctx = { store, node: 'B', mailRoot: join(dir, 'B'), mailUser };
  for (let round = 0; round < 5; round++) {
    const user = await store.addUser(`u${round}@example.test`, null, null);
    const got = await Promise.allSettled(Array.from({ length: 20 }, () => placeUser(ctx, user, config)));
    const failed = got.filter((g) => g.status === 'rejected').map((g) => String((g as PromiseRejectedResult).reason));
    t.same(failed, [], `round ${round}: all 20 placed`);
    const paths = new Set(got.map((g) => (g.status === 'fulfilled' && g.value.kind === 'local' ? g.value.allocation.path : '?')));
    t.same([...paths], [(await store.mustUser(user.address)).allocation?.path], 'one mailbox, the recorded one');
  }
});

t.test('a discard removes what is left of a partly made mailbox, and never a mailbox holding mail', async (t) => {
  const dir = scratchDir(t);
  const root = join(dir, 'B');
  const w = new LocalWriter();
  // what a racing create leaves when another discarder was a step ahead: cur/ only
  const partial = join(root, 'example.test', 'partial');
  mkdirSync(join(partial, 'cur'), { recursive: true });
  await w.discardEmpty({ format: 'maildir', path: partial }, root);
  t.notOk(existsSync(partial), 'a maildir with only cur/ is removed');
  // new/ and tmp/ only (cur/ already removed by another discarder)
  mkdirSync(join(partial, 'new'), { recursive: true });
  mkdirSync(join(partial, 'tmp'));
  await w.discardEmpty({ format: 'maildir', path: partial }, root);
  t.notOk(existsSync(partial), 'a maildir without cur/ is removed');
  const full = join(root, 'example.test', 'full');
  for (const d of ['cur', 'new', 'tmp']) mkdirSync(join(full, d), { recursive: true });
  writeFileSync(join(full, 'new', '1.msg'), 'Subject: kept\r\n\r\nx\r\n');
  await w.discardEmpty({ format: 'maildir', path: full }, root);
  t.ok(existsSync(join(full, 'new', '1.msg')), 'a maildir holding a message is left as it is');
  await w.discardEmpty({ format: 'maildir', path: join(root, 'example.test', 'never') }, root);
  t.pass('a mailbox that is not there: nothing to do, no error');
});
