// Issue #17 item 4: `pigeon who [USER] [--json]` and `pigeon kick USER [--ip IP]` across all
// workers of a node. Real Dovecot behind `pigeon serve --workers 2`; imapflow clients, one of them
// bound to 127.0.0.2 so that one user has sessions from two addresses. Kicking by IP ends only
// that session (imapflow sees its connection close, the other sessions still answer), the worker
// logs the usual disconnect line, and `who` no longer lists it. A worker killed with SIGKILL
// leaves no session behind in `who`, and neither does a process gone without closing its link.
import t from 'tap';
import type { ImapFlow } from 'imapflow';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { makeInstance, serve } from './helpers/instance.js';
import { useBackend } from './helpers/backends.js';
import { imapFrom } from './helpers/imap-from.js';
import { AnvilState } from '../src/anvil/state.js';
import { answer } from '../src/anvil/answer.js';
import type { Results } from '../src/anvil/protocol.js';

const ALICE = 'alice@example.test';
const BOB = 'bob@example.test';
const inst = makeInstance(t, { listen: ['imap=127.0.0.1:0'], users: { [ALICE]: 'secret', [BOB]: 'b0b' } });
if (!useBackend(t, inst, 'dovecot')) process.exit(1);

interface WhoEntry {
  user: string;
  protocol: string;
  ip: string;
  backend: string | null;
  since: string;
  session: string | null;
  pid: number;
}

/** An IMAP client whose connection comes from `from` (a loopback address of this host). */
function imap(port: number, user: string, pass: string, from: string): ImapFlow {
  return imapFrom(port, user, pass, from);
}

function closed(c: ImapFlow): Promise<void> {
  return new Promise((resolve) => {
    if (!c.usable) resolve();
    else c.once('close', () => resolve());
  });
}

function who(args: string[] = []): WhoEntry[] {
  const r = inst.run(['who', ...args, '--json']);
  if (r.status !== 0) throw new Error(`who: ${r.status} ${r.stderr}`);
  return JSON.parse(r.stdout) as WhoEntry[];
}

function logLines(re: RegExp): string[] {
  return readFileSync(join(inst.dir, 'pigeon.log'), 'utf8')
    .split('\n')
    .filter((l) => re.test(l));
}

