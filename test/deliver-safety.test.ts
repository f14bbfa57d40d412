// Delivery as root never writes as root and never follows a link (issue #12 items 1, 6, 7):
// a user's mbox replaced by a symlink or a hard link to a root-owned file, a symlinked tmp/, new/
// or maildirsize, through `pigeon deliver` run as root and LMTP to a real `pigeon serve` (root);
// mbox deliveries honour a real fcntl lock (python3 fcntl.lockf, as Dovecot's fcntl lock) with a
// bounded wait; Maildir tmp/ leftovers older than 36 hours are removed, at most once an hour.
import t, { type Test } from 'tap';
import net from 'node:net';
import { writeFileSync, readFileSync, symlinkSync, linkSync, unlinkSync, statSync, lstatSync, mkdirSync, utimesSync, renameSync, existsSync, chownSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { cli, cliAsync, ok, makeInstance, setUser, maildirOf, files, msg, dovecotRead, startServe, MAIL_UID, MAIL_GID } from './helpers/delivery-env.js';
import { Dialog, dataOf } from './helpers/delivery-lmtp.js';
import { spawn } from 'node:child_process';
import { owned } from './helpers/reaper.js';
import { scratchDir } from './helpers/instance.js';

// tap's per-file timeout for this file: it ran 50 s alone on a lightly loaded machine, and two
// suites at once on 2 cores make a file take 2-3 times as long (the default is 180 s, .taprc)
t.setTimeout(300_000);

const ALICE = 'alice@example.test';
const BOB = 'bob@example.test';

/** A root-owned 0600 file outside the mail root: what an attacker would like root to append to. */
function rootFile(path: string, text = 'root:only:secret\n'): Buffer {
  const content = Buffer.from(text);
  writeFileSync(path, content, { mode: 0o600 });
  chownSync(path, 0, 0);
  return content;
}

function unchanged(t: Test, path: string, content: Buffer, what: string): void {
  t.same(readFileSync(path), content, `${what}: the root-owned file is unchanged`);
  const st = statSync(path);
  t.equal(st.uid, 0, `${what}: still owned by root`);
  t.equal(st.mode & 0o777, 0o600, `${what}: still 0600`);
}

function allocationOf(inst: string, user: string): { format: string; path: string } {
  return (JSON.parse(ok(cli(inst, ['user', 'show', user, '--json']), 'user show').stdout) as { allocation: { format: string; path: string } }).allocation;
}

/** Wait until `get()` matches (a log line, a file): checks on every poll, gives up after `ms`. */
async function until(what: string, get: () => string, re: RegExp, ms = 60_000): Promise<string> {
  const end = Date.now() + ms;
  for (;;) {
    const s = get();
    if (re.test(s)) return s;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what} (${re}): ${s.slice(-2000)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

const readOr = (p: string): string => (existsSync(p) ? readFileSync(p, 'latin1') : '');

t.test('pigeon deliver as root: an mbox that is a symlink or a hard link to a root file is refused (4.2.0), never appended to', async (t) => {
  const dir = scratchDir(t);
  const inst = makeInstance(dir);
  setUser(inst, ALICE, 'mailstore.format', 'mbox');
  t.equal(cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg({ subject: 'first' })).code, 0, 'first mail allocates the mbox');
  const mbox = allocationOf(inst, ALICE).path;
  t.equal(statSync(mbox).uid, MAIL_UID, 'the mbox was created by the mail user');
  const target = join(dir, 'root-only');
  const content = rootFile(target);

  unlinkSync(mbox);
  symlinkSync(target, mbox);
  let r = cli(inst, ['deliver', '-f', 'evil@remote.test', ALICE], msg({ subject: 'via symlink', body: 'attacker text\n' }));
  t.equal(r.code, 75, `symlink: deferred, Postfix retries: ${r.stdout}`);
  t.match(r.stdout, /^4\.2\.0 Mailbox unsafe, not delivering \(open mbox: .*alice\.mbox is a symbolic link\)\n$/);
  unchanged(t, target, content, 'symlink');

  unlinkSync(mbox);
  linkSync(target, mbox);
  t.equal(statSync(target).nlink, 2);
  r = cli(inst, ['deliver', '-f', 'evil@remote.test', ALICE], msg({ subject: 'via hard link', body: 'attacker text\n' }));
  t.equal(r.code, 75, `hard link to a root file: deferred (the mail user cannot even open it): ${r.stdout}`);
  t.match(r.stdout, /^4\.\d\.\d /);
  unchanged(t, target, content, 'hard link');
  // a hard link to a file the mail user may write (another user's mailbox) is refused by its link count
  const other = join(dir, 'someone-elses-mbox');
  const otherContent = Buffer.from('From x Thu Jan  1 00:00:00 2026\nSubject: private\n\nmine\n\n');
  writeFileSync(other, otherContent, { mode: 0o600 });
  chownSync(other, MAIL_UID, MAIL_GID);
  unlinkSync(mbox);
  linkSync(other, mbox);
  r = cli(inst, ['deliver', '-f', 'evil@remote.test', ALICE], msg({ subject: 'via hard link', body: 'attacker text\n' }));
  t.equal(r.code, 75, `hard link to a mail-user file: deferred: ${r.stdout}`);
  t.match(r.stdout, /^4\.2\.0 Mailbox unsafe, not delivering \(open mbox: .*alice\.mbox has 2 hard links\)/);
  t.same(readFileSync(other), otherContent, 'hard link: the other mailbox is unchanged');

  // a dangling symlink: creating the mailbox must not create the file it points to
  unlinkSync(mbox);
  const nowhere = join(dir, 'created-by-root');
  symlinkSync(nowhere, mbox);
  r = cli(inst, ['deliver', '-f', 'evil@remote.test', ALICE], msg({ subject: 'dangling' }));
  t.equal(r.code, 75, `dangling symlink: deferred: ${r.stdout}`);
  t.match(r.stdout, /^4\.2\.0 Mailbox unsafe/);
  t.notOk(existsSync(nowhere), 'the link target was not created');

  // the admin removes the link: the next delivery recreates the mbox, as the mail user
  unlinkSync(mbox);
  t.equal(cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg({ subject: 'after' })).code, 0);
  t.equal(lstatSync(mbox).isFile(), true);
  t.equal(statSync(mbox).uid, MAIL_UID, 'recreated by the mail user');
  t.notOk(existsSync(`${mbox}.lock`), 'dotlock released');
  unchanged(t, target, content, 'at the end');
});

t.test('pigeon deliver as root: a symlinked tmp/ or new/ is refused; a symlinked maildirsize is replaced, not followed', async (t) => {
  const dir = scratchDir(t);
  const inst = makeInstance(dir);
  t.equal(cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg()).code, 0);
  const box = maildirOf(inst, ALICE);
  const elsewhere = join(dir, 'elsewhere');
  mkdirSync(elsewhere, { mode: 0o700 });
  for (const sub of ['tmp', 'new']) {
    renameSync(join(box, sub), join(box, `${sub}.real`));
    symlinkSync(elsewhere, join(box, sub));
    const r = cli(inst, ['deliver', '-f', 'evil@remote.test', ALICE], msg({ subject: `via ${sub}` }));
    t.equal(r.code, 75, `${sub}/ symlinked: deferred: ${r.stdout}`);
    t.match(r.stdout, /^4\.2\.0 Mailbox unsafe, not delivering \(open INBOX: .* is reached through a symbolic link/);
    t.same(readdirSync(elsewhere), [], `${sub}/ symlinked: nothing written where it points`);
    unlinkSync(join(box, sub));
    renameSync(join(box, `${sub}.real`), join(box, sub));
  }
  t.equal(files(join(box, 'new')).length, 1, 'only the first message');

  setUser(inst, ALICE, 'mailstore.quota', '100000');
  t.equal(cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg()).code, 0, 'maildirsize written');
  // a root file that looks like this box's maildirsize: an old pigeon would append "N 1" to it
  const target = join(dir, 'root-only');
  const content = rootFile(target, '100000S\n0 0\n');
  unlinkSync(join(box, 'maildirsize'));
  symlinkSync(target, join(box, 'maildirsize'));
  t.equal(cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg()).code, 0, 'delivered');
  unchanged(t, target, content, 'maildirsize symlink');
  const ms = lstatSync(join(box, 'maildirsize'));
  t.ok(ms.isFile() && ms.uid === MAIL_UID, 'the link was replaced by a maildirsize of the mail user');
  t.match(readFileSync(join(box, 'maildirsize'), 'latin1'), /^100000S\n/);
  const { messages } = await dovecotRead(`maildir:${box}`);
  t.equal(messages.length, 3, 'Dovecot sees the three delivered messages');
});

