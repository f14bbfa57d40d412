// The upstream backend against servers that misbehave in ways a real Dovecot cannot be made to
// (scripted servers on real loopback sockets, upstream.tls none/starttls): a server without
// AUTH=PLAIN gets LOGIN with literals carrying the client's password bytes exactly, and its
// capabilities are asked and sent untagged; bytes after a STARTTLS answer are refused (no
// injection into TLS); `NO [UNAVAILABLE]` to the login is an outage, not a wrong password; an
// overlong greeting and a server that hangs up are outages too — each with a log line naming it.
import t from 'tap';
import type { Test } from 'tap';
import { spawnSync } from 'node:child_process';
import { createServer, type Server, type Socket } from 'node:net';
import { readFileSync, writeFileSync } from 'node:fs';
import { networkInterfaces } from 'node:os';
import { join } from 'node:path';
import { makeInstance, serve, CLI } from './helpers/instance.js';
import { Wire } from './helpers/wire.js';

/** A scripted server: `onLine` gets each line the proxy sends (CRLF stripped, bytes as latin1). */
async function scripted(t: Test, greeting: string | Buffer, onLine: (s: Socket, line: string) => void, host = '127.0.0.1'): Promise<number> {
  const sockets = new Set<Socket>();
  const server: Server = createServer((s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
    s.on('error', () => undefined);
    let buf = '';
    s.setEncoding('latin1');
    s.on('data', (d: string) => {
      buf += d;
      for (let i = buf.indexOf('\r\n'); i >= 0; i = buf.indexOf('\r\n')) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 2);
        onLine(s, line);
      }
    });
    s.write(greeting);
  });
  await new Promise<void>((res) => server.listen(0, host, () => res()));
  t.teardown(
    () =>
      new Promise<void>((res) => {
        for (const s of sockets) s.destroy();
        server.close(() => res());
      }),
  );
  const a = server.address();
  return typeof a === 'object' && a ? a.port : 0;
}

