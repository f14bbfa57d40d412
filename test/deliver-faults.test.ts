// Faults of pigeon deliver: kill -9 at every step, disk full and read-only mail root (real tmpfs
// mounts), a locked database, a 100 MB message in bounded memory, 50 concurrent first deliveries.
import t from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, statSync, chownSync, writeFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { cli, cliAsync, CLI, makeInstance, maildirOf, files, msg, dovecotRead, MAIL_UID, MAIL_GID, setUser } from './helpers/delivery-env.js';

const ALICE = 'alice@example.test';

// 50 and 24 concurrent `pigeon deliver` runs, each with its mail-writer child when run as root
// (as here): on 2 shared cores under a second copy of the suite this file needs more than 180 s
t.setTimeout(480_000);

t.test('kill -9 at each step: nothing partial in new/, nothing acknowledged', async (t) => {
  const inst = makeInstance(t.testdir());
  const box = maildirOf(inst, ALICE);
  const body = `${'0123456789'.repeat(50)}\n`.repeat(4000); // 2 MB: spooled to a file
  for (const step of ['spooled', 'tmp-partial', 'tmp-synced', 'renamed']) {
    const before = files(join(box, 'new')).length;
    const r = spawnSync(process.execPath, [CLI, '-c', inst, 'deliver', '-f', 'bob@remote.test', ALICE], {
      input: msg({ subject: step, body }),
      env: { ...process.env, PIGEON_FAULT: step },
      maxBuffer: 1 << 20,
    });
    t.equal(r.signal, 'SIGKILL', `${step}: died by SIGKILL (Postfix: deferred, retried)`);
    t.equal(r.stdout.length, 0, `${step}: printed nothing (acknowledged nothing)`);
    const now = files(join(box, 'new'));
    if (step === 'renamed') {
      // the rename happened: the file in new/ is complete (a retry may duplicate, never truncate)
      t.equal(now.length, before + 1, 'renamed: one complete message in new/');
      for (const f of now) {
        const size = Number(/,S=(\d+)/.exec(f)?.[1]);
        t.equal(statSync(join(box, 'new', f)).size, size, 'complete: size matches S=');
      }
    } else t.equal(now.length, before, `${step}: nothing in new/`);
  }
  const { messages } = await dovecotRead(`maildir:${box}`);
  t.equal(messages.length, 1, 'Dovecot sees only the complete message');
  const left = files(join(box, 'tmp'));
  t.ok(left.length >= 1, 'partial files stay in tmp/ (removed after 36 h)');
  // pigeon deliver ran as root here: the killed writer was nevertheless the mail user
  for (const f of left) t.equal(statSync(join(box, 'tmp', f)).uid, MAIL_UID, `leftover ${f} is owned by the mail user, not root`);
});

function mountTmpfs(t: { teardown: (fn: () => void) => void }, dir: string, size: string): void {
  mkdirSync(dir, { recursive: true });
  const r = spawnSync('mount', ['-t', 'tmpfs', '-o', `size=${size},mode=0770`, 'tmpfs', dir]);
  if (r.status !== 0) throw new Error(`mount tmpfs on ${dir} failed (tests run as root; need CAP_SYS_ADMIN): ${r.stderr.toString()}`);
  t.teardown(() => {
    spawnSync('umount', ['-l', dir]);
    rmSync(dir, { recursive: true, force: true });
  });
  chownSync(dir, MAIL_UID, MAIL_GID);
}

t.test('disk full (1 MB tmpfs): 75 / 4.3.1, nothing in new/; read-only mail root: 75 / 4.3.0', async (t) => {
  const dir = t.testdir();
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
  const inst = makeInstance(t.testdir(), [ALICE, 'fresh@example.test']);
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
  t.equal(cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg()).code, 0, 'an allocated user is delivered while a writer holds the lock');
  const t0 = Date.now();
  const r = await cliAsync(inst, ['deliver', '-f', 'bob@remote.test', 'fresh@example.test'], msg());
  const took = Date.now() - t0;
  t.equal(r.code, 75, r.stdout);
  t.match(r.stdout, /^4\.\d\.\d /);
  t.ok(took >= 4000 && took < 30_000, `waited for the busy timeout, then gave up (${took} ms)`);
  db.prepare('ROLLBACK').run();
  t.equal(cli(inst, ['deliver', '-f', 'bob@remote.test', 'fresh@example.test'], msg()).code, 0, 'succeeds once the lock is gone');
  t.equal(cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg()).code, 0);
});

/** Peak RSS (VmHWM, kB) of a child, sampled until it exits. */
function peakRss(pid: number): () => number {
  let peak = 0;
  const iv = setInterval(() => {
    try {
      const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
      if (m) peak = Math.max(peak, Number(m[1]));
    } catch {
      /* exited */
    }
  }, 50);
  return () => {
    clearInterval(iv);
    return peak;
  };
}

async function bigDelivery(inst: string, mb: number): Promise<{ code: number | null; stdout: string; peakKb: number }> {
  const c = spawn(process.execPath, [CLI, '-c', inst, 'deliver', '-f', 'bob@remote.test', ALICE], { stdio: ['pipe', 'pipe', 'pipe'] });
  const stop = peakRss(c.pid ?? 0);
  let stdout = '';
  c.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  c.stdin.on('error', () => undefined);
  const line = Buffer.from(`${'y'.repeat(1023)}\n`);
  const chunk = Buffer.concat(Array.from({ length: 1024 }, () => line)); // 1 MB
  const done = new Promise<number | null>((r) => c.on('close', (code) => r(code)));
  c.stdin.write('Subject: big\nFrom: bob@remote.test\n\n');
  for (let i = 0; i < mb; i++) {
    if (!c.stdin.write(chunk)) await new Promise((r) => c.stdin.once('drain', r));
  }
  c.stdin.end();
  const code = await done;
  return { code, stdout, peakKb: stop() };
}

