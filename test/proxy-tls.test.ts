// Client-facing TLS (issue #12 items 10 and 17): the handshake deadline on implicit-TLS ports
// (pigeon serve, and the real openbsd-inetd running `--forker inetd --tls`) and after
// STARTTLS/STLS; ALPN lists without this port's protocol refused; a failed handshake is one
// log record on one line. Nothing here reaches a backend.
import t from 'tap';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import { makeInstance, serve, freePort, CLI } from './helpers/instance.js';
import { requireProgram } from './helpers/programs.js';
import { Wire } from './helpers/wire.js';
import { spawn } from 'node:child_process';
import { owned } from './helpers/reaper.js';

// The deadline applies to every handshake here, the genuine ones too: 3 s leaves them room under
// two suites at once on 2 cores (1 s did not). A close "at the deadline" is checked from below
// (not before it) and against Node's own 120 s default from above (UPPER_MS), not to the second.
const DEADLINE_S = 3;
const UPPER_MS = 60_000;
const inst = makeInstance(t, {
  listen: ['imap=127.0.0.1:0', 'imaps=127.0.0.1:0', 'pop3=127.0.0.1:0', 'pop3s=127.0.0.1:0'],
  users: { 'alice@example.test': 'secret' },
  conf: `  tls_handshake_timeout_s: ${DEADLINE_S}\n`,
});
const srv = await serve(t, inst);
const ca = readFileSync(join(inst.dir, 'certs', 'ca.crt'));
const port = (p: string): number => srv.ports[p] ?? 0;

/** Wait for the server to close a connection that does nothing (or trickles); resolves with the time it took. */
async function closedAfter(w: Wire, trickle: boolean): Promise<number | null> {
  const start = Date.now();
  let timer: NodeJS.Timeout | null = null;
  if (trickle) {
    // a ClientHello record header, then one byte at a time: Node's own timer restarts with each
    w.write(Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00]));
    timer = setInterval(() => w.write(Buffer.from([0x01])), 200);
  }
  const closed = await w.waitClosed(UPPER_MS);
  if (timer) clearInterval(timer);
  return closed ? Date.now() - start : null;
}

/** A TLS client with an ALPN list (or none): 'ok PROTO' with the first server line, or 'refused'. */
function tlsClient(p: number, alpn: string[] | null): Promise<string> {
  return new Promise((res) => {
    const s: TLSSocket = tlsConnect({ port: p, host: '127.0.0.1', ca: [ca], servername: 'localhost', ...(alpn ? { ALPNProtocols: alpn } : {}) });
    s.setEncoding('latin1');
    s.once('error', (e) => res(`refused: ${e.message}`));
    s.once('data', (d: string) => {
      res(`ok ${s.alpnProtocol === false ? 'none' : String(s.alpnProtocol)} ${d.split('\r\n')[0] ?? ''}`);
      s.destroy();
    });
  });
}

t.test('implicit TLS (serve): a connection without a handshake is closed at the deadline', async (t) => {
  // a session that did its handshake is no longer held to the deadline
  const done = tlsConnect({ port: port('imaps'), host: '127.0.0.1', ca: [ca], servername: 'localhost' });
  const early = new Wire(done);
  t.match(await early.until(/\r\n/), /^\* OK/, 'a client that completed its handshake is greeted');
  for (const p of ['imaps', 'pop3s']) {
    for (const trickle of [false, true]) {
      const w = await Wire.open(port(p));
      const ms = await closedAfter(w, trickle);
      t.ok(ms !== null, `${p}, ${trickle ? 'a ClientHello trickled byte by byte' : 'silence'}: closed by the server`);
      if (ms !== null) t.ok(ms >= DEADLINE_S * 1000 - 100, `${p}: closed after ${ms} ms (deadline ${DEADLINE_S} s)`);
      w.close();
    }
  }
  early.write('a1 NOOP\r\n');
  t.match(await early.until(/a1 .*\r\n/), /a1 OK/, 'the completed TLS session is still served after four deadlines passed');
  early.close();
  const log = readFileSync(join(inst.dir, 'pigeon.log'), 'utf8');
  t.match(log, new RegExp(`imap-login: Disconnected \\(TLS handshaking: no handshake within ${DEADLINE_S} s\\): rip=127\\.0\\.0\\.1`), 'logged with the reason');
});

t.test('STARTTLS and STLS without a handshake: closed at the deadline', async (t) => {
  const w = await Wire.open(port('imap'));
  await w.until(/\r\n/);
  w.write('a1 STARTTLS\r\n');
  t.match(await w.until(/a1 .*\r\n/), /a1 OK/);
  const ms = await closedAfter(w, false);
  t.ok(ms !== null && ms >= DEADLINE_S * 1000 - 100, `IMAP: closed after ${String(ms)} ms`);
  const p = await Wire.open(port('pop3'));
  await p.until(/\r\n/);
  p.write('STLS\r\n');
  t.match(await p.until(/\r\n/), /^\+OK/);
  const pms = await closedAfter(p, true);
  t.ok(pms !== null && pms >= DEADLINE_S * 1000 - 100, `POP3, trickling: closed after ${String(pms)} ms`);
});

