// `pigeon pw` (Dovecot verifies every scheme), `user import passwd-file` (hashes kept byte for
// byte, bad entries refused with file:line), and `user rename / del [--purge]` with domain
// rename, on a fresh instance with alice@example.test.
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { chownSync, existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { openStore, type Allocation } from '../src/store.js';
import { SCHEMES } from '../auth/schemes.js';
import { adminInstance, NODE, run, runAll, json, dovecotVerifies, storedHash, userCount, allocate, type Run } from './helpers/admin-cli.js';
import { scratchDir } from './helpers/instance.js';

// tap's per-file timeout for this file: it ran 44 s alone on a lightly loaded machine, and two
// suites at once on 2 cores make a file take 2-3 times as long (the default is 180 s, .taprc)
t.setTimeout(240_000);

const { dir: inst, db, C } = adminInstance(t);

type Explained = Record<string, { value: unknown; from: string; ignored: { from: string; value: unknown }[] }>;

t.test('pw -s SCHEME: Dovecot verifies every hash', async (t) => {
  const pw = 'Zürich-pa55 wörd';
  const rs = await runAll([...SCHEMES.map((s) => [['pw', '-s', s], `${pw}\n`] as const), [['pw'], 'x\n'], [['pw', '-s', 'MD5-CRYPT'], 'x\n']]);
  SCHEMES.forEach((s, i) => {
    const r = rs[i] as Run;
    t.equal(r.code, 0, `pw -s ${s} exits 0`);
    const hash = r.out.trim();
    t.ok(hash.startsWith(`{${s}}`), `${s}: printed as {${s}}...`);
    t.ok(dovecotVerifies(hash, pw), `${s}: doveadm pw -t verifies it`);
    t.notOk(dovecotVerifies(hash, `${pw}x`), `${s}: doveadm refuses a wrong password`);
    if (s === 'PLAIN') t.match(r.err, /warning/, 'PLAIN is warned as unsafe');
  });
  t.match(rs[SCHEMES.length]?.out, /^\{ARGON2ID\}/, 'default scheme ARGON2ID');
  t.equal(rs[SCHEMES.length + 1]?.code, 64, 'unknown scheme exits 64');
});

t.test('user import passwd-file: hashes kept; bad entries refused with file:line, nothing imported', async (t) => {
  const dir = scratchDir(t);
  const dove = (s: string, p: string): string => spawnSync('doveadm', ['pw', '-s', s, '-p', p], { encoding: 'utf8' }).stdout.trim();
  const carol = dove('SHA512-CRYPT', 'carol-pw');
  const dave = dove('BLF-CRYPT', 'dave-pw');
  const erin = dove('SSHA256', 'erin-pw');
  const before = userCount(db);

  const md5 = join(dir, 'md5.passwd');
  writeFileSync(md5, `carol@example.test:${carol}::::::\n# a comment\n\nfrank@example.test:{MD5-CRYPT}$1$abcdefgh$0123456789abcdefghijkl::::::\n`);
  const cost = join(dir, 'cost.passwd');
  writeFileSync(cost, `carol@example.test:${carol}\ndave@example.test:${dave.replace(/\$2y\$\d\d\$/, '$2y$20$')}\n`);
  const clash = join(dir, 'clash.passwd');
  writeFileSync(clash, `carol@example.test:${carol}\nalice@example.test:${erin}\n`);
  // the file is read as bytes: a user name that is not UTF-8 is refused by file:line, and a hash
  // keeps its exact bytes, so one that is not ASCII ({SCHEME} strings are) is refused too
  const latin1Name = join(dir, 'latin1-name.passwd');
  writeFileSync(latin1Name, Buffer.concat([Buffer.from(`carol@example.test:${carol}\n`), Buffer.from('b'), Buffer.from([0xe9]), Buffer.from(`a@example.test:${erin}\n`)]));
  const latin1Hash = join(dir, 'latin1-hash.passwd');
  writeFileSync(latin1Hash, Buffer.concat([Buffer.from(`carol@example.test:${carol}\n# \n`), Buffer.from('pia@example.test:{PLAIN}p'), Buffer.from([0xe4]), Buffer.from('ss::::::\n')]));
  const utf8Hash = join(dir, 'utf8-hash.passwd');
  writeFileSync(utf8Hash, `ute@example.test:{PLAIN}pässwörd\n`);
  const [r1, r2, r3, r4, n1, n2, n3] = await runAll([
    [[...C, 'user', 'import', 'passwd-file', md5]],
    [[...C, 'user', 'import', 'passwd-file', cost]],
    [[...C, 'user', 'import', 'passwd-file', clash]],
    [[...C, 'user', 'import', 'passwd-file', join(dir, 'missing')]],
    [[...C, 'user', 'import', 'passwd-file', latin1Name]],
    [[...C, 'user', 'import', 'passwd-file', latin1Hash]],
    [[...C, 'user', 'import', 'passwd-file', utf8Hash]],
  ]);
  t.equal(n1?.code, 65, `a user name that is not UTF-8 exits 65 ${n1?.err}`);
  t.match(n1?.err, `${latin1Name}:2: the user name is not valid UTF-8`, 'names file:line and why');
  t.equal(n2?.code, 65, `a hash with a byte that is not ASCII exits 65 (it was stored with U+FFFD in its place) ${n2?.err}`);
  t.match(n2?.err, `${latin1Hash}:3: pia@example.test: the password hash is not printable ASCII`);
  t.notMatch(n2?.err, /ss::/, 'the hash is not shown');
  t.equal(n3?.code, 65, `a UTF-8 hash is refused too ${n3?.err}`);
  t.match(n3?.err, `${utf8Hash}:1: ute@example.test: the password hash is not printable ASCII`);
  t.equal(r1?.code, 65, 'unknown scheme exits 65');
  t.match(r1?.err, `${md5}:4:`, 'names file:line');
  t.match(r1?.err, '{MD5-CRYPT}', 'names the scheme');
  t.notMatch(r1?.err, /0123456789abcdefghijkl/, 'not the hash');
  t.equal(r2?.code, 65, 'absurd cost exits 65');
  t.match(r2?.err, `${cost}:2:`, 'names file:line');
  t.match(r2?.err, /cost 20/);
  t.equal(r3?.code, 73, 'an existing user exits 73');
  t.equal(r4?.code, 78, 'a missing file exits 78');
  t.equal(userCount(db), before, 'nothing imported (all or nothing: not even carol, line 1)');

  const good = join(dir, 'good.passwd');
  // bytes after the hash are not read: a Latin-1 gecos field does not matter
  writeFileSync(good, Buffer.concat([Buffer.from(`# Dovecot passwd-file\ncarol@example.test:${carol}:1000:1000:J`), Buffer.from([0xfc]), Buffer.from(`rgen:/home/carol::\ndave:${dave}::::::\nerin:${erin}\n`)]));
  const r5 = run([...C, 'user', 'import', 'passwd-file', good, '--domain', 'example.test']);
  t.equal(r5.code, 0, `import exits 0 ${r5.err}`);
  t.match(r5.out, /imported 3 user/);
  t.equal(storedHash(db, 'carol@example.test'), carol, 'SHA512-CRYPT hash kept as it is');
  t.equal(storedHash(db, 'dave@example.test'), dave, 'BLF-CRYPT hash kept as it is');
  t.equal(storedHash(db, 'erin@example.test'), erin, 'SSHA256 hash kept as it is');
  t.equal(run([...C, 'auth', 'test', 'dave@example.test'], 'dave-pw\n').code, 0, 'an imported user logs in with the old password');
});

t.test('rename keeps settings, password and allocation; delete leaves or purges the mailbox', async (t) => {
  t.same(
    (
      await runAll([
        [[...C, 'user', 'add', 'ren@example.test', '--password-stdin'], 'ren-pw\n'],
        [[...C, 'user', 'add', 'pur@example.test', '--password-stdin'], 'x\n'],
        [[...C, 'domain', 'add', 'old.test']],
      ])
    ).map((r) => r.code),
    [0, 0, 0],
  );
  t.same(
    (
      await runAll([
        [[...C, 'config', 'set', '--user', 'ren@example.test', 'vacation.days', '11']],
        [[...C, 'user', 'add', 'dora@old.test', '--password-stdin'], 'dora-pw\n'],
        [[...C, 'config', 'set', '--domain', 'old.test', 'imap.backend', 'courier']],
      ])
    ).map((r) => r.code),
    [0, 0, 0],
  );
  t.equal(run([...C, 'config', 'set', '--user', 'dora@old.test', 'vacation.days', '12']).code, 0);
  const mbox = join(inst, 'mail', 'example.test', 'ren');
  mkdirSync(join(mbox, 'cur'), { recursive: true });
  writeFileSync(join(mbox, 'cur', '1700000000.M1P1.host:2,S'), 'Subject: hi\n\nkeep me\n');
  await allocate(db, 'ren@example.test', { format: 'maildir', path: mbox });
  const before = { home: NODE, allocation: { format: 'maildir', path: mbox } };

  const [r, dr] = await runAll([[[...C, 'user', 'rename', 'ren@example.test', 'renamed@example.test']], [[...C, 'domain', 'rename', 'old.test', 'new.test']]]);
  t.equal(r?.code, 0);
  t.match(r?.out, mbox, 'says the mailbox stays where it is');
  t.equal(dr?.code, 0, 'domain rename');
  const [oldShow, newShow, cfgR, login, onto, intoMissing, doraCfg, doraLogin] = await runAll([
    [[...C, 'user', 'show', 'ren@example.test', '--json']],
    [[...C, 'user', 'show', 'renamed@example.test', '--json']],
    [[...C, 'config', 'show', 'renamed@example.test', '--explain', '--json']],
    [[...C, 'auth', 'test', 'renamed@example.test'], 'ren-pw\n'],
    [[...C, 'user', 'rename', 'renamed@example.test', 'alice@example.test']],
    [[...C, 'user', 'rename', 'renamed@example.test', 'x@nosuch.test']],
    [[...C, 'config', 'show', 'dora@new.test', '--explain', '--json']],
    [[...C, 'auth', 'test', 'dora@new.test'], 'dora-pw\n'],
  ]);
  t.equal(oldShow?.code, 67, 'old address gone');
  const after = json(newShow as Run) as { home: string; allocation: Allocation };
  t.same(after.allocation, before.allocation, 'allocation kept');
  t.equal(after.home, before.home, 'home kept');
  t.match((json(cfgR as Run) as Explained)['vacation.days'], { value: 11, from: 'user' }, 'user setting kept');
  t.equal(login?.code, 0, 'password kept');
  t.equal(onto?.code, 73, 'rename onto an existing user exits 73');
  t.equal(intoMissing?.code, 67, 'rename into a missing domain exits 67');
  const dora = json(doraCfg as Run) as Explained;
  t.match(dora['imap.backend'], { value: 'courier', from: 'domain' }, 'domain rename: domain setting kept');
  t.match(dora['vacation.days'], { value: 12, from: 'user' }, 'domain rename: user setting kept');
  t.equal(doraLogin?.code, 0, 'dora logs in under the new domain');

  // delete without --purge: the mailbox stays, and the output says where
  const pbox = join(inst, 'mail', 'example.test', 'pur');
  mkdirSync(join(pbox, 'new'), { recursive: true });
  writeFileSync(join(pbox, 'new', '1700000001.M2P2.host'), 'Subject: bye\n\n');
  // owned by the mail user, as the mail writer makes them: purge runs as that user
  for (const p of [join(inst, 'mail', 'example.test'), pbox, join(pbox, 'new'), join(pbox, 'new', '1700000001.M2P2.host')]) chownSync(p, 8, 8);
  await allocate(db, 'pur@example.test', { format: 'maildir', path: pbox });
  const [del, purge, dd] = await runAll([
    [[...C, 'user', 'del', 'renamed@example.test']],
    [[...C, 'user', 'del', 'pur@example.test', '--purge']],
    [[...C, 'domain', 'del', 'new.test']],
  ]);
  t.equal(del?.code, 0);
  t.match(del?.out, mbox, 'says where the mailbox is');
  t.match(del?.out, /holds mail/);
  t.ok(existsSync(join(mbox, 'cur', '1700000000.M1P1.host:2,S')), 'the mail is still there');
  // delete with --purge: the mailbox is gone
  t.equal(purge?.code, 0);
  t.match(purge?.out, /purged/);
  t.notOk(existsSync(pbox), 'mailbox removed');
  t.ok(existsSync(mbox), 'the other mailbox is untouched');
  // a domain with users cannot be deleted
  t.equal(dd?.code, 65, 'domain del while users exist exits 65');
  t.match(dd?.err, /still has 1 user/);

  const store = await openStore(db);
  t.equal(await store.getUser('renamed@example.test'), null, 'the deleted user is gone');
  t.equal(await store.getUser('pur@example.test'), null, 'the purged user is gone');
  t.equal(await store.lookup('renamed@example.test'), null, 'with its settings');
  t.ok((await store.getUser('dora@new.test'))?.password, 'the refused domain del left its user intact');
  await store.close();
  t.equal(run([...C, 'user', 'del', 'dora@new.test']).code, 0);
  t.equal(run([...C, 'domain', 'del', 'new.test']).code, 0, 'empty now: deleted');
  t.equal(run([...C, 'user', 'del', 'dora@new.test']).code, 67, 'deleting a missing user exits 67');
});
