// The configuration database locked by another process (issue #12 item 12): a test process holds
// a write transaction (BEGIN IMMEDIATE through better-sqlite3) while clients log in through
// `pigeon serve`. New connections are greeted while logins wait; a first login (which must write
// the mailbox allocation) answers [UNAVAILABLE] / -ERR [SYS/TEMP] after the busy timeout (5 s),
// while the lock is still held, however many wait at once; a user whose mailbox exists still
// logs in (WAL readers are not blocked).
import t from 'tap';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { makeInstance, serve } from './helpers/instance.js';
import { useBackend } from './helpers/backends.js';
import { Wire } from './helpers/wire.js';

const BUSY_TIMEOUT_MS = 5000;

const users: Record<string, string> = { 'alice@example.test': 'secret' };
for (const n of ['n1', 'n2', 'n3', 'p1', 'p2']) users[`${n}@example.test`] = 'pw';
const inst = makeInstance(t, { listen: ['imap=127.0.0.1:0', 'pop3=127.0.0.1:0'], users });
if (!useBackend(t, inst, 'dovecot')) process.exit(1);
const srv = await serve(t, inst);

async function greeted(port: number): Promise<{ w: Wire; ms: number }> {
  const start = Date.now();
  const w = await Wire.open(port);
  await w.until(/\r\n/);
  return { w, ms: Date.now() - start };
}

/** One login; resolves with the answer line and how long it took. */
async function imapLogin(user: string, pass: string): Promise<{ line: string; ms: number }> {
  const { w } = await greeted(srv.ports['imap'] ?? 0);
  const start = Date.now();
  w.write(`a1 LOGIN ${user} ${pass}\r\n`);
  const line = await w.until(/a1 .*\r\n/, 60_000);
  const ms = Date.now() - start;
  w.write('a2 LOGOUT\r\n');
  await w.until(/a2 |BYE/);
  w.close();
  return { line, ms };
}

async function pop3Login(user: string, pass: string): Promise<{ line: string; ms: number }> {
  const { w } = await greeted(srv.ports['pop3'] ?? 0);
  w.write(`USER ${user}\r\n`);
  await w.until(/\r\n/);
  const start = Date.now();
  w.write(`PASS ${pass}\r\n`);
  const line = await w.until(/\r\n/, 60_000);
  const ms = Date.now() - start;
  w.close();
  return { line, ms };
}

t.test('a write-locked database: greetings at once, first logins UNAVAILABLE within the busy timeout', async (t) => {
  t.match((await imapLogin('alice@example.test', 'secret')).line, /a1 OK/, 'alice logs in once (her mailbox is allocated)');
  const db = new Database(join(inst.dir, 'pigeon.db'));
  db.exec('BEGIN IMMEDIATE');
  t.teardown(() => {
    if (db.inTransaction) db.exec('ROLLBACK');
    db.close();
  });
  // five first logins at once: each needs to write its mailbox allocation
  let answered = 0;
  const waiting = [imapLogin('n1@example.test', 'pw'), imapLogin('n2@example.test', 'pw'), imapLogin('n3@example.test', 'pw'), pop3Login('p1@example.test', 'pw'), pop3Login('p2@example.test', 'pw')].map((p) =>
    p.finally(() => answered++),
  );
  // while they wait, new connections are greeted: before any of them is answered, which a worker
  // blocked in the database (a synchronous wait of up to the busy timeout per login) could not
  // do. Order, not elapsed time: under two suites at once on 2 cores a greeting takes seconds.
  const greetings: string[] = [];
  for (const p of ['imap', 'pop3']) {
    const g = await greeted(srv.ports[p] ?? 0);
    greetings.push(`${p} ${g.ms} ms${answered > 0 ? ` (after ${answered} answered)` : ''}`);
    g.w.close();
  }
  t.equal(answered, 0, `greeted while every first login still waits for the lock: ${greetings.join(', ')}`);
  const alice = await imapLogin('alice@example.test', 'secret');
  t.match(alice.line, /a1 OK \[CAPABILITY/, `an allocated user logs in while the database is write-locked (${alice.ms} ms)`);
  // answered while the lock is still held: the wait is bounded by the busy timeout, not by the lock
  const answers = await Promise.all(waiting);
  t.ok(db.inTransaction, 'the lock was held all along');
  answers.forEach((a, i) => {
    t.match(a.line, i < 3 ? /^a1 NO \[UNAVAILABLE\]/ : /^-ERR \[SYS\/TEMP\]/, `first login ${i + 1}: an outage, not a wrong password`);
    t.ok(a.ms >= BUSY_TIMEOUT_MS - 500, `first login ${i + 1} answered after ${a.ms} ms: it waited for the busy timeout (${BUSY_TIMEOUT_MS} ms), then gave up`);
  });
  db.exec('ROLLBACK');
  t.match((await imapLogin('n1@example.test', 'pw')).line, /a1 OK \[CAPABILITY/, 'once the lock is gone, the same user logs in');
  t.match((await pop3Login('p1@example.test', 'pw')).line, /^\+OK Logged in\./, 'and over POP3');
});
