// Relayed TLS sessions through `pigeon serve`: imaps and STARTTLS (imapflow) and pop3s and STLS,
// each fetching a 3 MB message so thousands of chunks cross the relay, many sessions in a row.
// What a user checks: every byte of the message arrives, the logout lines count the bytes, and
// the daemon's stderr stays free of Node's MaxListenersExceededWarning (each relayed TLS socket
// used to collect 11 'close' listeners, one warning per session).
import t from 'tap';
import { ImapFlow } from 'imapflow';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { connect as tlsConnect } from 'node:tls';
import { makeInstance, serve, putMessage } from './helpers/instance.js';
import { useBackend } from './helpers/backends.js';
import { Wire } from './helpers/wire.js';

const LINE = `${'0123456789abcdefghijklmnopqrstuvwxyz'.repeat(2)}..\r\n`;
const BODY = LINE.repeat(40_000); // 3 MiB
const MESSAGE = `From: bob@example.test\r\nTo: alice@example.test\r\nSubject: big\r\nMessage-ID: <big@example.test>\r\n\r\n${BODY}`;

t.test('many relayed TLS sessions with large transfers: all bytes arrive, no listener leak warning', async (t) => {
  const inst = makeInstance(t, { listen: ['imap=127.0.0.1:0', 'imaps=127.0.0.1:0', 'pop3=127.0.0.1:0', 'pop3s=127.0.0.1:0'], users: { 'alice@example.test': 'secret' } });
  if (!useBackend(t, inst, 'dovecot')) return;
  const srv = await serve(t, inst);
  const exited = new Promise<void>((res) => srv.child.once('close', () => res()));
  const ca = readFileSync(join(inst.dir, 'certs', 'ca.crt'));

  const imap = (secure: boolean): ImapFlow =>
    new ImapFlow({
      host: '127.0.0.1',
      port: secure ? (srv.ports['imaps'] ?? 0) : (srv.ports['imap'] ?? 0),
      secure,
      doSTARTTLS: !secure,
      tls: { ca: [ca], servername: 'localhost' },
      auth: { user: 'alice@example.test', pass: 'secret' },
      logger: false,
    } as ConstructorParameters<typeof ImapFlow>[0]);

  // first login allocates the mailbox; then the big message goes in as an MDA puts it
  const first = imap(true);
  await first.connect();
  await first.logout();
  const show = JSON.parse(inst.run(['user', 'show', 'alice@example.test', '--json']).stdout) as { allocation: { path: string } };
  putMessage(show.allocation.path, MESSAGE);

  const fetched: number[] = [];
  for (let i = 0; i < 12; i++) {
    const c = imap(i % 2 === 0);
    await c.connect();
    const lock = await c.getMailboxLock('INBOX');
    try {
      const m = await c.fetchOne('1', { source: true });
      fetched.push(m && m.source ? (m.source.toString('latin1') === MESSAGE ? m.source.length : -m.source.length) : 0);
    } finally {
      lock.release();
    }
    await c.logout();
  }
  t.same(fetched, Array(12).fill(MESSAGE.length), '12 IMAP sessions (imaps and STARTTLS) each fetched the whole message intact');

  const pop3Retr = async (implicit: boolean): Promise<string> => {
    let w: Wire;
    if (implicit) {
      const s = tlsConnect({ host: '127.0.0.1', port: srv.ports['pop3s'] ?? 0, ca: [ca], servername: 'localhost' });
      await new Promise<void>((res, rej) => {
        s.once('secureConnect', () => res());
        s.once('error', rej);
      });
      w = new Wire(s);
    } else {
      w = await Wire.open(srv.ports['pop3'] ?? 0);
      await w.until(/\r\n/);
      w.write('STLS\r\n');
      await w.until(/\r\n/);
      await w.starttls(ca);
    }
    try {
      if (implicit) await w.until(/\r\n/);
      w.write('USER alice@example.test\r\n');
      await w.until(/\r\n/);
      w.write('PASS secret\r\n');
      await w.until(/\r\n/);
      w.write('RETR 1\r\n');
      const r = await w.until(/\r\n\.\r\n/, 60_000);
      w.write('QUIT\r\n');
      await w.until(/\r\n/);
      return r;
    } finally {
      w.close();
    }
  };
  for (let i = 0; i < 6; i++) {
    const r = await pop3Retr(i % 2 === 0);
    t.ok(r.startsWith('+OK') && r.includes(BODY), `POP3 session ${i + 1} (${i % 2 === 0 ? 'pop3s' : 'STLS'}): RETR returned the whole body`);
  }

  await srv.stop();
  await exited;
  const log = readFileSync(join(inst.dir, 'pigeon.log'), 'utf8');
  const outs = [...log.matchAll(/\): Disconnected: Logged out in=\d+ out=(\d+): session=/g)].map((m) => Number(m[1]));
  t.ok(outs.filter((n) => n > BODY.length).length >= 18, `the logout lines of the 18 big sessions count the relayed bytes (${outs.join(' ')})`);
  t.notMatch(srv.stderr(), /MaxListenersExceededWarning|memory leak/, 'no listener leak warning on the daemon\'s stderr');
});
