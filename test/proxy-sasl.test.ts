// SASL beyond PLAIN/LOGIN (issue #17 item 8), through the proxy to the real Dovecot:
// SCRAM-SHA-256 with an independent client, Debian's gsasl (IMAP directly with --connect; POP3
// with gsasl as the SASL engine on stdio, the test only carrying its lines), for a user whose
// password was set with `-s SCRAM-SHA-256` and one imported from a passwd-file line written by
// Dovecot's own `doveadm pw`; a wrong password, an unknown user and a user without SCRAM keys
// fail alike (and PLAIN still works for the last); OAUTHBEARER (imapflow with an access token)
// and XOAUTH2 with JWTs signed here by a key whose public half is in the node's JWKS file.
import t from 'tap';
import { spawn } from 'node:child_process';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { ImapFlow } from 'imapflow';
import { SignJWT, exportJWK, generateKeyPair } from 'jose';
import { makeInstance, serve } from './helpers/instance.js';
import { useBackend } from './helpers/backends.js';
import { requireProgram } from './helpers/programs.js';
import { Wire } from './helpers/wire.js';

const GSASL = '/usr/bin/gsasl';
const DOVEADM = '/usr/bin/doveadm';
if (!requireProgram(t, GSASL, 'gsasl') || !requireProgram(t, DOVEADM, 'dovecot-core')) process.exit(0);

const ISSUER = 'https://id.example.test';
const AUDIENCE = 'mail.example.test';
const DELAY = 300;

interface Done {
  readonly code: number | null;
  readonly out: string;
}

/** Run a program to its end; stdin is `input` (then closed). */
function run(cmd: string, args: readonly string[], input = ''): Promise<Done> {
  return new Promise((res, rej) => {
    const c = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    c.stdout.setEncoding('utf8').on('data', (s: string) => (out += s));
    c.stderr.setEncoding('utf8').on('data', (s: string) => (out += s));
    c.once('error', rej);
    c.once('close', (code) => res({ code, out }));
    c.stdin.end(input);
  });
}

const inst = makeInstance(t, { listen: ['imap=127.0.0.1:0', 'pop3=127.0.0.1:0'], users: { 'alice@example.test': 'secret' } });
if (!useBackend(t, inst, 'dovecot')) process.exit(1);

// sam: a SCRAM password set by pigeon; dove: a line written by Dovecot's doveadm pw, imported
const sam = inst.run(['user', 'add', 'sam@example.test', '--password-stdin', '-s', 'SCRAM-SHA-256'], 'pencil\n');
if (sam.status !== 0) throw new Error(`user add -s SCRAM-SHA-256: ${sam.stderr}`);
const dove = await run(DOVEADM, ['pw', '-s', 'SCRAM-SHA-256', '-p', 'd0ve pass']);
if (dove.code !== 0 || !dove.out.startsWith('{SCRAM-SHA-256}')) throw new Error(`doveadm pw: ${dove.out}`);
writeFileSync(join(inst.dir, 'users.passwd'), `dove@example.test:${dove.out.trim()}::::::\n`);
const imported = inst.run(['user', 'import', 'passwd-file', join(inst.dir, 'users.passwd')]);
if (imported.status !== 0) throw new Error(`import: ${imported.stderr}`);

// the node's JWKS file: the public half of a key the test signs tokens with
const { privateKey, publicKey } = await generateKeyPair('ES256', { extractable: true });
const stranger = await generateKeyPair('ES256');
writeFileSync(join(inst.dir, 'jwks.json'), JSON.stringify({ keys: [{ ...(await exportJWK(publicKey)), kid: 'k1', alg: 'ES256', use: 'sig' }] }));
writeFileSync(
  join(inst.dir, 'conf.d', '70-sasl.yaml'),
  `limits:\n  auth_failure_delay_ms: ${DELAY}\n  auth_failure_delay_max_ms: ${DELAY}\noauth:\n  jwks_file: jwks.json\n  issuer: ${ISSUER}\n  audience: ${AUDIENCE}\n  username_claim: email\n`,
);
const srv = await serve(t, inst);
const imapPort = srv.ports['imap'] ?? 0;
const pop3Port = srv.ports['pop3'] ?? 0;

