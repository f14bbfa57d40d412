// Issue 15 (idle memory): what `pigeon serve` keeps of a logged-in plain session once it is handed
// to Dovecot. Load-independent: objects on the worker's JS heap, counted from heap snapshots
// (V8 collects garbage first) taken through the inspector, and its open descriptors — not PSS.
// `pigeon serve --workers 1`: the process serve started is the worker and also runs the node
// state service, so its record of each session is counted too (the spawner is another process).
// - per handed-off session the worker keeps a compact record: no client connection (ClientConn),
//   login session (ImapSession), socket or TLS object, and a bounded number of heap objects and
//   closures (a chain of closures, contexts and promises per session was ≈ 51 objects and 12
//   closures; the compact record is ≈ 31 and 3, the spawner link's included);
// - the worker holds no descriptor and no timer per session (its copy of the client socket is closed).
import t from 'tap';
import type { ImapFlow } from 'imapflow';
import { readdirSync } from 'node:fs';
import { spawn } from 'node:child_process';
import { CLI, makeInstance, serveReady } from './helpers/instance.js';
import { owned } from './helpers/reaper.js';
import { useBackend } from './helpers/backends.js';
import { heapCounts, perThing, type HeapCounts } from './helpers/heap.js';
import { Wire } from './helpers/wire.js';
import { imapFrom } from './helpers/imap-from.js';

const ALICE = 'alice@example.test';
/** idle sessions measured: enough that a few objects more or less (a log line, a timer) round away */
const SESSIONS = 40;
const FIRST = 10;
const inst = makeInstance(t, { listen: ['imap=127.0.0.1:0'], users: { [ALICE]: 'secret' }, conf: `  max_userip_connections: 100\n` });
if (!useBackend(t, inst, 'dovecot')) process.exit(1);

interface WhoEntry {
  user: string;
  backend: string | null;
}

function who(): WhoEntry[] {
  const r = inst.run(['who', '--json']);
  if (r.status !== 0) throw new Error(`who: ${r.status} ${r.stderr}`);
  return JSON.parse(r.stdout) as WhoEntry[];
}

/** An IMAP client whose connection comes from `from` (a loopback address of this host), as the bench's idle rows do. */
function imap(port: number, from: string): ImapFlow {
  return imapFrom(port, ALICE, 'secret', from);
}

function fds(pid: number): number {
  return readdirSync(`/proc/${pid}/fd`).length;
}

const named = (a: HeapCounts, b: HeapCounts, name: string): number => (b.names[name] ?? 0) - (a.names[name] ?? 0);

t.test('a handed-off idle session leaves a compact record in the worker: no connection, login or socket, a few objects', async (t) => {
  // the inspector on a port of its own; the spawner starts without the worker's NODE_OPTIONS
  const child = owned(
    spawn(process.execPath, [CLI, '-c', inst.dir, 'serve', '--workers', '1'], {
      stdio: ['ignore', 'ignore', 'pipe'],
      detached: true,
      env: { ...process.env, NODE_OPTIONS: `${process.env['NODE_OPTIONS'] ?? ''} --inspect=127.0.0.1:0`.trim() },
    }),
  );
  t.teardown(
    () =>
      new Promise<void>((res) => {
        if (child.exitCode !== null) return res();
        child.once('exit', () => res());
        child.kill('SIGTERM');
      }),
  );
  let err = '';
  await serveReady(child, 'inspected', (e) => (err = e));
  const port = Number(/listening imap \S+:(\d+)/.exec(err)?.[1]);
  const url = /Debugger listening on (ws:\/\/\S+)/.exec(err)?.[1];
  t.ok(url, 'the worker runs an inspector');
  const worker = child.pid ?? 0;

  // warm: the first logins allocate the mailbox, open the database, start the spawner, compile
  for (let i = 0; i < 3; i++) {
    const c = imap(port, '127.0.2.1');
    await c.connect();
    await c.logout();
  }
  const clients: ImapFlow[] = [];
  t.teardown(() => Promise.all(clients.map((c) => c.logout().catch(() => undefined))));
  /** FIRST, then SESSIONS more idle sessions: the per-session cost is the difference (what any first session costs once, code paths, hidden classes, is in both) */
  const open = async (n: number): Promise<void> => {
    for (let i = 0; i < n; i++) {
      const c = imap(port, `127.0.1.${clients.length + 1}`);
      clients.push(c);
      await c.connect();
    }
    // the worker has handed every one off once the node state service knows where each one went
    // (`pigeon who` has no way to wait: asked again until it says so, bounded so a lost session fails instead of hanging)
    for (let asked = 0; ; asked++) {
      const w = who();
      if (w.length === clients.length && w.every((e) => e.backend === 'dovecot')) break;
      if (asked >= 1200) throw new Error(`pigeon who never listed all ${clients.length} sessions on dovecot: ${JSON.stringify(w)}`);
      await new Promise((r) => setImmediate(r));
    }
  };
  await open(FIRST);
  const before = await heapCounts(url ?? '');
  t.equal(before.pid, worker, 'the inspected process is the worker');
  const fdsBefore = fds(worker);
  await open(SESSIONS);
  const during = await heapCounts(url ?? '');
  const fdsDuring = fds(worker);

  t.equal(named(before, during, 'ClientConn'), 0, 'no handed-off session keeps its client connection (ClientConn)');
  t.equal(named(before, during, 'ImapSession'), 0, 'nor its login session');
  t.equal(named(before, during, 'TLSSocket'), 0, 'nor a TLS socket');
  t.ok(named(before, during, 'Socket') <= 2, `nor a socket (${named(before, during, 'Socket')} more for ${SESSIONS} sessions)`);
  t.ok(named(before, during, 'Timeout') <= 2, `nor a timer (${named(before, during, 'Timeout')} more for ${SESSIONS} sessions)`);
  const per = perThing(before, during, SESSIONS);
  t.ok(per.nodes <= 40, `at most 40 heap objects per handed-off session (${per.nodes}: ${JSON.stringify(per.byType)})`);
  t.ok((per.byType['closure'] ?? 0) <= 6, `at most 6 closures per handed-off session (${per.byType['closure']})`);
  t.ok(fdsDuring - fdsBefore <= 2, `no descriptor per session in the worker (${fdsDuring - fdsBefore} more for ${SESSIONS} sessions)`);

  // the counts see what a session holds while it holds it: a connection that has not logged in
  // has its ClientConn and ImapSession on the worker's heap
  const waiting = await Wire.open(port);
  t.teardown(() => waiting.close());
  await waiting.until(/^\* OK/m);
  const preauth = await heapCounts(url ?? '');
  t.equal(named(during, preauth, 'ClientConn'), 1, 'a connection not logged in: its ClientConn is counted');
  t.equal(named(during, preauth, 'ImapSession'), 1, 'and its ImapSession');
});
