// What one LMTP delivery costs in process hops, counted with strace on a real `pigeon serve` (root,
// so the mailbox is written by the mail-writer child): the replies to a pipelined MAIL/RCPT/DATA
// leave in one write (one wake-up of the client, not three); the message is stored and committed
// in ONE request to the writer child (not a store and then a commit); and the child, holding that
// one delivery, makes the fdatasync of the file and the fsync of new/ itself, on its main thread,
// not through its thread pool. Durability is unchanged: one fdatasync and one fsync of new/ per
// message, the fdatasync before the rename into new/, the fsync after it, and the reply after both;
// the directories are still checked for links, tmp/ and new/ with one lstat each.
import t from 'tap';
import { readFileSync, realpathSync } from 'node:fs';
import { join } from 'node:path';
import { CLI, msg, maildirOf, files, lmtpUserInstance } from './helpers/delivery-env.js';
import { dataOf, lmtpDialog, serveLmtp, upToData } from './helpers/delivery-lmtp.js';
import { requireProgram } from './helpers/programs.js';

const STRACE = '/usr/bin/strace';
const ALICE = 'alice@example.test';
const N = 5;

interface Call {
  readonly tid: number;
  readonly name: string;
  readonly line: string;
}

/** The completed (or started) calls of an `strace -f` log: tid, syscall name, the whole line. */
function calls(log: string): Call[] {
  const out: Call[] = [];
  for (const line of log.split('\n')) {
    const m = /^(\d+)\s+(\w+)\(/.exec(line);
    if (m) out.push({ tid: Number(m[1]), name: m[2] ?? '', line });
  }
  return out;
}

t.test('one LMTP delivery: one write per reply group, one request to the mail writer, syncs in place', async (t) => {
  if (!requireProgram(t, STRACE, 'strace')) return;
  // the mailbox allocated first (a first delivery also creates it: one request more)
  const { dir, inst } = lmtpUserInstance(t, ALICE);
  const box = realpathSync(maildirOf(inst, ALICE)); // strace -y names files by their real path
  const before = files(join(box, 'new')).length;

  const log = join(dir, 'strace.txt');
  const { child: st, port, exited } = await serveLmtp(t, CLI, inst, { wrap: [STRACE, '-f', '-qq', '-yy', '-s', '40', '-e', 'trace=write,writev,fsync,fdatasync,rename,readlink', '-o', log] });

  const { d, greeting } = await lmtpDialog(t, port);
  t.match(greeting, /^220 /);
  for (let i = 0; i < N; i++) {
    // pipelined, as Postfix's lmtp client sends them
    await upToData(t, d, ALICE);
    d.send(dataOf(msg({ subject: `hop ${i}` })));
    t.match(await d.line(), /^250 2\.0\.0 <alice@example\.test> Saved/);
  }
  t.match(await d.cmd('QUIT'), /^221 /);
  t.equal(files(join(box, 'new')).length, before + N, `${N} messages in new/`);

  // serve is strace's child: stop it gracefully, then read the complete log
  const pid = Number(readFileSync(`/proc/${st.pid}/task/${st.pid}/children`, 'utf8').trim().split(' ')[0]);
  t.ok(pid > 0, 'serve runs under strace');
  process.kill(pid, 'SIGTERM');
  await exited;
  const all = calls(readFileSync(log, 'utf8'));

  // replies on the LMTP connection: greeting, LHLO, per message (250 250 354) and the final 250, 221
  const lmtpWrites = all.filter((c) => (c.name === 'write' || c.name === 'writev') && c.line.includes(`<TCP:[127.0.0.1:${port}->`));
  t.equal(lmtpWrites.length, 3 + 2 * N, `one write per group of replies (${3 + 2 * N}), not one per reply`, { writes: lmtpWrites.map((c) => c.line) });

  // requests to the writer child (serialised with 'advanced': the type field reads t"\4call)
  const req = (kind: string): Call[] => all.filter((c) => c.name === 'write' && c.line.includes(`t\\"\\4${kind}\\"`));
  t.equal(req('call').length, N, 'one request to the mail writer per message', { requests: req('call').map((c) => c.line) });
  t.equal(req('pull').length + req('data').length, 0, 'the body went with the request');
  const done = req('done');
  t.equal(done.length, N, 'one answer per message');
  const child = new Set(done.map((c) => c.tid));
  t.equal(child.size, 1, 'one writer child');
  const [writer] = [...child];

  // the syncs: one fdatasync of the file in tmp/ and one fsync of new/ per message, both by the
  // writer child's main thread (its tid is its pid, the one that answers), the fdatasync before the
  // rename and the fsync of new/ after it
  const onBox = all.filter((c) => c.line.includes(box));
  const datasyncs = onBox.filter((c) => c.name === 'fdatasync' && c.line.includes('/tmp/'));
  const dirsyncs = onBox.filter((c) => c.name === 'fsync' && c.line.includes(`<${join(box, 'new')}>`));
  t.equal(datasyncs.length, N, 'one fdatasync per message');
  t.equal(dirsyncs.length, N, 'one fsync of new/ per message (one connection: nobody to share it with)');
  t.same(
    [...datasyncs, ...dirsyncs].filter((c) => c.tid !== writer).map((c) => c.line),
    [],
    'no sync went through a thread-pool thread',
  );
  // the paths are checked for links (src/writer/safe-fs.ts): the mailbox from the mail root, its
  // tmp/ and new/ with one lstat each, new/ again from the mail root just before the rename; no
  // second walk of the whole path for tmp/ or new/ (realpath(3) reads every component as a link)
  const walked = (sub: string): number => all.filter((c) => c.name === 'readlink' && c.line.includes(`"${join(box, sub)}"`)).length;
  t.equal(walked('tmp'), 0, 'tmp/ is not resolved component by component');
  t.equal(walked('new'), N, 'new/ is resolved once per message (before the rename)');
  const order = onBox.filter((c) => c.tid === writer && ['fdatasync', 'rename', 'fsync'].includes(c.name)).map((c) => c.name);
  t.same(order, Array.from({ length: N }, () => ['fdatasync', 'rename', 'fsync']).flat(), 'per message: fdatasync, rename into new/, fsync of new/');
});