/** Wait until the log holds a line matching `re` (the proxy logs each login and refusal). */
async function logLine(re: RegExp, ms = 60_000): Promise<string> {
  const deadline = Date.now() + ms;
  for (;;) {
    const line = readFileSync(join(inst.dir, 'pigeon.log'), 'utf8')
      .split('\n')
      .find((l) => re.test(l));
    if (line !== undefined || Date.now() > deadline) return line ?? '';
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** gsasl as an IMAP client: AUTHENTICATE through the proxy, then LOGOUT (stdin is empty). */
function gsaslImap(mech: string, user: string, pass: string): Promise<Done> {
  return run(GSASL, ['--connect', `127.0.0.1:${imapPort}`, '--imap', '--no-starttls', '--mechanism', mech, '-a', user, '-p', pass, '--verbose']);
}

t.test('SCRAM-SHA-256 is offered before login, with PLAIN and LOGIN, and not -PLUS', async (t) => {
  const w = await Wire.open(imapPort);
  t.teardown(() => w.close());
  const greeting = await w.until(/^\* OK.*\r\n/);
  t.match(greeting, / AUTH=PLAIN AUTH=LOGIN AUTH=SCRAM-SHA-256 AUTH=OAUTHBEARER AUTH=XOAUTH2\]/, 'the default list, and the OAuth two since oauth.jwks_file is set');
  t.notMatch(greeting, /PLUS/);
  const p = await Wire.open(pop3Port);
  t.teardown(() => p.close());
  await p.until(/^\+OK.*\r\n/);
  p.write('CAPA\r\n');
  t.match(await p.until(/\r\n\.\r\n/), /\r\nSASL PLAIN LOGIN SCRAM-SHA-256 OAUTHBEARER XOAUTH2\r\n/);
  p.write('AUTH\r\n');
  t.match(await p.until(/\r\n\.\r\n/), /^\+OK\r\nPLAIN\r\nLOGIN\r\nSCRAM-SHA-256\r\nOAUTHBEARER\r\nXOAUTH2\r\n\.\r\n$/);
});

t.test('gsasl logs in with SCRAM-SHA-256 over IMAP and reaches Dovecot', async (t) => {
  for (const [user, pass, how] of [
    ['sam@example.test', 'pencil', 'pigeon user add -s SCRAM-SHA-256'],
    ['dove@example.test', 'd0ve pass', "doveadm pw's line, imported from a passwd-file"],
  ] as const) {
    const r = await gsaslImap('SCRAM-SHA-256', user, pass);
    t.equal(r.code, 0, `${user} (${how}): gsasl exits 0 (${r.out.slice(-300)})`);
    t.match(r.out, /OK \[CAPABILITY IMAP4rev1[^\]]*\] Logged in/, "Dovecot's own tagged OK reaches the client");
    t.match(r.out, /server trusted/, "gsasl checked the server's signature");
    t.match(await logLine(new RegExp(`imap-login: Login: user=<${user}>, method=SCRAM-SHA-256`)), /Login:/, 'logged as a SCRAM login');
  }
});

t.test('a wrong password, an unknown user and a user without SCRAM keys fail alike, after the delay', async (t) => {
  for (const [user, pass, why] of [
    ['sam@example.test', 'pencil?', 'bad-credentials'],
    ['ghost@example.test', 'pencil', 'unknown-user'],
    ['alice@example.test', 'secret', 'bad-credentials'], // an {ARGON2ID} hash: no SCRAM keys
  ] as const) {
    const t0 = Date.now();
    const r = await gsaslImap('SCRAM-SHA-256', user, pass);
    const took = Date.now() - t0;
    t.not(r.code, 0, `${user}: gsasl fails`);
    t.match(r.out, /NO \[AUTHENTICATIONFAILED\] Authentication failed\./, 'the same answer as a wrong password');
    t.notMatch(r.out, /Logged in/);
    t.ok(took >= DELAY, `the failure delay was paid (${took} ms)`);
    t.match(await logLine(new RegExp(`auth failed \\(${why}\\): user=<${user.replace('.', '\\.')}>, method=SCRAM-SHA-256`)), /auth failed/, `logged as ${why}`);
  }
  const plain = await gsaslImap('PLAIN', 'alice@example.test', 'secret');
  t.equal(plain.code, 0, 'PLAIN still works for the user without SCRAM keys');
  t.match(plain.out, /Logged in/);
  const samPlain = await gsaslImap('PLAIN', 'sam@example.test', 'pencil');
  t.equal(samPlain.code, 0, 'and for a user with SCRAM keys too ({SCRAM-SHA-256} verifies a plaintext password)');
});