t.test('ALPN: no list, or a list with this port\'s protocol, is served; a foreign list is refused', async (t) => {
  t.match(await tlsClient(port('imaps'), null), /^ok none \* OK /, 'imaps without ALPN');
  t.match(await tlsClient(port('imaps'), ['imap']), /^ok imap \* OK /, 'imaps with imap');
  t.match(await tlsClient(port('imaps'), ['h2', 'imap']), /^ok imap \* OK /, 'imaps with h2 and imap: imap chosen');
  t.match(await tlsClient(port('imaps'), ['http/1.1']), /^refused: .*no.application.protocol/i, 'imaps with http/1.1 only: refused in the handshake');
  t.match(await tlsClient(port('imaps'), ['pop3']), /^refused: .*no.application.protocol/i, 'imaps with pop3 only: refused');
  t.match(await tlsClient(port('pop3s'), ['pop3']), /^ok pop3 \+OK /, 'pop3s with pop3');
  t.match(await tlsClient(port('pop3s'), ['imap', 'http/1.1']), /^refused: .*no.application.protocol/i, 'pop3s with imap and http/1.1: refused');
  // STARTTLS: the same rule inside the session
  const w = await Wire.open(port('imap'));
  await w.until(/\r\n/);
  w.write('a1 STARTTLS\r\n');
  await w.until(/a1 OK.*\r\n/);
  const err = await new Promise<string>((res) => {
    const s = tlsConnect({ socket: w.sock as import('node:net').Socket, ca: [ca], servername: 'localhost', ALPNProtocols: ['http/1.1'] });
    s.once('error', (e) => res(e.message));
    s.once('secureConnect', () => res('connected'));
  });
  t.match(err, /no.application.protocol/i, 'STARTTLS with http/1.1 only: refused');
  w.close();
});

t.test('a failed handshake is one log record on one line (OpenSSL texts end in a newline)', async (t) => {
  const w = await Wire.open(port('imap'));
  await w.until(/\r\n/);
  w.write('a1 STARTTLS\r\n');
  await w.until(/a1 OK.*\r\n/);
  w.write('GET / HTTP/1.1\r\nHost: x\r\n\r\n');
  t.ok(await w.waitClosed(), 'closed');
  const i = await Wire.open(port('imaps'));
  i.write('GET / HTTP/1.1\r\nHost: x\r\n\r\n');
  t.ok(await i.waitClosed(), 'closed');
  const log = readFileSync(join(inst.dir, 'pigeon.log'), 'utf8');
  t.match(log, /imap-login: Disconnected \(TLS handshaking: .*http request.*\): rip=127\.0\.0\.1, lip=127\.0\.0\.1, session=/, 'the STARTTLS failure, with its fields on the same line');
  const bad = log.split('\n').filter((l) => l !== '' && !/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z pigeon\[\d+\]: /.test(l));
  t.same(bad, [], 'every line of the log starts a record');
});

t.test('openbsd-inetd with --forker inetd --tls: a connection without a handshake is closed at the deadline', async (t) => {
  if (!requireProgram(t, '/usr/sbin/inetd', 'openbsd-inetd')) return;
  const iport = await freePort();
  const conf = join(inst.dir, 'inetd.conf');
  writeFileSync(conf, `127.0.0.1:${iport} stream tcp nowait.2000 root ${process.execPath} node ${CLI} -c ${inst.dir} imap --forker inetd --tls\n`);
  const inetd = owned(spawn('/usr/sbin/inetd', ['-d', conf], { stdio: 'ignore', detached: true }));
  t.teardown(() => {
    inetd.kill('SIGTERM');
  });
  // inetd binds its port after it started: connect until it accepts
  let w: Wire | null = null;
  const end = Date.now() + UPPER_MS;
  while (!w && Date.now() < end) {
    w = await Wire.open(iport).catch(async () => {
      await new Promise((r) => setTimeout(r, 100));
      return null;
    });
  }
  if (!w) {
    t.fail('inetd did not listen');
    return;
  }
  const ms = await closedAfter(w, false);
  t.ok(ms !== null && ms >= DEADLINE_S * 1000 - 100, `closed after ${String(ms)} ms (the process starts, then waits ${DEADLINE_S} s)`);
  t.match(await tlsClient(iport, ['http/1.1']), /^refused: .*no.application.protocol/i, 'and a foreign ALPN list is refused there too');
  t.match(await tlsClient(iport, ['imap']), /^ok imap \* OK /, 'while imap is served');
});
