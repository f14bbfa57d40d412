// `pigeon user del --purge` (run as root, as admins do) removes the mailbox through the mail
// writer: as the mail user, following no link. A mail root in which a directory on the way was
// replaced by a symbolic link (anyone who can write there could do it) never makes root delete
// outside the mail root; a link inside the mailbox is removed, not followed.
import t from 'tap';
import { existsSync, mkdirSync, readdirSync, renameSync, symlinkSync, writeFileSync, chownSync, lstatSync } from 'node:fs';
import { join } from 'node:path';
import { cli, makeInstance, maildirOf, msg, files, MAIL_UID, MAIL_GID } from './helpers/delivery-env.js';
import { scratchDir } from './helpers/instance.js';

// tap's per-file timeout for this file: it ran 28 s alone on a lightly loaded machine, and two
// suites at once on 2 cores make a file take 2-3 times as long (the default is 180 s, .taprc)
t.setTimeout(240_000);

const ALICE = 'alice@example.test';
const BOB = 'bob@example.test';

/** A directory tree outside the mail root owned by the mail user: even the mail user could delete it. */
function mailUserTree(dir: string): string {
  mkdirSync(join(dir, 'cur'), { recursive: true });
  writeFileSync(join(dir, 'cur', 'precious'), 'not mail, not to be deleted\n');
  for (const p of [dir, join(dir, 'cur'), join(dir, 'cur', 'precious')]) chownSync(p, MAIL_UID, MAIL_GID);
  return join(dir, 'cur', 'precious');
}

t.test('a domain directory replaced by a symlink: purge refuses (74), nothing outside the mail root is deleted', async (t) => {
  const dir = scratchDir(t);
  const inst = makeInstance(dir, [ALICE, BOB]);
  t.equal(cli(inst, ['deliver', '-f', 'carol@remote.test', ALICE], msg({ subject: 'for alice' })).code, 0, 'a delivery creates the mailbox');
  const box = maildirOf(inst, ALICE);
  // the domain directory moves out of the mail root and a link takes its place
  const outside = join(dir, 'outside');
  mkdirSync(outside);
  chownSync(outside, MAIL_UID, MAIL_GID);
  renameSync(join(inst, 'mail', 'example.test'), join(outside, 'example.test'));
  symlinkSync(join(outside, 'example.test'), join(inst, 'mail', 'example.test'));
  const r = cli(inst, ['user', 'del', ALICE, '--purge']);
  t.equal(r.code, 74, `exit 74 (EX_IOERR) ${r.stdout}${r.stderr}`);
  t.match(r.stderr, new RegExp(`pigeon: error: user ${ALICE} deleted; mailbox ${box.replace(/[.]/g, '\\.')} not purged: .*symbolic link`), 'one line that says the user is gone, the mailbox is not, and why');
  t.equal(files(join(outside, 'example.test', 'alice', 'new')).length, 1, 'the mail behind the link is still there');
  t.equal(cli(inst, ['user', 'show', ALICE]).code, 67, 'the user is deleted');
});

t.test('links inside a mailbox are removed, not followed; the mailbox itself as a link is refused', async (t) => {
  const dir = scratchDir(t);
  const inst = makeInstance(dir, [ALICE, BOB]);
  for (const u of [ALICE, BOB]) t.equal(cli(inst, ['deliver', '-f', 'carol@remote.test', u], msg({ to: u })).code, 0, `${u}: mailbox created`);
  const precious = mailUserTree(join(dir, 'elsewhere'));
  const box = maildirOf(inst, ALICE);
  // what a user could plant in their own mailbox (a Maildir++ folder that is a link)
  symlinkSync(join(dir, 'elsewhere'), join(box, '.Linked'));
  symlinkSync(precious, join(box, 'cur', 'linked-file'));
  const r = cli(inst, ['user', 'del', ALICE, '--purge']);
  t.equal(r.code, 0, r.stderr);
  t.match(r.stdout, `mailbox ${box} purged`);
  t.notOk(existsSync(box), 'the mailbox is gone');
  t.ok(existsSync(precious), 'what the links pointed to is still there');
  t.same(readdirSync(join(dir, 'elsewhere', 'cur')), ['precious'], 'and nothing beside it was removed');

  // bob's mailbox itself replaced by a link to a tree elsewhere
  const bobBox = maildirOf(inst, BOB);
  const other = join(dir, 'bob-elsewhere');
  renameSync(bobBox, other);
  symlinkSync(other, bobBox);
  const r2 = cli(inst, ['user', 'del', BOB, '--purge']);
  t.equal(r2.code, 74, r2.stderr);
  t.match(r2.stderr, /not purged: .* is a symbolic link/);
  t.equal(files(join(other, 'new')).length, 1, 'the mail in the linked tree is kept');
  t.ok(lstatSync(bobBox).isSymbolicLink(), 'the link is left for the admin to look at');
});

t.test('purge runs as the mail user: what only root could remove stays, and the error says so', async (t) => {
  const dir = scratchDir(t);
  const inst = makeInstance(dir, [ALICE]);
  t.equal(cli(inst, ['deliver', '-f', 'carol@remote.test', ALICE], msg()).code, 0);
  const box = maildirOf(inst, ALICE);
  // a directory root made inside the mailbox, mode 0755: the mail user cannot empty it
  mkdirSync(join(box, 'root-only'), { mode: 0o755 });
  writeFileSync(join(box, 'root-only', 'file'), 'x');
  const p = cli(inst, ['user', 'del', ALICE, '--purge']);
  t.equal(p.code, 74, p.stderr);
  t.match(p.stderr, /not purged: .*EACCES/, 'permission denied: the removal did not run as root');
  t.ok(existsSync(join(box, 'root-only', 'file')), 'the root-owned file is still there');
});