async function logged(re: RegExp, n = 1): Promise<string[]> {
  for (;;) {
    const l = logLines(re);
    if (l.length >= n) return l;
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** The session id and worker pid the proxy logged for a login of `user` from `ip`. */
function loginOf(user: string, ip: string): { session: string; pid: number }[] {
  return logLines(new RegExp(`imap-login: Login: user=<${user.replace('.', '\\.')}>.*rip=${ip.replace(/\./g, '\\.')},`)).map((l) => ({
    session: /session=<([^>]+)>/.exec(l)?.[1] ?? '',
    pid: Number(/pigeon\[(\d+)\]/.exec(l)?.[1]),
  }));
}

t.test('who lists every session of the node; kick --ip ends only that one', async (t) => {
  const srv = await serve(t, inst, 2);
  const port = srv.ports['imap'] ?? 0;
  t.equal(who().length, 0, 'no session yet');
  const a1 = imap(port, ALICE, 'secret', '127.0.0.1');
  const a2 = imap(port, ALICE, 'secret', '127.0.0.2');
  const b1 = imap(port, BOB, 'b0b', '127.0.0.1');
  t.teardown(() => Promise.all([a1, a2, b1].map((c) => c.logout().catch(() => undefined))));
  for (const c of [a1, a2, b1]) await c.connect();

  const all = who();
  t.equal(all.length, 3, 'three sessions');
  const started = Date.now();
  for (const [user, ip] of [
    [ALICE, '127.0.0.1'],
    [ALICE, '127.0.0.2'],
    [BOB, '127.0.0.1'],
  ] as const) {
    const e = all.find((x) => x.user === user && x.ip === ip);
    const login = loginOf(user, ip)[0];
    t.ok(e, `${user} from ${ip} is listed`);
    t.equal(e?.protocol, 'imap', 'protocol');
    t.equal(e?.backend, 'dovecot', 'backend');
    t.equal(e?.session, login?.session, 'the session id of its login line');
    t.equal(e?.pid, login?.pid, 'the pid of the worker that logged it in');
    const since = Date.parse(e?.since ?? '');
    t.ok(since <= started && started - since < 600_000, `since ${e?.since}`);
  }
  t.same(
    who([ALICE]).map((e) => e.ip).sort(),
    ['127.0.0.1', '127.0.0.2'],
    'who USER: only that user',
  );
  const table = inst.run(['who']);
  t.equal(table.status, 0);
  t.match(table.stdout, /^username\s+proto\s+ip\s+backend\s+since\s+session\s+pid\n/, 'a table with a header');
  t.match(table.stdout, /\nbob@example\.test\s+imap\s+127\.0\.0\.1\s+dovecot\s+/, 'one line per session');

  // kick by IP: only alice's session from 127.0.0.2 ends
  const gone = closed(a2);
  const k = inst.run(['kick', ALICE, '--ip', '127.0.0.2']);
  t.equal(k.status, 0, `kick: ${k.stderr}`);
  t.match(k.stdout, /^kicked 1 session\(s\) of alice@example\.test from 127\.0\.0\.2\n/, 'says how many');
  await gone;
  t.notOk(a2.usable, 'imapflow saw the kicked connection close');
  // session ids are base64: '+' and '/' are taken literally
  const session2 = (loginOf(ALICE, '127.0.0.2')[0]?.session ?? '?').replace(/[+/]/g, '\\$&');
  await logged(new RegExp(`imap\\(alice@example\\.test\\): Disconnected: Kicked .*session=<${session2}>`));
  t.pass('the worker logged the disconnect of that session');
  await a1.noop();
  await b1.noop();
  t.ok(a1.usable && b1.usable, 'the other sessions still answer');
  t.same(
    who().map((e) => `${e.user} ${e.ip}`).sort(),
    [`${ALICE} 127.0.0.1`, `${BOB} 127.0.0.1`],
    'who no longer lists the kicked session',
  );
  t.match(inst.run(['kick', ALICE, '--ip', '127.0.0.2']).stdout, /^kicked 0 session/, 'nothing left to kick there');

  // kick without --ip: every session of the user
  const gone1 = closed(a1);
  t.match(inst.run(['kick', ALICE]).stdout, /^kicked 1 session\(s\) of alice@example\.test\n/);
  await gone1;
  t.same(
    who().map((e) => e.user),
    [BOB],
    'only bob is left',
  );

  // a worker killed outright: its sessions are not listed any more
  const pid = who()[0]?.pid ?? 0;
  t.ok(pid > 0 && pid !== srv.child.pid, 'bob is held by a worker');
  process.kill(pid, 'SIGKILL');
  for (;;) {
    if (who().length === 0) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  t.same(who(), [], 'the killed worker\'s session is gone from who');
  t.match(inst.run(['kick', 'not an address']).stderr, /invalid address/, 'a malformed user: one line');
  t.equal(inst.run(['kick', ALICE, '--ip', 'nope']).status, 64, 'a malformed --ip: usage error');
  await srv.stop();
});

t.test('records of a process that is gone are dropped before who and kick answer', async (t) => {
  const dead = spawnSync('true').pid ?? 0;
  t.ok(dead > 0, `a pid that no longer exists: ${dead}`);
  const state = new AnvilState();
  const ended: string[] = [];
  const open = (owner: number, pid: number, conn: string): void => {
    answer(state, owner, pid, { op: 'conn.open', conn, ip: '192.0.2.1', proto: 'imap', trusted: false, max_per_ip: 10, max_total: 100 }, Date.now(), () => undefined);
    answer(state, owner, pid, { op: 'conn.login', conn, user: ALICE, session: `s${conn}`, max_userip: 10 }, Date.now(), () => undefined);
    answer(state, owner, pid, { op: 'conn.backend', conn, backend: 'dovecot' }, Date.now(), () => undefined);
  };
  open(1, process.pid, 'live');
  open(2, dead, 'stale');
  const l = answer(state, 0, 0, { op: 'list' }, Date.now(), () => undefined) as Results['list'];
  t.same(
    l.conns.map((c) => [c.conn, c.pid, c.backend]),
    [['live', process.pid, 'dovecot']],
    'only the live process\'s session is listed',
  );
  open(3, dead, 'stale2');
  const k = answer(state, 0, 0, { op: 'kick', user: ALICE }, Date.now(), (r, why) => ended.push(`${r.conn} ${why}`)) as Results['kick'];
  t.same(
    k.kicked.map((c) => c.conn),
    ['live'],
    'kick counts only sessions that exist',
  );
  t.same(ended, ['live kicked'], 'and tells their owner');
  t.equal(state.connections(), 0, 'nothing left');
});