t.test('LMTP to pigeon serve (root): links refused with 451 4.2.0 and an error log line; files written by a mail-user process', async (t) => {
  const dir = scratchDir(t);
  const inst = makeInstance(dir, [ALICE, BOB]);
  writeFileSync(join(inst, 'conf.d', '50-listen.yaml'), 'listen:\n  - "lmtp=127.0.0.1:0"\n');
  setUser(inst, ALICE, 'mailstore.format', 'mbox');
  const served = await startServe(t, inst);
  const lmtp = async (rcpt: string, subject: string): Promise<string> => {
    const s = await new Promise<net.Socket>((res, rej) => {
      const c = net.connect({ host: '127.0.0.1', port: served.ports['lmtp'] ?? 0 }, () => res(c));
      c.once('error', rej);
    });
    try {
      const d = Dialog.of(s);
      await d.line();
      d.send('LHLO mx.test\r\n');
      await d.reply();
      await d.cmd('MAIL FROM:<evil@remote.test>');
      t.match(await d.cmd(`RCPT TO:<${rcpt}>`), /^250 /);
      await d.cmd('DATA');
      d.send(dataOf(msg({ to: rcpt, subject, body: 'attacker text\n' })));
      return await d.line();
    } finally {
      s.destroy();
    }
  };
  t.match(await lmtp(ALICE, 'first'), /^250 2\.0\.0 /, 'allocates the mbox');
  t.match(await lmtp(BOB, 'maildir'), /^250 2\.0\.0 /);
  const mbox = allocationOf(inst, ALICE).path;
  t.equal(statSync(mbox).uid, MAIL_UID, 'mbox owned by the mail user');
  const name = files(join(maildirOf(inst, BOB), 'new'))[0] ?? '';
  const st = statSync(join(maildirOf(inst, BOB), 'new', name));
  t.equal(st.uid, MAIL_UID, 'Maildir file owned by the mail user');
  t.equal(st.gid, MAIL_GID);
  // the writer is the long-lived child of the serve worker: its pid is in the file name
  const pid = /P(\d+)Q/.exec(name)?.[1] ?? '';
  t.match(readFileSync(`/proc/${pid}/status`, 'utf8'), new RegExp(`\\nUid:\\s+${MAIL_UID}\\s+${MAIL_UID}\\s+${MAIL_UID}\\s+${MAIL_UID}\\n`), 'the writing process runs as the mail user (real, effective, saved, fs uid)');

  // the writer dies (kill -9): the next delivery starts a new one, again as the mail user
  process.kill(Number(pid), 'SIGKILL');
  await until('the log line of the dead writer', served.stderr, new RegExp(`mail writer \\(uid ${MAIL_UID}, pid ${pid}\\) (exited with SIGKILL|closed its channel); a new one starts with the next write`));
  t.match(await lmtp(BOB, 'after restart'), /^250 2\.0\.0 /, 'delivered after the writer was killed');
  const again = files(join(maildirOf(inst, BOB), 'new')).find((f) => f !== name) ?? '';
  const pid2 = /P(\d+)Q/.exec(again)?.[1] ?? '';
  t.not(pid2, pid, 'by a new writer process');
  t.match(readFileSync(`/proc/${pid2}/status`, 'utf8'), new RegExp(`\\nUid:\\s+${MAIL_UID}\\s`), 'which runs as the mail user too');

  const target = join(dir, 'root-only');
  const content = rootFile(target);
  unlinkSync(mbox);
  symlinkSync(target, mbox);
  t.match(await lmtp(ALICE, 'via symlink'), /^451 4\.2\.0 Mailbox unsafe, not delivering \(open mbox: .*is a symbolic link\)/);
  unlinkSync(mbox);
  linkSync(target, mbox);
  t.match(await lmtp(ALICE, 'via hard link'), /^451 4\.\d\.\d /, 'hard link to a root file: deferred');
  unchanged(t, target, content, 'LMTP');
  const other = join(dir, 'someone-elses-mbox');
  writeFileSync(other, 'mine\n', { mode: 0o600 });
  chownSync(other, MAIL_UID, MAIL_GID);
  unlinkSync(mbox);
  linkSync(other, mbox);
  t.match(await lmtp(ALICE, 'via hard link'), /^451 4\.2\.0 Mailbox unsafe, not delivering \(open mbox: .*has 2 hard links\)/);
  t.equal(readFileSync(other, 'latin1'), 'mine\n', 'the hard-linked file is unchanged');
  await until('the error log line', served.stderr, /lmtp\(alice@example\.test\): Error: mailstore: refused to write through a link or special file: .*mailbox=\S*alice\.mbox/);
  t.match(served.stderr(), /lmtp\(alice@example\.test\): Warning: deferred: status=4\.2\.0 Mailbox unsafe/);
  await served.stop();
});

