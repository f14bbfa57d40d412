// The pre-auth sessions over raw sockets (issue #12): passwords are bytes from the wire to the
// hash, every refused authentication pays the failure delay and counts, STLS forgets USER, every
// error path answers or closes, line limits count CRLF, pre-auth APPEND/ENABLE, `(` nesting.
// What is checked here happens before any backend starts, so one backend (Dovecot, the default)
// serves the successful logins.
import t from 'tap';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { connect as tlsConnect } from 'node:tls';
import { makeInstance, serve, CLI, type Inst } from './helpers/instance.js';
import { useBackend } from './helpers/backends.js';
import { Wire } from './helpers/wire.js';

const STORED = Buffer.from('pass\xfe', 'latin1'); // not UTF-8: decoded with replacement it would be "pass\uFFFD"
const OTHER = Buffer.from('pass\xff', 'latin1'); // the same "pass\uFFFD" after a lossy decode
const b64 = (b: Buffer | string): string => Buffer.from(b).toString('base64');
const bytes = (...parts: (string | Buffer)[]): Buffer => Buffer.concat(parts.map((p) => (typeof p === 'string' ? Buffer.from(p, 'latin1') : p)));

/** The CLI with stdin as bytes. */
function cli(inst: Inst, args: string[], input: Buffer): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [CLI, '-c', inst.dir, ...args], { input, encoding: 'utf8' });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

const inst = makeInstance(t, { listen: ['imap=127.0.0.1:0', 'pop3=127.0.0.1:0'], users: { 'alice@example.test': 'secret', 'dora@example.test': 'd0ra' } });
if (!useBackend(t, inst, 'dovecot')) process.exit(1);
// a failure delay long enough to measure, short enough for a test
writeFileSync(join(inst.dir, 'conf.d', '60-delay.yaml'), 'limits:\n  auth_failure_delay_ms: 300\n');
const DELAY = 300;
const added = cli(inst, ['user', 'add', 'byte@example.test', '--password-stdin'], bytes(STORED, '\n'));
if (added.status !== 0) throw new Error(`user add: ${added.stderr}`);
if (inst.run(['user', 'disable', 'dora@example.test']).status !== 0) throw new Error('user disable');
const srv = await serve(t, inst);
const imapPort = srv.ports['imap'] ?? 0;
const pop3Port = srv.ports['pop3'] ?? 0;
const ca = readFileSync(join(inst.dir, 'certs', 'ca.crt'));

async function imap(): Promise<Wire> {
  const w = await Wire.open(imapPort);
  await w.until(/^\* OK.*\r\n/);
  return w;
}

async function pop3(): Promise<Wire> {
  const w = await Wire.open(pop3Port);
  await w.until(/^\+OK.*\r\n/);
  return w;
}

/** A successful login from this address clears its failure penalty (the cases below measure delays). */
async function clearPenalty(): Promise<void> {
  const w = await imap();
  w.write('z1 LOGIN alice@example.test secret\r\n');
  const r = await w.until(/z1 .*\r\n/);
  if (!/z1 OK/.test(r)) throw new Error(`login failed: ${r}`);
  w.write('z2 LOGOUT\r\n');
  await w.until(/z2 /);
  w.close();
}