t.test('100 MB message: refused above max_size (5.3.4), delivered when allowed, memory stays bounded', async (t) => {
  const inst = makeInstance(t.testdir());
  cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg()); // allocate
  const r1 = await bigDelivery(inst, 100);
  t.equal(r1.code, 65, r1.stdout);
  t.match(r1.stdout, /^5\.3\.4 /, 'default max_size 64 MiB');
  setUser(inst, ALICE, 'mailstore.max_size', '0');
  const r0 = await bigDelivery(inst, 1);
  t.equal(r0.code, 0, r0.stdout);
  const r2 = await bigDelivery(inst, 100);
  t.equal(r2.code, 0, r2.stdout);
  const box = maildirOf(inst, ALICE);
  const big = files(join(box, 'new')).find((f) => Number(/,S=(\d+)/.exec(f)?.[1]) > 100e6) ?? '';
  t.ok(big, 'the 100 MB message is in new/');
  t.equal(statSync(join(box, 'new', big)).size, Number(/,S=(\d+)/.exec(big)?.[1]));
  t.ok(r0.peakKb > 0 && r2.peakKb - r0.peakKb < 64 * 1024, `peak RSS ${r2.peakKb} kB for 100 MB vs ${r0.peakKb} kB for 1 MB: the message is not held in memory`);
});

t.test('50 concurrent first deliveries to one brand-new user: one allocation, every message present', async (t) => {
  const inst = makeInstance(t.testdir(), ['lockuser@example.test', 'casuser@example.test']);
  setUser(inst, 'casuser@example.test', 'mailstore.creator', 'cas');
  for (const u of ['lockuser@example.test', 'casuser@example.test']) {
    const rs = await Promise.all(Array.from({ length: 50 }, (_, i) => cliAsync(inst, ['deliver', '-f', 'bob@remote.test', u], msg({ to: u, subject: `n${i}` }))));
    const bad = rs.filter((r) => r.code !== 0);
    t.equal(bad.length, 0, `${u}: all 50 exit 0 ${JSON.stringify(bad.slice(0, 3))}`);
    const j = JSON.parse(cli(inst, ['user', 'show', u, '--json']).stdout) as { version: number; allocation: { path: string } };
    t.equal(j.version, 1, `${u}: the users row was allocated exactly once (version 0 → 1)`);
    t.equal(j.allocation.path, maildirOf(inst, u));
    const { messages } = await dovecotRead(`maildir:${j.allocation.path}`);
    t.equal(messages.length, 50, `${u}: Dovecot sees all 50`);
    const subjects = new Set(messages.map((m) => /Subject: (n\d+)/.exec(m.body.toString())?.[1]));
    t.equal(subjects.size, 50, `${u}: 50 distinct messages`);
  }
});

t.test('two nodes sharing the database race for a new user (creator cas): one allocation, the loser discards its empty box', async (t) => {
  const dir = t.testdir();
  const n1 = makeInstance(dir, []);
  const n2 = join(dir, 'node2');
  const init2 = cli(n2, ['init', n2, '--node', 'node2', '--db', join(n1, 'pigeon.db')]);
  t.equal(init2.code, 0, init2.stderr);
  cli(n1, ['user', 'add', 'race@example.test', '--password-stdin'], 'x\n');
  setUser(n1, 'race@example.test', 'mailstore.creator', 'cas');
  const jobs = Array.from({ length: 24 }, (_, i) => cliAsync(i % 2 === 0 ? n1 : n2, ['deliver', '-f', 'bob@remote.test', 'race@example.test'], msg({ subject: `r${i}` })));
  const rs = await Promise.all(jobs);
  const j = JSON.parse(cli(n1, ['user', 'show', 'race@example.test', '--json']).stdout) as { home: string; version: number; allocation: { path: string } };
  t.equal(j.version, 1, 'allocated exactly once');
  const winner = j.home === 'node1' ? n1 : n2;
  const loser = winner === n1 ? n2 : n1;
  t.equal(j.allocation.path, maildirOf(winner, 'race@example.test'));
  t.notOk(files(join(loser, 'mail', 'example.test')).includes('race'), 'the losing node left no mailbox behind');
  const winnerOk = rs.filter((r, i) => r.code === 0 && (i % 2 === 0 ? n1 : n2) === winner).length;
  const loserRuns = rs.filter((_, i) => (i % 2 === 0 ? n1 : n2) === loser);
  t.ok(loserRuns.every((r) => r.code === 75), 'deliveries on the losing node defer (75) when the winner cannot be reached: Postfix retries, nothing is lost');
  t.same(loserRuns.filter((r) => r.code === 0).length, 0, 'the losing node stores nothing for the user');
  t.equal(winnerOk, 12, 'every delivery on the winning node succeeded');
  t.equal(files(join(j.allocation.path, 'new')).length, 12, 'and every one of them is in the one mailbox');
  // no `pigeon serve` (no peer listener) runs on the winner here, so the loser cannot forward: it defers
  t.match(loserRuns[0]?.stdout ?? '', /^4\.4\.1 mailbox of race@example\.test is on node node\d: node node\d has no peer address/);
});