/** python3 holds a POSIX (fcntl) write lock on `path`, as Dovecot does, until released. */
async function holdFcntlLock(t: Test, path: string): Promise<() => Promise<void>> {
  const code = "import fcntl,sys\nf=open(sys.argv[1],'r+')\nfcntl.lockf(f, fcntl.LOCK_EX)\nprint('locked', flush=True)\nsys.stdin.readline()\n";
  const c = owned(spawn('python3', ['-c', code, path], { stdio: ['pipe', 'pipe', 'inherit'], detached: true }));
  const exited = new Promise<void>((r) => c.once('exit', () => r()));
  t.teardown(() => {
    c.kill('SIGKILL');
  });
  let out = '';
  await new Promise<void>((res, rej) => {
    c.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      if (out.includes('locked')) res();
    });
    c.once('exit', (code) => rej(new Error(`lock holder exited ${code} before locking`)));
  });
  return async () => {
    c.stdin.end('\n');
    await exited;
  };
}

t.test('mbox: a reader\'s fcntl lock makes the delivery wait; released → delivered; held past limits.mda_lock_wait_s → 4.2.0', async (t) => {
  const dir = scratchDir(t);
  const inst = makeInstance(dir);
  const log = join(dir, 'pigeon.log');
  writeFileSync(join(inst, 'conf.d', '50-log.yaml'), `log:\n  file: ${JSON.stringify(log)}\n`);
  setUser(inst, ALICE, 'mailstore.format', 'mbox');
  t.equal(cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg({ subject: 'first' })).code, 0);
  const mbox = allocationOf(inst, ALICE).path;
  const before = readFileSync(mbox);

  let release = await holdFcntlLock(t, mbox);
  const waiting = cliAsync(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg({ subject: 'second' }));
  await until('the waiting log line', () => readOr(log), /deliver: mbox: waiting for the fcntl lock another process holds: mailbox=\S*alice\.mbox/);
  t.same(readFileSync(mbox), before, 'nothing appended while the lock is held');
  t.notOk(existsSync(`${mbox}.lock`), 'the dotlock is taken only after the fcntl lock (Dovecot\'s order)');
  await release();
  const r = await waiting;
  t.equal(r.code, 0, `delivered once the lock was released: ${r.stdout}`);
  t.notOk(existsSync(`${mbox}.lock`), 'dotlock released');

  writeFileSync(join(inst, 'conf.d', '60-wait.yaml'), 'limits:\n  mda_lock_wait_s: 1\n');
  const now = readFileSync(mbox);
  release = await holdFcntlLock(t, mbox);
  const t0 = Date.now();
  const r2 = await cliAsync(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg({ subject: 'third' }));
  t.equal(r2.code, 75, r2.stdout);
  t.match(r2.stdout, /^4\.2\.0 mailbox \S*alice\.mbox is locked by another process; try again later\n$/);
  t.ok(Date.now() - t0 >= 1000, 'waited for limits.mda_lock_wait_s first');
  t.same(readFileSync(mbox), now, 'nothing appended');
  await release();

  const root = join(dir, 'dovecot-mbox');
  mkdirSync(root);
  chownSync(root, MAIL_UID, MAIL_GID);
  const { messages } = await dovecotRead(`mbox:${root}:INBOX=${mbox}:INDEX=MEMORY`);
  t.same(
    messages.map((m) => /Subject: (\w+)/.exec(m.body.toString())?.[1]),
    ['first', 'second'],
    'Dovecot reads the two delivered messages',
  );
});

