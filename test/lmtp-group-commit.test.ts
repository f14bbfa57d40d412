// Group commit of the fsync of new/, end to end: K LMTP connections to a real `pigeon serve` (root,
// so the mailbox is written by the mail-writer child) finish their DATA at the same moment; strace
// records every fdatasync, rename and fsync of the mailbox and every answer of the writer child.
// What a mail admin relies on, per message: its data was flushed (fdatasync of tmp/NAME) before
// the rename into new/, and the writer acknowledged it (its `done`, after which the LMTP 250
// leaves) only after an fsync of new/ that BEGAN after that rename and ENDED before the answer —
// an fsync already running when the rename happened may not cover it. And the deliveries that
// arrived together shared fsyncs of new/: fewer fsyncs than messages.
import t, { type Test } from 'tap';
import { readFileSync, realpathSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { CLI, msg, maildirOf, files, lmtpUserInstance } from './helpers/delivery-env.js';
import { Dialog, dataOf, lmtpDialog, serveLmtp, upToData } from './helpers/delivery-lmtp.js';
import { requireProgram } from './helpers/programs.js';

const STRACE = '/usr/bin/strace';
const ALICE = 'alice@example.test';
/** connections delivering at once, one message each */
const K = 8;

/** K LMTP sessions with serve at `port`, each past its DATA's 354 (its message not sent yet). */
function togetherUpToData(t: Test, port: number): Promise<Dialog[]> {
  return Promise.all(
    Array.from({ length: K }, async () => {
      const { d, greeting } = await lmtpDialog(t, port);
      t.match(greeting, /^220 /);
      await upToData(t, d, ALICE);
      return d;
    }),
  );
}

interface Sys {
  readonly tid: number;
  readonly name: string;
  /** the call's line (its arguments; the result too unless another thread interrupted it) */
  readonly line: string;
  /** index of the line where it entered, and where it returned (its `resumed` line, if any) */
  readonly enter: number;
  exit: number;
  result: string;
}

/** The syscalls of an `strace -f` log, entry and exit positions in the log's order of events. */
function syscalls(log: string): Sys[] {
  const out: Sys[] = [];
  const open = new Map<string, Sys>();
  log.split('\n').forEach((line, i) => {
    const res = /^(\d+)\s+<\.\.\. (\w+) resumed>.*\)\s+=\s+(-?\d+.*)$/.exec(line);
    if (res) {
      const s = open.get(`${res[1]}:${res[2]}`);
      if (s) {
        s.exit = i;
        s.result = res[3] ?? '';
        open.delete(`${res[1]}:${res[2]}`);
      }
      return;
    }
    const m = /^(\d+)\s+(\w+)\(/.exec(line);
    if (!m) return;
    const s: Sys = { tid: Number(m[1]), name: m[2] ?? '', line, enter: i, exit: i, result: '' };
    if (line.endsWith('<unfinished ...>')) open.set(`${s.tid}:${s.name}`, s);
    else s.result = /\)\s+=\s+(-?\d+.*)$/.exec(line)?.[1] ?? '';
    out.push(s);
  });
  return out;
}

