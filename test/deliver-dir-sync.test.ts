// A message is durable only if the directory entries that lead to it are: the first delivery to a
// new user creates the mailbox (domain directory, mailbox, cur/ new/ tmp/), and a folder created
// for a delivery (the antivirus quarantine: src/delivery/maildir.ts createFolder) creates .NAME and
// its cur/ new/ tmp/. strace records every mkdir and fsync: each directory created must have its
// parent fsynced after the mkdir, before the delivery is acknowledged (the process exits 0 after
// every syscall in the log), else a crash right after the answer can take the whole mailbox, and
// the acknowledged message in it, away.
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, realpathSync, chownSync, chmodSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { CLI, ROOT, makeInstance, maildirOf, files, msg, MAIL_UID, MAIL_GID } from './helpers/delivery-env.js';
import { scratchDir } from './helpers/instance.js';
import { requireProgram } from './helpers/programs.js';

const STRACE = '/usr/bin/strace';
const ALICE = 'alice@example.test';

interface Op {
  readonly at: number;
  readonly name: string;
  readonly path: string;
}

/** Successful mkdirs (their path made real with `real`) and fsyncs (strace -yy names the fd by its real path), in log order. */
function ops(log: string, real: (p: string) => string): Op[] {
  const out: Op[] = [];
  log.split('\n').forEach((line, at) => {
    const mk = /^\d+\s+mkdir(?:at)?\((?:AT_FDCWD(?:<[^>]*>)?, )?"([^"]+)".*\)\s+=\s+0$/.exec(line);
    if (mk) out.push({ at, name: 'mkdir', path: real(mk[1] ?? '') });
    // an fsync by a thread-pool thread may be split (`<unfinished ...>`): its start counts, and it
    // ended before the process exited 0
    const fs = /^\d+\s+fsync\(\d+<([^>]+)>/.exec(line);
    if (fs) out.push({ at, name: 'fsync', path: fs[1] ?? '' });
  });
  return out;
}

/** Each directory created has its parent fsynced after it was created: the unmet ones. */
function unsynced(all: readonly Op[]): string[] {
  const syncs = all.filter((o) => o.name === 'fsync');
  return all.filter((o) => o.name === 'mkdir' && !syncs.some((s) => s.at > o.at && s.path === dirname(o.path))).map((o) => o.path);
}

t.test('the first delivery to a new user: every directory it creates is durable before exit 0', async (t) => {
  if (!requireProgram(t, STRACE, 'strace')) return;
  const dir = scratchDir(t);
  const inst = makeInstance(dir);
  const instReal = realpathSync(inst);
  const log = join(dir, 'strace.txt');
  // as root: the mailbox is created and written by the mail-writer child (strace -f follows it)
  const r = spawnSync(STRACE, ['-f', '-qq', '-yy', '-e', 'trace=mkdir,mkdirat,fsync', '-o', log, process.execPath, CLI, '-c', inst, 'deliver', '-f', 'bob@remote.test', ALICE], {
    input: msg({ subject: 'first' }),
  });
  t.equal(r.status, 0, `delivered: ${r.stdout.toString()}${r.stderr.toString()}`);
  const box = maildirOf(inst, ALICE);
  t.equal(files(join(box, 'new')).length, 1, 'the message is in new/');
  const all = ops(readFileSync(log, 'utf8'), (p) => (p.startsWith(inst) ? instReal + p.slice(inst.length) : p));
  const boxReal = realpathSync(box);
  const made = all.filter((o) => o.name === 'mkdir').map((o) => o.path);
  t.ok(made.includes(boxReal) && made.includes(join(boxReal, 'new')) && made.includes(dirname(boxReal)), 'the delivery created the domain directory, the mailbox and its new/', { made });
  t.same(unsynced(all), [], 'every directory created has its parent fsynced after its mkdir (before the delivery is acknowledged)', { ops: all });
});

t.test('a folder created for a delivery (createFolder): .NAME and its cur/ new/ tmp/ are durable', async (t) => {
  if (!requireProgram(t, STRACE, 'strace')) return;
  const dir = scratchDir(t);
  chmodSync(dir, 0o755); // the mail user reaches the mailbox
  const box = join(dir, 'box');
  for (const d of ['', 'cur', 'new', 'tmp']) mkdirSync(join(box, d));
  for (const d of ['', 'cur', 'new', 'tmp']) chownSync(join(box, d), MAIL_UID, MAIL_GID);
  const boxReal = realpathSync(box);
  const log = join(dir, 'strace.txt');
  const script = `
    const { createFolder } = await import(${JSON.stringify(join(ROOT, 'dist/src/delivery/maildir.js'))});
    process.stdout.write(await createFolder(${JSON.stringify(dirname(boxReal))}, ${JSON.stringify(boxReal)}, 'Quarantine') + '\\n');
  `;
  // as the mail user, as the mail writer runs it (strace -u: strace itself stays root to write its log)
  const mailUser = readFileSync('/etc/passwd', 'utf8').split('\n').map((l) => l.split(':')).find((f) => f[2] === String(MAIL_UID))?.[0] ?? 'mail';
  const r = spawnSync(STRACE, ['-f', '-qq', '-yy', '-u', mailUser, '-e', 'trace=mkdir,mkdirat,fsync', '-o', log, process.execPath, '--input-type=module', '-e', script], {
    env: { PATH: process.env['PATH'] ?? '/usr/bin:/bin' }, // not tap's NODE_OPTIONS: its hooks write as root-only files
  });
  t.equal(r.status, 0, r.stderr.toString());
  t.equal(r.stdout.toString(), '.Quarantine\n', 'the folder was created');
  const all = ops(readFileSync(log, 'utf8'), (p) => p);
  t.same(
    all.filter((o) => o.name === 'mkdir').map((o) => o.path).sort(),
    ['', '/cur', '/new', '/tmp'].map((s) => join(boxReal, '.Quarantine') + s).sort(),
    'it made .Quarantine and its cur/ new/ tmp/',
  );
  t.same(unsynced(all), [], 'every directory created has its parent fsynced after its mkdir', { ops: all });
});

t.test('a mail root written with a trailing slash: the new mailbox is created and fsynced up to it', async (t) => {
  const dir = realpathSync(scratchDir(t));
  mkdirSync(join(dir, 'mail'));
  const script = `
    const { LocalWriter } = await import(${JSON.stringify(join(ROOT, 'dist/src/writer/local-writer.js'))});
    await new LocalWriter().createMailbox({ format: 'maildir', path: ${JSON.stringify(join(dir, 'mail', 'example.test', 'alice'))} }, ${JSON.stringify(`${join(dir, 'mail')}/`)});
    await new LocalWriter().createMailbox({ format: 'mbox', path: ${JSON.stringify(join(dir, 'mail', 'example.test', 'bob.mbox'))} }, ${JSON.stringify(`${join(dir, 'mail')}/`)});
    process.stdout.write('made\\n');
  `;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { env: { PATH: process.env['PATH'] ?? '/usr/bin:/bin' } });
  t.equal(r.stdout.toString(), 'made\n', `both mailboxes created: ${r.stderr.toString()}`);
  t.same(files(join(dir, 'mail', 'example.test', 'alice')).sort(), ['cur', 'new', 'tmp'], 'the Maildir is there');
});