t.test('passwords are bytes: pass\\xfe is stored, pass\\xff (the same after a lossy decode) is refused', async (t) => {
  t.test('pigeon auth test reads stdin as bytes', async (t) => {
    const wrong = cli(inst, ['auth', 'test', 'byte@example.test'], bytes(OTHER, '\n'));
    t.equal(wrong.status, 77, `pass\\xff refused (${wrong.stdout.trim()})`);
    t.match(wrong.stdout, /auth failed \(bad-credentials\)/);
    const right = cli(inst, ['auth', 'test', 'byte@example.test'], bytes(STORED, '\n'));
    t.equal(right.status, 0, `pass\\xfe accepted (${right.stdout.trim()}${right.stderr.trim()})`);
    const passwd = cli(inst, ['user', 'passwd', 'byte@example.test'], bytes(OTHER, '\r\n'));
    t.equal(passwd.status, 0, 'user passwd takes the bytes too');
    t.equal(cli(inst, ['auth', 'test', 'byte@example.test'], bytes(STORED, '\n')).status, 77, 'the old bytes no longer work');
    t.equal(cli(inst, ['auth', 'test', 'byte@example.test'], bytes(OTHER, '\n')).status, 0, 'the new ones do');
    t.equal(cli(inst, ['user', 'passwd', 'byte@example.test'], bytes(STORED, '\n')).status, 0, 'back to pass\\xfe');
  });

  t.test('IMAP LOGIN (literal and quoted) and AUTHENTICATE PLAIN', async (t) => {
    await clearPenalty();
    const w = await imap();
    w.write('a1 LOGIN byte@example.test {5}\r\n');
    t.match(await w.until(/\r\n/), /^\+ OK/, 'the password literal is invited');
    w.write(bytes(OTHER, '\r\n'));
    t.match(await w.until(/a1 .*\r\n/), /a1 NO \[AUTHENTICATIONFAILED\]/, 'literal pass\\xff refused');
    w.write(bytes('a2 LOGIN byte@example.test "', OTHER, '"\r\n'));
    t.match(await w.until(/a2 .*\r\n/), /a2 NO \[AUTHENTICATIONFAILED\]/, 'quoted pass\\xff refused');
    w.close();
    const p = await imap();
    p.write(`p1 AUTHENTICATE PLAIN ${b64(bytes('\0byte@example.test\0', OTHER))}\r\n`);
    t.match(await p.until(/p1 .*\r\n/), /p1 NO \[AUTHENTICATIONFAILED\]/, 'AUTHENTICATE PLAIN with pass\\xff refused');
    p.write('p2 AUTHENTICATE LOGIN\r\n');
    await p.until(/^\+ .*\r\n/);
    p.write(`${b64('byte@example.test')}\r\n`);
    await p.until(/^\+ .*\r\n/);
    p.write(`${b64(OTHER)}\r\n`);
    t.match(await p.until(/p2 .*\r\n/), /p2 NO \[AUTHENTICATIONFAILED\]/, 'AUTHENTICATE LOGIN with pass\\xff refused');
    p.close();
    await clearPenalty();
    const ok = await imap();
    ok.write('o1 LOGIN byte@example.test {5}\r\n');
    await ok.until(/^\+ OK\r\n/);
    ok.write(bytes(STORED, '\r\n'));
    t.match(await ok.until(/o1 .*\r\n/), /o1 OK \[CAPABILITY/, 'literal pass\\xfe logs in');
    ok.write('o2 LOGOUT\r\n');
    await ok.until(/o2 /);
    ok.close();
    const q = await imap();
    q.write(`q1 AUTHENTICATE PLAIN ${b64(bytes('byte@example.test\0byte@example.test\0', STORED))}\r\n`);
    t.match(await q.until(/q1 .*\r\n/), /q1 OK \[CAPABILITY/, 'AUTHENTICATE PLAIN with pass\\xfe (and authzid = authcid) logs in');
    q.write('q2 LOGOUT\r\n');
    await q.until(/q2 /);
    q.close();
  });

  t.test('POP3 PASS and AUTH PLAIN', async (t) => {
    await clearPenalty();
    const w = await pop3();
    w.write('USER byte@example.test\r\n');
    await w.until(/\r\n/);
    w.write(bytes('PASS ', OTHER, '\r\n'));
    t.match(await w.until(/\r\n/), /^-ERR \[AUTH\] Authentication failed/, 'PASS pass\\xff refused');
    w.write(`AUTH PLAIN ${b64(bytes('\0byte@example.test\0', OTHER))}\r\n`);
    t.match(await w.until(/\r\n/), /^-ERR \[AUTH\] Authentication failed/, 'AUTH PLAIN pass\\xff refused');
    w.close();
    await clearPenalty();
    const ok = await pop3();
    ok.write('USER byte@example.test\r\n');
    await ok.until(/\r\n/);
    ok.write(bytes('PASS ', STORED, '\r\n'));
    t.match(await ok.until(/\r\n/), /^\+OK Logged in\./, 'PASS pass\\xfe logs in');
    ok.write('QUIT\r\n');
    await ok.waitClosed();
  });

  t.test('a user name that is not UTF-8 is refused, not decoded', async (t) => {
    await clearPenalty();
    const w = await imap();
    w.write(bytes('u1 LOGIN "alice\xff@example.test" secret\r\n'));
    t.match(await w.until(/u1 .*\r\n/), /u1 NO \[AUTHENTICATIONFAILED\]/);
    w.close();
    const log = readFileSync(join(inst.dir, 'pigeon.log'), 'utf8');
    t.match(log, /imap-login: auth failed \(invalid user name\): user=<alice\?@example\.test>/, 'logged as an invalid user name');
  });
});

t.test('every refused authentication pays the failure delay and counts toward the 3 failures', async (t) => {
  const cases: [string, (w: Wire) => void, RegExp][] = [
    ['malformed PLAIN (no NULs)', (w) => w.write(`c AUTHENTICATE PLAIN ${b64('alice@example.test secret')}\r\n`), /malformed PLAIN message/],
    ['authzid other than authcid', (w) => w.write(`c AUTHENTICATE PLAIN ${b64('bob@example.test\0alice@example.test\0secret')}\r\n`), /authorization identity differs/],
    ['user name with CR', (w) => w.write(`c AUTHENTICATE PLAIN ${b64('\0alice@example.test\r\0secret')}\r\n`), /invalid user name/],
    ['user name that is not UTF-8', (w) => w.write(bytes('c LOGIN "al\xe9@example.test" secret\r\n')), /invalid user name/],
    ['unknown user', (w) => w.write('c LOGIN nobody@example.test secret\r\n'), /unknown-user/],
    ['wrong password', (w) => w.write('c LOGIN alice@example.test wrong\r\n'), /bad-credentials/],
    ['disabled user', (w) => w.write('c LOGIN dora@example.test d0ra\r\n'), /disabled/],
  ];
  for (const [what, send] of cases) {
    await clearPenalty();
    const w = await imap();
    const start = Date.now();
    send(w);
    const r = await w.until(/c .*\r\n/);
    const ms = Date.now() - start;
    t.match(r, /^c NO \[AUTHENTICATIONFAILED\] Authentication failed\./, `${what}: refused like a wrong password`);
    t.ok(ms >= DELAY - 20, `${what}: answered after the failure delay (${ms} ms >= ${DELAY} ms)`);
    w.close();
  }
  await clearPenalty();
  const w = await imap();
  for (const tag of ['m1', 'm2', 'm3']) w.write(`${tag} AUTHENTICATE PLAIN ${b64('junk')}\r\n`);
  const r = await w.until(/BYE.*\r\n/);
  t.match(r, /m1 NO .*\r\nm2 NO .*\r\nm3 NO .*\r\n\* BYE Too many invalid authentication attempts/, 'three malformed messages end the connection');
  t.ok(await w.waitClosed(), 'closed');
  await clearPenalty();
  const p = await pop3();
  for (let i = 0; i < 3; i++) p.write(`AUTH PLAIN ${b64('x\0y')}\r\n`);
  const pr = await p.until(/Too many.*\r\n/);
  t.match(pr, /(-ERR \[AUTH\] Authentication failed\.\r\n){3}-ERR \[AUTH\] Too many invalid authentication attempts\./, 'POP3: the same');
  t.ok(await p.waitClosed(), 'closed');
  const log = readFileSync(join(inst.dir, 'pigeon.log'), 'utf8');
  for (const [what, , why] of cases) t.match(log, new RegExp(`imap-login: auth failed \\((?:${why.source})\\)`), `${what}: an "auth failed" line for fail2ban`);
});

t.test('POP3: a USER given before STLS is forgotten inside TLS', async (t) => {
  await clearPenalty();
  for (const pipelined of [false, true]) {
    const w = await pop3();
    if (pipelined) w.write('STLS\r\nUSER alice@example.test\r\n');
    else {
      w.write('USER alice@example.test\r\n');
      t.match(await w.until(/\r\n/), /^\+OK/);
      w.write('STLS\r\n');
    }
    t.match(await w.until(/\r\n/), /^\+OK Begin TLS/);
    await w.starttls(ca);
    w.write('PASS secret\r\n');
    t.match(await w.until(/\r\n/), /^-ERR No username given\./, `${pipelined ? 'a pipelined' : 'an earlier'} USER does not choose the account`);
    w.write('USER alice@example.test\r\nPASS secret\r\n');
    t.match(await w.until(/Logged in.*\r\n/), /\+OK\r\n\+OK Logged in\./, 'USER and PASS inside TLS log in');
    w.write('QUIT\r\n');
    await w.waitClosed();
  }
});

t.test('every error path answers and reads on, or closes', async (t) => {
  t.test('IMAP: an over-long SASL response ends the session with BYE', async (t) => {
    for (const end of ['\r\n', '']) {
      const w = await imap();
      w.write('a1 AUTHENTICATE PLAIN\r\n');
      t.match(await w.until(/\r\n/), /^\+ /);
      w.write(`${'A'.repeat(9000)}${end}`);
      t.match(await w.until(/BYE.*\r\n/), /^\* BYE Too long authentication response/, `over-long response${end ? '' : ' without a line end'}: BYE`);
      t.ok(await w.waitClosed(), 'and the connection is closed');
    }
  });

  t.test('IMAP: bad base64, literal syntax and cancels inside AUTHENTICATE are answered, the next command too', async (t) => {
    const w = await imap();
    w.write('a1 AUTHENTICATE PLAIN\r\n');
    await w.until(/^\+ .*\r\n/);
    w.write('!!!\r\n');
    t.match(await w.until(/a1 .*\r\n/), /a1 BAD Invalid base64/);
    w.write('a2 NOOP\r\n');
    t.match(await w.until(/a2 .*\r\n/), /a2 OK/, 'the next command is answered');
    w.write('a3 AUTHENTICATE PLAIN\r\n');
    await w.until(/^\+ .*\r\n/);
    w.write('{5}\r\n');
    t.match(await w.until(/a3 .*\r\n/), /a3 BAD Invalid base64/, 'a literal is no SASL syntax: bad base64, no "+ OK"');
    t.notOk(await isClosed(w), 'still open');
    w.close();
    const c = await imap();
    c.write('c1 AUTHENTICATE LOGIN\r\n');
    await c.until(/^\+ .*\r\n/);
    c.write(`${b64('alice@example.test')}\r\n`);
    await c.until(/^\+ .*\r\n/);
    c.write('*\r\n');
    t.match(await c.until(/c1 .*\r\n/), /c1 BAD Authentication aborted by client/, 'cancel in the second step');
    c.write('c2 NOOP\r\n');
    t.match(await c.until(/c2 .*\r\n/), /c2 OK/);
    c.close();
  });

  t.test('POP3: an over-long SASL response ends the session; bad base64 is answered', async (t) => {
    const w = await pop3();
    w.write('AUTH PLAIN\r\n');
    await w.until(/^\+ .*\r\n/);
    w.write('!!!\r\n');
    t.match(await w.until(/\r\n/), /^-ERR Invalid base64/);
    w.write('NOOP\r\n');
    t.match(await w.until(/\r\n/), /^\+OK/, 'the next command is answered');
    w.write('AUTH PLAIN\r\n');
    await w.until(/^\+ .*\r\n/);
    w.write(`${'A'.repeat(9000)}\r\n`);
    t.match(await w.until(/\r\n/), /^-ERR Line too long/);
    t.ok(await w.waitClosed(), 'closed');
  });
});

/** True when the peer closed; answers a NOOP-like probe quickly when it did not. */
async function isClosed(w: Wire): Promise<boolean> {
  w.write('zz NOOP\r\n');
  const r = await w.until(/zz .*\r\n/);
  return !/zz OK/.test(r);
}

t.test('line limits count the CRLF (IMAP 8192, POP3 255 octets)', async (t) => {
  const line = (prefix: string, total: number): string => `${prefix}${'x'.repeat(total - prefix.length - 2)}\r\n`;
  const ok = await imap();
  const l8192 = line('a1 NOOP ', 8192);
  t.equal(Buffer.byteLength(l8192), 8192);
  ok.write(l8192);
  t.match(await ok.until(/a1 .*\r\n/), /a1 OK/, '8192 octets with CRLF: accepted');
  ok.close();
  const long = await imap();
  long.write(line('a1 NOOP ', 8193));
  t.match(await long.until(/BYE.*\r\n/), /\* BYE Too long command line/, '8193 octets: BYE');
  t.ok(await long.waitClosed());
  const lit = await imap();
  // a literal counts with its command: 8192 octets in all (two CRLFs, the literal) is the limit
  const head = 'a1 ID ("k" {';
  const size = 8192 - Buffer.byteLength(`${head}0000}\r\n`) - Buffer.byteLength(')\r\n');
  lit.write(`${head}${String(size).padStart(4, '0')}}\r\n`);
  t.match(await lit.until(/\r\n/), /^\+ OK/);
  lit.write(`${'v'.repeat(size)})\r\n`);
  t.match(await lit.until(/a1 .*\r\n/), /a1 BAD Invalid ID parameters|a1 OK/, 'a command of exactly 8192 octets with a literal is read');
  lit.close();
  const p = await pop3();
  p.write(line('NOOP ', 255));
  t.match(await p.until(/\r\n/), /^\+OK/, 'POP3: 255 octets with CRLF: accepted');
  p.write(line('NOOP ', 256));
  t.match(await p.until(/\r\n/), /^-ERR Line too long/, 'POP3: 256 octets: refused');
  t.ok(await p.waitClosed());
});

t.test('pre-auth APPEND is refused without inviting its literal; ENABLE is answered as Dovecot does', async (t) => {
  const w = await imap();
  w.write('a1 APPEND INBOX {5}\r\n');
  const r = await w.until(/a1 .*\r\n/);
  t.notMatch(r, /^\+/, 'no continuation request');
  t.match(r, /^a1 BAD Please log in first\.\r\n$/);
  w.write('a2 NOOP\r\n');
  t.match(await w.until(/a2 .*\r\n/), /^a2 OK/, 'the session reads on');
  w.write('a3 ENABLE CONDSTORE\r\n');
  t.equal(await w.until(/a3 .*\r\n/), '* ENABLED\r\na3 OK ENABLE ignored in non-authenticated state.\r\n');
  w.write('a4 XYZZY {3}\r\n');
  t.match(await w.until(/a4 .*\r\n/), /^a4 BAD Unknown command/, 'an unknown command with a literal: no continuation either');
  w.write('a5 LOGIN {18}\r\n');
  t.match(await w.until(/\r\n/), /^\+ OK/, 'LOGIN still gets its continuation');
  w.write('alice@example.test {6}\r\n');
  t.match(await w.until(/\r\n/), /^\+ OK/);
  w.write('secret\r\n');
  t.match(await w.until(/a5 .*\r\n/), /a5 OK \[CAPABILITY/);
  w.write('a6 LOGOUT\r\n');
  await w.until(/a6 /);
  w.close();
});

t.test('an unterminated "((((" stream is cut at the nesting limit, not at the line limit', async (t) => {
  const w = await imap();
  w.write('a1 ID (("');
  t.match(await w.until(/BYE.*\r\n/), /^\* BYE Too deep nesting/, 'BYE at the second "(" before any line end');
  t.ok(await w.waitClosed());
  const q = await imap();
  q.write('a2 ID ("name" "((((((")\r\n');
  t.match(await q.until(/a2 .*\r\n/), /a2 OK ID completed/, 'parentheses inside a quoted string are text');
  q.close();
});
