// A `pigeon serve` run as root with an lmtp listener has its mail writer child (the process that
// writes mailboxes as the mail user) running when it says it is ready, not only after the first
// message asked for one: the first messages on a worker used to wait for a Node process to start
// (fork, exec, module loading), which made the first round on each worker the slowest. The child
// that is running then is the one that stores the first message: no second one is started.
import t from 'tap';
import { readFileSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { CLI, MAIL_UID, msg, maildirOf, files, lmtpUserInstance } from './helpers/delivery-env.js';
import { dataOf, lmtpDialog, serveLmtp, upToData } from './helpers/delivery-lmtp.js';

const ALICE = 'alice@example.test';

/** Every process below `pid` (children of all its threads, recursively). */
function descendants(pid: number): number[] {
  const out: number[] = [];
  const walk = (p: number): void => {
    let tasks: string[];
    try {
      tasks = readdirSync(`/proc/${p}/task`);
    } catch {
      return; // exited meanwhile
    }
    for (const tid of tasks) {
      let kids = '';
      try {
        kids = readFileSync(`/proc/${p}/task/${tid}/children`, 'utf8');
      } catch {
        continue;
      }
      for (const k of kids.trim().split(' ').filter((x) => x !== '')) {
        out.push(Number(k));
        walk(Number(k));
      }
    }
  };
  walk(pid);
  return out;
}

/** The mail writer children below `pid`: their pids and real uids. */
function writers(pid: number): { pid: number; uid: number }[] {
  const out: { pid: number; uid: number }[] = [];
  for (const p of descendants(pid)) {
    try {
      if (!readFileSync(`/proc/${p}/cmdline`, 'utf8').includes('writer-main.js')) continue;
      const uid = /^Uid:\s+(\d+)/m.exec(readFileSync(`/proc/${p}/status`, 'utf8'));
      out.push({ pid: p, uid: Number(uid?.[1] ?? -1) });
    } catch {
      /* exited meanwhile */
    }
  }
  return out;
}

t.test('serve with an lmtp listener: the mail writer runs before the first message, and stores it', async (t) => {
  const { inst } = lmtpUserInstance(t, ALICE);
  const box = maildirOf(inst, ALICE);
  const before = files(join(box, 'new')).length;
  const { child, port } = await serveLmtp(t, CLI, inst);
  const pid = child.pid ?? 0;

  // the worker forks its writer while it opens the listener, before it prints "ready"
  const ready = writers(pid);
  t.equal(ready.length, 1, 'one mail writer child running when serve is ready, before any LMTP connection', { processes: descendants(pid) });
  t.same(
    ready.map((w) => w.uid),
    [MAIL_UID],
    'it runs as the mail user',
  );

  const { d } = await lmtpDialog(t, port);
  await upToData(t, d, ALICE);
  d.send(dataOf(msg({ subject: 'first on this worker' })));
  t.match(await d.line(), /^250 2\.0\.0 <alice@example\.test> Saved/);
  const now = files(join(box, 'new'));
  t.equal(now.length, before + 1, 'the message is in new/');
  const fresh = now.filter((f) => f.includes(',S=')).map((f) => statSync(join(box, 'new', f)));
  t.ok(fresh.every((s) => s.uid === MAIL_UID), 'written as the mail user');
  t.same(
    writers(pid).map((w) => w.pid),
    ready.map((w) => w.pid),
    'the first message was stored by the writer that was already running (none started for it)',
  );
  t.match(await d.cmd('QUIT'), /^221 /);
});
