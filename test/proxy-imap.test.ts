// imapflow through `pigeon serve` to the real Dovecot: LOGIN, AUTHENTICATE PLAIN, LIST, SELECT,
// FETCH of a message put into the Maildir, APPEND, IDLE, LOGOUT; STARTTLS and implicit TLS
// verified against the instance CA; wrong password, unknown user, disabled user.
import t from 'tap';
import { ImapFlow } from 'imapflow';
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { makeInstance, serve, putMessage, message } from './helpers/instance.js';

const inst = makeInstance(t, { listen: ['imap=127.0.0.1:0', 'imaps=127.0.0.1:0'], users: { 'alice@example.test': 'secret', 'carol@example.test': 'c4rol' } });
const srv = await serve(t, inst);
const ca = readFileSync(join(inst.dir, 'certs', 'ca.crt'));

function client(opts: { user: string; pass: string; secure?: boolean; starttls?: boolean; loginMethod?: string }): ImapFlow {
  return new ImapFlow({
    host: '127.0.0.1',
    port: opts.secure ? (srv.ports['imaps'] ?? 0) : (srv.ports['imap'] ?? 0),
    secure: opts.secure ?? false,
    doSTARTTLS: opts.starttls ?? false,
    tls: { ca: [ca], servername: 'localhost' },
    auth: { user: opts.user, pass: opts.pass, ...(opts.loginMethod ? { loginMethod: opts.loginMethod } : {}) },
    logger: false,
    verifyOnly: false,
  } as ConstructorParameters<typeof ImapFlow>[0]);
}

t.test('LOGIN, first login allocates the mailbox, FETCH a message Dovecot serves', async (t) => {
  const c = client({ user: 'alice@example.test', pass: 'secret' });
  await c.connect();
  t.teardown(() => c.close());
  const show = JSON.parse(inst.run(['user', 'show', 'alice@example.test', '--json']).stdout) as { home: string; allocation: { path: string; format: string } };
  t.equal(show.home, 'test1', 'allocated on this node at first login');
  t.equal(show.allocation.format, 'maildir');
  t.same(readdirSync(show.allocation.path).sort().filter((d) => ['cur', 'new', 'tmp'].includes(d)), ['cur', 'new', 'tmp']);
  putMessage(show.allocation.path, message('hello through the proxy', 'body text 123'));
  const boxes = await c.list();
  t.ok(boxes.some((b) => b.path === 'INBOX'), 'LIST shows INBOX');
  const lock = await c.getMailboxLock('INBOX');
  try {
    t.equal((c.mailbox as { exists: number }).exists, 1, 'SELECT sees the message');
    const m = await c.fetchOne('1', { envelope: true, source: true });
    t.equal(m && m.envelope?.subject, 'hello through the proxy');
    t.match(m && m.source?.toString(), /body text 123/);
  } finally {
    lock.release();
  }
  t.ok(c.capabilities.has('IDLE') && c.capabilities.has('UIDPLUS'), "post-login capabilities are Dovecot's");
  await c.logout();
  const log = readFileSync(join(inst.dir, 'pigeon.log'), 'utf8');
  t.match(log, /imap-login: Login: user=<alice@example\.test>, method=PLAIN, rip=127\.0\.0\.1, lip=127\.0\.0\.1, session=<[^>]+>/);
  t.notMatch(log, /secret/, 'no password in the log');
});

t.test('AUTHENTICATE PLAIN, APPEND and IDLE', async (t) => {
  const c = client({ user: 'alice@example.test', pass: 'secret', loginMethod: 'AUTH=PLAIN' });
  await c.connect();
  t.teardown(() => c.close());
  const r = await c.append('INBOX', message('appended', 'via APPEND'));
  t.ok(r && r.uid, 'APPEND returns a UID');
  const lock = await c.getMailboxLock('INBOX');
  const before = (c.mailbox as { exists: number }).exists;
  const seen = new Promise<number>((res) => c.on('exists', (d: { count: number }) => res(d.count)));
  const idle = c.idle();
  const other = client({ user: 'alice@example.test', pass: 'secret' });
  await other.connect();
  await other.append('INBOX', message('while idling', 'x'));
  await other.logout();
  const count = await Promise.race([seen, new Promise<number>((res) => setTimeout(() => res(-1), 15000))]);
  t.equal(count, before + 1, 'IDLE reports the new message');
  lock.release();
  void idle;
  await c.logout();
  const log = readFileSync(join(inst.dir, 'pigeon.log'), 'utf8');
  t.match(log, /method=PLAIN/);
});

t.test('STARTTLS and implicit TLS with the instance CA', async (t) => {
  const c = client({ user: 'alice@example.test', pass: 'secret', starttls: true });
  await c.connect();
  t.ok(c.secureConnection || (c as unknown as { socket: { encrypted?: boolean } }).socket.encrypted, 'upgraded to TLS');
  await c.mailboxOpen('INBOX');
  await c.logout();
  const s = client({ user: 'alice@example.test', pass: 'secret', secure: true });
  await s.connect();
  const st = await s.status('INBOX', { messages: true });
  t.ok((st.messages ?? 0) >= 1, 'STATUS over implicit TLS');
  await s.logout();
  const log = readFileSync(join(inst.dir, 'pigeon.log'), 'utf8');
  t.match(log, /Login: user=<alice@example\.test>, method=PLAIN, rip=127\.0\.0\.1, lip=127\.0\.0\.1, TLS, session=/);
});

t.test('wrong password, unknown user, disabled user: AUTHENTICATIONFAILED', async (t) => {
  for (const [user, pass] of [
    ['alice@example.test', 'wrong'],
    ['nobody@example.test', 'secret'],
  ] as const) {
    const c = client({ user, pass });
    const err = await c.connect().then(
      () => null,
      (e: { authenticationFailed?: boolean; serverResponseCode?: string }) => e,
    );
    t.ok(err, `${user}/${pass} refused`);
    t.equal(err?.serverResponseCode, 'AUTHENTICATIONFAILED');
    c.close();
  }
  t.equal(inst.run(['user', 'disable', 'carol@example.test']).status, 0);
  const c = client({ user: 'carol@example.test', pass: 'c4rol' });
  const err = await c.connect().then(
    () => null,
    (e: { serverResponseCode?: string }) => e,
  );
  t.equal(err?.serverResponseCode, 'AUTHENTICATIONFAILED', 'disabled user refused like a wrong password');
  c.close();
  const show = JSON.parse(inst.run(['user', 'show', 'carol@example.test', '--json']).stdout) as { allocation: unknown };
  t.equal(show.allocation, null, 'no mailbox allocated and no backend started for a refused login');
  const log = readFileSync(join(inst.dir, 'pigeon.log'), 'utf8');
  t.match(log, /imap-login: auth failed \(bad-credentials\): user=<alice@example\.test>/);
  t.match(log, /imap-login: auth failed \(unknown-user\): user=<nobody@example\.test>/);
  t.match(log, /imap-login: auth failed \(disabled\): user=<carol@example\.test>/);
});

t.test('imap.enabled=false refuses IMAP for that user', async (t) => {
  inst.addUser('dave@example.test', 'd4ve');
  t.equal(inst.run(['config', 'set', '--user', 'dave@example.test', 'imap.enabled', 'false']).status, 0);
  const c = client({ user: 'dave@example.test', pass: 'd4ve' });
  const err = await c.connect().then(
    () => null,
    (e: { serverResponseCode?: string }) => e,
  );
  t.equal(err?.serverResponseCode, 'AUTHENTICATIONFAILED');
  c.close();
});