t.test(`${K} LMTP deliveries at once: each acknowledged after an fsync of new/ begun after its rename; they share fsyncs`, async (t) => {
  if (!requireProgram(t, STRACE, 'strace')) return;
  const { dir, inst } = lmtpUserInstance(t, ALICE);
  const box = realpathSync(maildirOf(inst, ALICE)); // strace -y names files by their real path
  const newDir = join(box, 'new');
  const before = new Set(files(newDir));

  const log = join(dir, 'strace.txt');
  // only the traced syscalls stop the process (--seccomp-bpf): the timing stays close to an untraced run
  const { child: st, port, exited } = await serveLmtp(t, CLI, inst, { wrap: [STRACE, '-f', '--seccomp-bpf', '-qq', '-yy', '-s', '600', '-e', 'trace=write,fsync,fdatasync,rename', '-o', log] });

  // K sessions, each up to its 354; then every message's data, final dot included, in one turn
  const dialogs = await togetherUpToData(t, port);
  dialogs.forEach((d, i) => d.send(dataOf(msg({ subject: `together ${i}`, body: `${'x'.repeat(70)}\n`.repeat(50) }))));
  for (const d of dialogs) t.match(await d.line(), /^250 2\.0\.0 <alice@example\.test> Saved/, 'acknowledged');
  for (const d of dialogs) t.match(await d.cmd('QUIT'), /^221 /);
  const delivered = files(newDir).filter((f) => !before.has(f));
  t.equal(delivered.length, K, `${K} new messages in new/`);

  // serve is strace's child: stop it gracefully, then read the complete log
  const pid = Number(readFileSync(`/proc/${st.pid}/task/${st.pid}/children`, 'utf8').trim().split(' ')[0]);
  t.ok(pid > 0, 'serve runs under strace');
  process.kill(pid, 'SIGTERM');
  await exited;
  const all = syscalls(readFileSync(log, 'utf8'));

  const dirSyncs = all.filter((c) => c.name === 'fsync' && c.line.includes(`<${newDir}>`));
  for (const name of delivered) {
    const datasync = all.find((c) => c.name === 'fdatasync' && c.line.includes(`<${join(box, 'tmp', name)}>`));
    const rename = all.find((c) => c.name === 'rename' && c.line.includes(`"${join(newDir, name)}"`));
    // the writer child's answer for this message (serialised with 'advanced': t"\4done, the path in it)
    const done = all.find((c) => c.name === 'write' && c.line.includes('t\\"\\4done\\"') && c.line.includes(name));
    if (!datasync || !rename || !done) {
      t.fail(`${name}: fdatasync, rename and answer all in the log`, { datasync, rename, done });
      continue;
    }
    t.ok(datasync.exit < rename.enter && datasync.result.startsWith('0'), `${name}: data flushed before the rename into new/`);
    const covering = dirSyncs.filter((f) => f.enter > rename.exit && f.exit < done.enter && f.result.startsWith('0'));
    t.ok(covering.length > 0, `${name}: acknowledged after an fsync of new/ that began after its rename`, {
      rename: rename.enter,
      answer: done.enter,
      fsyncs: dirSyncs.map((f) => [f.enter, f.exit]),
    });
  }
  t.ok(dirSyncs.length < K, `${K} deliveries at once shared the fsyncs of new/ (${dirSyncs.length} for ${K})`, { fsyncs: dirSyncs.map((f) => f.line) });
});

t.test('killed when a shared fsync of new/ is about to begin: none of the deliveries waiting for it was acknowledged', async (t) => {
  const { inst } = lmtpUserInstance(t, ALICE);
  const newDir = join(maildirOf(inst, ALICE), 'new');
  const before = new Set(files(newDir));

  // PIGEON_FAULT=shared-dir-sync (src/delivery/fault.ts): the writer child reports reaching an fsync
  // of new/ for two or more renamed deliveries, and the serve worker holding them kills itself
  const { child: serve, port } = await serveLmtp(t, CLI, inst, { env: { ...process.env, PIGEON_FAULT: 'shared-dir-sync' } });

  const dialogs = await togetherUpToData(t, port);
  dialogs.forEach((d, i) => d.send(dataOf(msg({ subject: `killed ${i}`, body: `${'x'.repeat(70)}\n`.repeat(50) }))));
  const answers = await Promise.all(dialogs.map((d) => d.line().then((l) => l, (e: unknown) => `closed: ${e instanceof Error ? e.message : String(e)}`)));
  t.same(
    answers.filter((a) => !a.startsWith('250') && !a.startsWith('closed: ')),
    [],
    'every connection was answered 250 or closed without an answer (Postfix retries those)',
    { answers },
  );
  const renamed = files(newDir).filter((f) => !before.has(f));
  for (const f of renamed) t.equal(statSync(join(newDir, f)).size, Number(/,S=(\d+)/.exec(f)?.[1]), `${f}: complete (a retry may duplicate it, never truncate it)`);
  // which message each file holds (the subject names its connection)
  const subjects = renamed.map((f) => /^Subject: killed (\d+)$/m.exec(readFileSync(join(newDir, f), 'utf8'))?.[1] ?? '?');
  // A delivery that ran alone before the group formed (on a loaded machine the first one may)
  // had an fsync of new/ of its own and may have been acknowledged: it must be in new/. The
  // fault fires only when an fsync shared by two or more renamed deliveries is about to begin,
  // so at least two renamed deliveries were waiting for it: those must all be unanswered.
  const acked = answers.flatMap((a, i) => (a.startsWith('250') ? [String(i)] : []));
  t.same(
    acked.filter((i) => !subjects.includes(i)),
    [],
    'every acknowledged delivery is in new/',
    { acked, subjects },
  );
  const waiting = subjects.filter((i) => !acked.includes(i));
  t.ok(waiting.length >= 2, `the group waiting for the shared fsync (${waiting.length} renamed into new/) got no 250: the connections closed unanswered`, { acked, subjects, answers });
  t.ok(acked.length <= K - 2, `at most ${K - 2} acknowledged, those before the group formed (${acked.length})`);
});