/**
 * gsasl as the SASL engine of a POP3 login (it speaks no POP3 itself): its client messages go
 * to the proxy as AUTH lines, the proxy's `+ ` challenges go back to it. Returns the proxy's
 * final line and gsasl's exit status.
 */
async function gsaslPop3(user: string, pass: string): Promise<{ final: string; code: number | null; stderr: string }> {
  const w = await Wire.open(pop3Port);
  await w.until(/^\+OK.*\r\n/);
  const g = spawn(GSASL, ['--client', '--no-cb', '--mechanism', 'SCRAM-SHA-256', '-a', user, '-p', pass], { stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  g.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const exited = new Promise<number | null>((res) => g.once('close', (c) => res(c)));
  const lines: string[] = [];
  let wake: (() => void) | null = null;
  createInterface({ input: g.stdout }).on('line', (l) => {
    lines.push(l);
    wake?.();
  });
  let closed = false;
  void exited.then(() => {
    closed = true;
    wake?.();
  });
  const nextOutput = async (): Promise<string | null> => {
    while (lines.length === 0 && !closed) await new Promise<void>((r) => (wake = r));
    return lines.shift() ?? null;
  };
  if ((await nextOutput()) !== 'SCRAM-SHA-256') throw new Error('gsasl did not name the mechanism first');
  w.write('AUTH SCRAM-SHA-256\r\n');
  let final = '';
  for (;;) {
    const line = await w.until(/\r\n/);
    if (!line.startsWith('+ ')) {
      final = line.trim();
      break;
    }
    const challenge = line.slice(2).trim();
    // the first, empty challenge asks for the client's first message, which gsasl printed already
    if (challenge !== '') g.stdin.write(`${challenge}\n`);
    const answer = await nextOutput();
    w.write(`${answer ?? '*'}\r\n`);
  }
  if (/^\+OK/.test(final)) {
    // the server's success carries no more data: gsasl's prompt for it gets an empty line
    g.stdin.write('\n');
    w.write('STAT\r\n');
    final += ` / ${(await w.until(/\r\n/)).trim()}`;
    w.write('QUIT\r\n');
    await w.until(/\r\n/);
  }
  g.stdin.end();
  w.close();
  return { final, code: await exited, stderr };
}

t.test('POP3 AUTH SCRAM-SHA-256 with gsasl as the SASL client', async (t) => {
  const ok = await gsaslPop3('sam@example.test', 'pencil');
  t.match(ok.final, /^\+OK Logged in\. \/ \+OK \d+ \d+$/, "logged in, and Dovecot's pop3 answers STAT");
  t.equal(ok.code, 0, `gsasl exits 0 (${ok.stderr.trim()})`);
  t.match(ok.stderr, /server trusted/, "gsasl checked the server's signature");
  const bad = await gsaslPop3('sam@example.test', 'wrong');
  t.equal(bad.final, '-ERR [AUTH] Authentication failed.');
  const noKeys = await gsaslPop3('alice@example.test', 'secret');
  t.equal(noKeys.final, '-ERR [AUTH] Authentication failed.', 'no SCRAM keys: refused like a wrong password');
});

/** A JWT for `email`, signed with the node's key unless told otherwise. */
async function token(email: string, o: { exp?: number; aud?: string; key?: typeof privateKey } = {}): Promise<string> {
  const now = Math.floor(Date.now() / 1000);
  return new SignJWT({ email })
    .setProtectedHeader({ alg: 'ES256', kid: 'k1' })
    .setIssuer(ISSUER)
    .setAudience(o.aud ?? AUDIENCE)
    .setIssuedAt(now - 60)
    .setExpirationTime(o.exp ?? now + 600)
    .sign(o.key ?? privateKey);
}

async function imapflowLogin(user: string, accessToken: string): Promise<{ ok: boolean; oauthError?: unknown; exists?: number }> {
  const c = new ImapFlow({ host: '127.0.0.1', port: imapPort, secure: false, doSTARTTLS: false, auth: { user, accessToken }, logger: false });
  c.on('error', () => undefined);
  try {
    await c.connect();
  } catch (e) {
    return { ok: false, oauthError: (e as { oauthError?: unknown }).oauthError };
  }
  const box = await c.mailboxOpen('INBOX');
  await c.logout();
  return { ok: true, exists: box.exists };
}

t.test('OAUTHBEARER (imapflow with an access token): a valid JWT logs in; expired, foreign or for another audience does not', async (t) => {
  const good = await imapflowLogin('alice@example.test', await token('alice@example.test'));
  t.equal(good.ok, true, 'a valid token for the user');
  t.equal(good.exists, 0, "and Dovecot's INBOX opens");
  t.match(await logLine(/imap-login: Login: user=<alice@example\.test>, method=OAUTHBEARER/), /Login/);
  const now = Math.floor(Date.now() / 1000);
  for (const [what, tok] of [
    ['expired', await token('alice@example.test', { exp: now - 3600 })],
    ['for another audience', await token('alice@example.test', { aud: 'other.example.test' })],
    ['signed by a key not in the JWKS', await token('alice@example.test', { key: stranger.privateKey })],
    ["for another user than the one logging in", await token('sam@example.test')],
  ] as const) {
    const t0 = Date.now();
    const r = await imapflowLogin('alice@example.test', tok);
    t.equal(r.ok, false, `a token ${what} is refused`);
    t.same(r.oauthError, { status: 'invalid_token', schemes: 'bearer' }, "RFC 7628's error challenge came first");
    t.ok(Date.now() - t0 >= DELAY, 'after the failure delay');
  }
});

t.test('XOAUTH2, and its error challenge answered with an empty line', async (t) => {
  const xoauth2 = (user: string, tok: string): string => Buffer.from(`user=${user}\x01auth=Bearer ${tok}\x01\x01`).toString('base64');
  const w = await Wire.open(imapPort);
  t.teardown(() => w.close());
  await w.until(/^\* OK.*\r\n/);
  w.write(`x1 AUTHENTICATE XOAUTH2 ${xoauth2('alice@example.test', await token('alice@example.test', { aud: 'elsewhere' }))}\r\n`);
  const challenge = await w.until(/\r\n/);
  t.equal(Buffer.from(challenge.replace(/^\+ /, '').trim(), 'base64').toString(), '{"status":"401","schemes":"bearer"}', 'the error as a JSON challenge');
  w.write('\r\n');
  t.match(await w.until(/x1 .*\r\n/), /^x1 NO \[AUTHENTICATIONFAILED\]/);
  w.write(`x2 AUTHENTICATE XOAUTH2 ${xoauth2('alice@example.test', await token('alice@example.test'))}\r\n`);
  t.match(await w.until(/x2 .*\r\n/), /x2 OK \[CAPABILITY IMAP4rev1[^\]]*\] Logged in/, 'a valid token logs in');
  w.write('x3 LOGOUT\r\n');
  await w.until(/x3 /);
});

t.test('SCRAM exchanges that go wrong: cancel, channel binding asked for, bad base64, a client that leaves', async (t) => {
  const b64 = (x: string): string => Buffer.from(x, 'latin1').toString('base64');
  const w = await Wire.open(imapPort);
  t.teardown(() => w.close());
  await w.until(/^\* OK.*\r\n/);
  w.write(`c1 AUTHENTICATE SCRAM-SHA-256 ${b64('n,,n=sam@example.test,r=abcdefgh')}\r\n`);
  const first = await w.until(/\r\n/);
  t.match(Buffer.from(first.replace(/^\+ /, '').trim(), 'base64').toString('latin1'), /^r=abcdefgh\S+,s=\S+,i=4096$/, 'server-first carries the nonce, salt and count');
  w.write('*\r\n');
  t.match(await w.until(/c1 .*\r\n/), /^c1 BAD Authentication aborted by client\./, '`*` cancels (no second tagged answer)');
  w.write('c2 NOOP\r\n');
  t.match(await w.until(/c2 .*\r\n/), /^c2 OK/, 'and the session reads on');
  w.write(`c3 AUTHENTICATE SCRAM-SHA-256 ${b64('p=tls-server-end-point,,n=sam@example.test,r=abcdefgh')}\r\n`);
  t.match(await w.until(/c3 .*\r\n/), /^c3 NO \[AUTHENTICATIONFAILED\]/, 'p= (channel binding, -PLUS is not offered) is refused like a wrong password');
  t.match(await logLine(/auth failed \(SCRAM: channel binding requested, but SCRAM-SHA-256-PLUS is not offered\)/), /auth failed/, 'and the log says why');
  w.write('c4 AUTHENTICATE SCRAM-SHA-256\r\n');
  await w.until(/^\+ \r\n/);
  w.write('not base64!\r\n');
  t.match(await w.until(/c4 .*\r\n/), /^c4 BAD Invalid base64/, 'bad base64 is a bad command');
  const p = await Wire.open(pop3Port);
  t.teardown(() => p.close());
  await p.until(/^\+OK.*\r\n/);
  p.write(`AUTH SCRAM-SHA-256 ${b64('n,,n=sam@example.test,r=abcdefgh')}\r\n`);
  t.match(await p.until(/\r\n/), /^\+ \S+\r\n$/, 'POP3: server-first');
  p.sock.destroy();
  t.match(await logLine(/pop3-login: auth failed \(bad-credentials\): user=<sam@example\.test>, method=SCRAM-SHA-256/), /auth failed/, 'a client that leaves mid-exchange counts as a failed login');
});

t.test('pigeon config test checks the JWKS file', async (t) => {
  const ok = inst.run(['config', 'test']);
  t.equal(ok.status, 0, ok.stderr);
  t.match(ok.stdout, /oauth\.jwks_file: \S+jwks\.json: 1 key\(s\); issuer https:\/\/id\.example\.test, audience mail\.example\.test, user from claim email/);
  // a drop-in naming a file that is not there (the running serve does not read it: no reload)
  const dropIn = join(inst.dir, 'conf.d', '99-broken-jwks.yaml');
  writeFileSync(dropIn, 'oauth:\n  jwks_file: missing.json\n');
  t.teardown(() => rmSync(dropIn, { force: true }));
  const bad = inst.run(['config', 'test']);
  t.equal(bad.status, 78, 'a JWKS file that cannot be read fails the test');
  t.match(bad.stderr, /oauth\.jwks_file \S+missing\.json: ENOENT; OAUTHBEARER\/XOAUTH2 logins would get NO \[UNAVAILABLE\]/);
  writeFileSync(join(inst.dir, 'private.json'), JSON.stringify({ keys: [await exportJWK(privateKey)] }));
  writeFileSync(dropIn, 'oauth:\n  jwks_file: private.json\n');
  const priv = inst.run(['config', 'test']);
  t.equal(priv.status, 0, 'a private key still verifies tokens');
  t.match(priv.stderr, /warning: oauth\.jwks_file \S+ holds private or symmetric key material/);
});

t.test('login.plaintext=never: PLAIN, LOGIN and the OAuth two are withdrawn, SCRAM-SHA-256 still works without TLS', async (t) => {
  t.equal(inst.run(['config', 'set', '--global', 'login.plaintext', 'never']).status, 0);
  // the proxy re-reads the policy in the background (at most 5 s old): wait for the greeting to change
  let greeting = '';
  const deadline = Date.now() + 60_000;
  while (!/LOGINDISABLED/.test(greeting) && Date.now() < deadline) {
    const w = await Wire.open(imapPort);
    greeting = await w.until(/^\* OK.*\r\n/);
    w.close();
    if (!/LOGINDISABLED/.test(greeting)) await new Promise((r) => setTimeout(r, 500));
  }
  t.match(greeting, /LOGINDISABLED AUTH=SCRAM-SHA-256\]/, 'only SCRAM-SHA-256 is offered on this plaintext connection');
  t.notMatch(greeting, /AUTH=(PLAIN|LOGIN|OAUTHBEARER|XOAUTH2)/);
  const plain = await gsaslImap('PLAIN', 'sam@example.test', 'pencil');
  t.not(plain.code, 0, 'PLAIN is refused');
  t.match(plain.out, /NO \[PRIVACYREQUIRED\]|does not support|not offered|mechanism/i);
  const scram = await gsaslImap('SCRAM-SHA-256', 'sam@example.test', 'pencil');
  t.equal(scram.code, 0, `SCRAM-SHA-256 logs in (${scram.out.slice(-200)})`);
  t.match(scram.out, /Logged in/);
  const p = await Wire.open(pop3Port);
  t.teardown(() => p.close());
  await p.until(/^\+OK.*\r\n/);
  p.write('CAPA\r\n');
  const capa = await p.until(/\r\n\.\r\n/);
  t.match(capa, /\r\nSASL SCRAM-SHA-256\r\n/);
  t.notMatch(capa, /\r\nUSER\r\n/);
  p.write(`AUTH XOAUTH2 ${Buffer.from('x').toString('base64')}\r\n`);
  t.match(await p.until(/\r\n/), /^-ERR \[AUTH\] Plaintext authentication disallowed/, 'a bearer token is a password: refused without TLS');
});
