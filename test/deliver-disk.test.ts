// pigeon deliver when the disk or the database fails it: a full disk and a read-only mail root
// (real tmpfs mounts) and a locked database each end in a temporary failure (75) within their
// bounds, with nothing partial left behind.
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { mkdirSync, chownSync, writeFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { hold, release } from './helpers/reaper.js';
import { cli, cliAsync, makeInstance, files, msg, MAIL_UID, MAIL_GID } from './helpers/delivery-env.js';
import { scratchDir } from './helpers/instance.js';

const ALICE = 'alice@example.test';

function mountTmpfs(t: { teardown: (fn: () => void) => void }, dir: string, size: string): void {
  mkdirSync(dir, { recursive: true });
  const r = spawnSync('mount', ['-t', 'tmpfs', '-o', `size=${size},mode=0770`, 'tmpfs', dir]);
  if (r.status !== 0) throw new Error(`mount tmpfs on ${dir} failed (tests run as root; need CAP_SYS_ADMIN): ${r.stderr.toString()}`);
  // unmounted and removed even when tap kills this file
  hold('mount', dir);
  hold('dir', dir);
  t.teardown(() => {
    spawnSync('umount', ['-l', dir]);
    rmSync(dir, { recursive: true, force: true });
    release('mount', dir);
    release('dir', dir);
  });
  chownSync(dir, MAIL_UID, MAIL_GID);
}

t.test('disk full (1 MB tmpfs): 75 / 4.3.1, nothing in new/; read-only mail root: 75 / 4.3.0', async (t) => {
  const dir = scratchDir(t);
  // the mount point lives outside the test dir: tap removes that before teardowns run
  const mnt = mkdtempSync(join(tmpdir(), 'pigeon-tmpfs-'));
  mountTmpfs(t, mnt, '1m');
  const inst = makeInstance(dir);
  // mail_root is already in pigeon.yaml: override it through a conf.d drop-in
  writeFileSync(join(inst, 'conf.d', '50-mailroot.yaml'), `mail_root: ${JSON.stringify(mnt)}\n`);
  t.equal(cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg({ subject: 'small' })).code, 0, 'a small message fits');
  const box = join(mnt, 'example.test', 'alice');
  const big = msg({ body: `${'x'.repeat(99)}\n`.repeat(20_000) }); // 2 MB
  const r = cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], big);
  t.equal(r.code, 75, r.stdout);
  t.match(r.stdout, /^4\.3\.1 Mail system full/);
  t.equal(files(join(box, 'new')).length, 1, 'only the small message');
  t.equal(files(join(box, 'tmp')).length, 0, 'the partial file was removed');
  const ro = spawnSync('mount', ['-o', 'remount,ro', mnt]);
  t.equal(ro.status, 0, 'remounted read-only');
  const r2 = cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg({ subject: 'ro' }));
  t.equal(r2.code, 75, r2.stdout);
  t.match(r2.stdout, /^4\.3\.0 Mailbox not writable .*EROFS/);
  // a brand-new user on a read-only root: allocation fails → 75 too
  cli(inst, ['user', 'add', 'new@example.test', '--password-stdin'], 'x\n');
  const r3 = cli(inst, ['deliver', '-f', 'bob@remote.test', 'new@example.test'], msg());
  t.equal(r3.code, 75, r3.stdout);
});

t.test('database locked: waits within the bound, then 75', async (t) => {
  const inst = makeInstance(scratchDir(t), [ALICE, 'fresh@example.test']);
  t.equal(cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg()).code, 0, 'alice allocated (first mail) before the lock');
  const db = new Database(join(inst, 'pigeon.db'));
  db.pragma('busy_timeout = 100');
  db.prepare('BEGIN IMMEDIATE').run();
  db.prepare("UPDATE users SET version = version WHERE address = 'nobody'").run();
  t.teardown(() => {
    if (db.inTransaction) db.prepare('ROLLBACK').run();
    db.close();
  });
  // an allocated user only reads: WAL readers are not blocked by a writer
  const b0 = Date.now();
  t.equal(cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg()).code, 0, 'an allocated user is delivered while a writer holds the lock');
  const unlocked = Date.now() - b0;
  const t0 = Date.now();
  const r = await cliAsync(inst, ['deliver', '-f', 'bob@remote.test', 'fresh@example.test'], msg());
  const took = Date.now() - t0;
  t.equal(r.code, 75, r.stdout);
  t.match(r.stdout, /^4\.\d\.\d /);
  // what a delivery takes without waiting (process start-up: seconds under load) + the 5 s
  // busy timeout, with room for the load to change between the two runs
  t.ok(took >= 4000 && took < unlocked + 5000 + 20_000, `waited for the busy timeout, then gave up (${took} ms; ${unlocked} ms without a wait)`);
  db.prepare('ROLLBACK').run();
  t.equal(cli(inst, ['deliver', '-f', 'bob@remote.test', 'fresh@example.test'], msg()).code, 0, 'succeeds once the lock is gone');
  t.equal(cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg()).code, 0);
});