t.test('Maildir tmp/: leftovers untouched for 36 hours are removed on delivery, at most once an hour', async (t) => {
  const inst = makeInstance(scratchDir(t));
  t.equal(cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg()).code, 0);
  const tmp = join(maildirOf(inst, ALICE), 'tmp');
  const stamp = join(tmp, '.pigeon-tmp-clean');
  t.ok(existsSync(stamp), 'the first delivery scanned tmp/ and left its stamp');
  const hoursAgo = (h: number): Date => new Date(Date.now() - h * 3600_000);
  const leftover = (name: string, h: number, uid: number): string => {
    const p = join(tmp, name);
    writeFileSync(p, 'partial message from a killed delivery\n');
    chownSync(p, uid, uid);
    utimesSync(p, hoursAgo(h), hoursAgo(h));
    return p;
  };
  const old = leftover('1700000000.M1P1Q1.old,S=40', 40, 0); // an earlier delivery as root left it
  const oldMail = leftover('1700000000.M1P1Q2.oldmail,S=40', 37, MAIL_UID);
  const fresh = leftover('1700000000.M1P1Q3.fresh,S=40', 35, MAIL_UID);

  t.equal(cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg()).code, 0);
  t.ok(existsSync(old), 'tmp/ was scanned less than an hour ago: no second scan');

  utimesSync(stamp, hoursAgo(1.1), hoursAgo(1.1));
  t.equal(cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg()).code, 0);
  t.notOk(existsSync(old), '40-hour-old leftover (root-owned) removed');
  t.notOk(existsSync(oldMail), '37-hour-old leftover removed');
  t.ok(existsSync(fresh), '35-hour-old file kept (Maildir rule: 36 hours)');
  t.ok(Date.now() - statSync(stamp).mtimeMs < 600_000, 'stamp renewed');
  t.equal(files(join(maildirOf(inst, ALICE), 'new')).length, 3, 'every message delivered');
});