t.test('upstream servers that misbehave', async (t) => {
  const PASSWORD = Buffer.from('p "q\\ \xe9\xff', 'latin1'); // spaces, quotes, a backslash, 8-bit bytes
  // 1: no AUTH=PLAIN: LOGIN with synchronising literals; no capabilities in its OK
  const seen: Buffer[] = [];
  let literal: { size: number } | null = null;
  const loginPort = await scripted(t, '* OK fake ready\r\n', (s, line) => {
    if (literal) {
      // the literal's bytes and what follows them arrive on one "line"
      seen.push(Buffer.from(line.slice(0, literal.size), 'latin1'));
      const rest = line.slice(literal.size);
      const m = /^ \{(\d+)\}$/.exec(rest);
      if (m) {
        literal = { size: Number(m[1]) };
        s.write('+ go on\r\n');
        return;
      }
      literal = null;
      s.write('U2 OK Logged in\r\n');
      return;
    }
    let m = /^(\S+) CAPABILITY$/.exec(line);
    if (m) return void s.write(`* CAPABILITY IMAP4rev1 XFAKE-LOGIN\r\n${m[1]} OK done\r\n`);
    m = /^U2 LOGIN \{(\d+)\}$/.exec(line);
    if (m) {
      literal = { size: Number(m[1]) };
      return void s.write('+ go on\r\n');
    }
    m = /^(\S+) NOOP$/.exec(line);
    if (m) return void s.write(`${m[1]} OK fake noop\r\n`);
    s.write('* BAD what\r\n');
  });
  // 2: data after the STARTTLS answer
  const injectPort = await scripted(t, '* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] fake\r\n', (s, line) => {
    const m = /^(\S+) STARTTLS$/.exec(line);
    if (m) s.write(`${m[1]} OK Begin TLS now\r\n* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] injected in clear text\r\n`);
  });
  // 3: NO [UNAVAILABLE] to the login
  const busyPort = await scripted(t, '* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] fake\r\n', (s, line) => {
    const m = /^(\S+) AUTHENTICATE PLAIN /.exec(line);
    if (m) s.write(`${m[1]} NO [UNAVAILABLE] Backend down, try later\r\n`);
  });
  // 4: an overlong greeting (no line end within 64 KiB); 5: hangs up after its greeting
  const longPort = await scripted(t, Buffer.alloc(70_000, 'x'), () => undefined);
  const hangupPort = await scripted(t, '* OK fake\r\n', (s) => s.destroy());
  // 6: upstream.tls none to an address that is not loopback (this host's own, when it has one)
  const outside = Object.values(networkInterfaces())
    .flat()
    .find((a) => a !== undefined && !a.internal && a.family === 'IPv4')?.address;
  let plainCalled = false;
  // without one (CI's machine may have only loopback): a TEST-NET-1 address (RFC 5737), which the
  // backend refuses before it connects, so nothing needs to answer there
  const target = outside ?? '192.0.2.2';
  const plainPort = outside === undefined ? 143 : await scripted(t, '* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] fake\r\n', () => (plainCalled = true), outside);

  const inst = makeInstance(t, { listen: ['imap=127.0.0.1:0'] });
  const users = join(inst.dir, 'users.passwd');
  writeFileSync(users, [...['login', 'inject', 'busy', 'long', 'hangup', 'plain'].map((u) => `${u}@fake.test:{PLAIN}pw\n`), 'kept@local.test:{PLAIN}pw\n'].join(''));
  const imported = inst.run(['user', 'import', 'passwd-file', users, '--create-domains']);
  if (imported.status !== 0) throw new Error(`user import: ${imported.stderr}`);
  const set = (scope: string[], key: string, value: string): void => {
    const r = inst.run(['config', 'set', ...scope, key, value]);
    if (r.status !== 0) throw new Error(`config set ${key} ${value}: ${r.stderr}`);
  };
  for (const [k, v] of Object.entries({ 'imap.backend': 'upstream', 'upstream.host': '127.0.0.1', 'upstream.tls': 'none' })) set(['--domain', 'fake.test'], k, v);
  set(['--user', 'login@fake.test'], 'upstream.port', String(loginPort));
  set(['--user', 'inject@fake.test'], 'upstream.port', String(injectPort));
  set(['--user', 'inject@fake.test'], 'upstream.tls', 'starttls');
  set(['--user', 'busy@fake.test'], 'upstream.port', String(busyPort));
  set(['--user', 'long@fake.test'], 'upstream.port', String(longPort));
  set(['--user', 'hangup@fake.test'], 'upstream.port', String(hangupPort));
  set(['--user', 'plain@fake.test'], 'upstream.host', target);
  set(['--user', 'plain@fake.test'], 'upstream.port', String(plainPort));
  // the local password of login@fake.test is the 8-bit one too (set as bytes, like a client sends it)
  const pw = spawnSync(process.execPath, [CLI, '-c', inst.dir, 'user', 'passwd', 'login@fake.test', '--password-stdin'], { input: Buffer.concat([PASSWORD, Buffer.from('\n')]), encoding: 'utf8' });
  t.equal(pw.status, 0, pw.stderr);
  const srv = await serve(t, inst);
  const port = srv.ports['imap'] ?? 0;
  const log = (): string => readFileSync(join(inst.dir, 'pigeon.log'), 'utf8');

  async function login(user: string, password: Buffer): Promise<{ w: Wire; answer: string }> {
    const w = await Wire.open(port);
    t.teardown(() => w.close());
    await w.until(/\r\n/);
    w.write(`a1 LOGIN ${user} {${password.length}}\r\n`);
    await w.until(/^\+.*\r\n/m);
    w.write(Buffer.concat([password, Buffer.from('\r\n')]));
    return { w, answer: await w.until(/^a1 .*\r\n/m) };
  }

  t.test('no AUTH=PLAIN: LOGIN with literals, the password bytes exactly; its CAPABILITY sent untagged', async (t) => {
    const { w, answer } = await login('login@fake.test', PASSWORD);
    t.match(answer, /^\* CAPABILITY IMAP4rev1 XFAKE-LOGIN\r\na1 OK Logged in\r\n$/, 'capabilities asked after login, sent before our OK');
    t.same(seen, [Buffer.from('login@fake.test'), PASSWORD], 'user name and password reached the server as the client sent them');
    w.write('a2 NOOP\r\n');
    t.match(await w.until(/^a2 .*\r\n/m), /^a2 OK fake noop/m, 'then the relay');
    t.notMatch(log(), /p "q/, 'no password in the log');
  });

  t.test('bytes after the STARTTLS answer: refused before any credential is sent', async (t) => {
    const { answer } = await login('inject@fake.test', Buffer.from('pw'));
    t.match(answer, /^a1 NO \[UNAVAILABLE\]/m);
    t.match(log(), new RegExp(`Backend failure: protocol: upstream 127\\.0\\.0\\.1:${injectPort}: the server sent data after its STARTTLS answer`));
  });

  t.test('NO [UNAVAILABLE] to the login is an outage, not a wrong password', async (t) => {
    const { answer } = await login('busy@fake.test', Buffer.from('pw'));
    t.match(answer, /^a1 NO \[UNAVAILABLE\]/m);
    t.match(log(), new RegExp(`Backend failure: start-failed: upstream 127\\.0\\.0\\.1:${busyPort}: login answered NO \\[UNAVAILABLE\\] Backend down`));
    t.notMatch(log(), /auth failed \(upstream[^\n]*busy@fake/, 'no auth failure counted');
  });

  t.test('an overlong greeting, a server that hangs up: UNAVAILABLE, named', async (t) => {
    const long = await login('long@fake.test', Buffer.from('pw'));
    t.match(long.answer, /^a1 NO \[UNAVAILABLE\]/m);
    t.match(log(), new RegExp(`Backend failure: protocol: upstream 127\\.0\\.0\\.1:${longPort}: overlong line from the server`));
    const gone = await login('hangup@fake.test', Buffer.from('pw'));
    t.match(gone.answer, /^a1 NO \[UNAVAILABLE\]/m);
    t.match(log(), new RegExp(`Backend failure: start-failed: upstream 127\\.0\\.0\\.1:${hangupPort}: the server closed the connection during login`));
  });

  t.test('upstream.tls none to an address that is not loopback: refused before any credential is sent', async (t) => {
    const { answer } = await login('plain@fake.test', Buffer.from('pw'));
    t.match(answer, /^a1 NO \[UNAVAILABLE\]/m);
    t.match(log(), new RegExp(`Backend failure: start-failed: upstream ${target.replace(/\./g, '\\.')}:${plainPort}: upstream\\.tls is none but ${target.replace(/\./g, '\\.')} is not a loopback address`));
    t.notOk(plainCalled, 'the server never got a command');
  });

  t.test('config set: switching a mailbox that holds mail to upstream warns that its local mail is no longer served', async (t) => {
    const d = spawnSync(process.execPath, [CLI, '-c', inst.dir, 'deliver', '-f', 'bob@remote.test', 'kept@local.test'], { input: 'Subject: kept here\r\n\r\nlocal mail\r\n', encoding: 'utf8' });
    t.equal(d.status, 0, `delivered locally ${d.stdout}${d.stderr}`);
    const to = inst.run(['config', 'set', '--user', 'kept@local.test', 'imap.backend', 'upstream']);
    t.equal(to.status, 0);
    t.match(to.stderr, /warning: imap\.backend: 1 mailbox\(es\) on this node that hold mail are now served by the upstream server instead \(upstream\.host\): kept@local\.test\. Their mail here stays on disk/);
    t.notMatch(to.stderr, /UIDVALIDITY/, 'not a UID database change');
    const back = inst.run(['config', 'set', '--user', 'kept@local.test', 'imap.backend', 'dovecot']);
    t.equal(back.status, 0);
    t.notMatch(back.stderr, /UIDVALIDITY|instead of upstream/, 'switching back says nothing about UIDs');
  });
});
