// The upstream backend (backends/upstream.ts): `pigeon serve` as a plain IMAP/POP3 proxy in front
// of a second, independent Dovecot (test/helpers/upstream-dovecot.ts: its own passdb, Maildirs,
// certificate and ports). IMAP and POP3 over implicit TLS and STARTTLS; logins local (local
// password check, same credentials upstream), passthrough (the user exists only upstream) and
// master (user*master); the upstream's own capabilities after login; IDLE and a large FETCH
// through the proxy with imapflow; curl reading a message; an upstream refusal answered exactly
// like a local wrong password; upstream down, a certificate from another CA, and a certificate
// that does not name the address connected to: NO [UNAVAILABLE] / -ERR [SYS/TEMP] and a log line
// naming the upstream's host:port.
import t from 'tap';
import type { Test } from 'tap';
import { ImapFlow } from 'imapflow';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { makeInstance, serve, putMessage, message, freePort } from './helpers/instance.js';
import { upstreamDovecot } from './helpers/upstream-dovecot.js';
import { requireProgram } from './helpers/programs.js';
import { Wire } from './helpers/wire.js';

const MASTER = { user: 'proxymaster', password: 'm4ster-pw' };

t.test('upstream backend in front of an independent Dovecot', async (t) => {
  const up = await upstreamDovecot(
    t,
    {
      'alice@local.test': 'secret',
      'gina@local.test': 'gina-upstream',
      'erin@pass.test': 'erin-pw',
      'pop@local.test': 'pop-pw',
      'nina@local.test': 'nina-pw',
    },
    MASTER,
  );
  if (!up) return;
  const inst = makeInstance(t, { listen: ['imap=127.0.0.1:0', 'pop3=127.0.0.1:0'] });
  // the local users (a Dovecot passwd-file import: one CLI run for all of them and their domains)
  const LOCAL: Record<string, string> = {
    'alice@local.test': 'secret',
    'gina@local.test': 'gina-local',
    'pop@local.test': 'pop-pw',
    'nina@local.test': 'nina-pw',
    'ivan@local.test': 'pw',
    'hank@local.test': 'pw',
    'ida@local.test': 'pw',
    'frank@master.test': 'frank-local',
  };
  const users = join(inst.dir, 'users.passwd');
  writeFileSync(users, Object.entries(LOCAL).map(([u, p]) => `${u}:{PLAIN}${p}\n`).join(''));
  const imported = inst.run(['user', 'import', 'passwd-file', users, '--create-domains']);
  if (imported.status !== 0) throw new Error(`user import: ${imported.stderr}`);
  const masterFile = join(inst.dir, 'upstream-master.pass');
  writeFileSync(masterFile, `${MASTER.password}\n`, { mode: 0o600 });
  writeFileSync(join(inst.dir, 'conf.d', '60-upstream.yaml'), `upstream:\n  master_password_file: ${masterFile}\n`);
  const set = (scope: string[], key: string, value: string): void => {
    const r = inst.run(['config', 'set', ...scope, key, value]);
    if (r.status !== 0) throw new Error(`config set ${key} ${value}: ${r.stderr}`);
  };
  const setAll = (scope: string[], settings: Record<string, string>): void => {
    for (const [k, v] of Object.entries(settings)) set(scope, k, v);
  };
  // everyone: the upstream Dovecot over implicit TLS, verified with its CA (scopes below differ)
  setAll(['--global'], { 'imap.backend': 'upstream', 'pop3.backend': 'upstream', 'upstream.host': '127.0.0.1', 'upstream.port': String(up.ports.imaps), 'upstream.ca': up.caFile });
  // the POP3 user: STLS on the plain POP3 port
  setAll(['--user', 'pop@local.test'], { 'upstream.port': String(up.ports.pop3), 'upstream.tls': 'starttls' });
  // pass.test: its users exist only upstream, STARTTLS
  inst.run(['domain', 'add', 'pass.test']);
  setAll(['--domain', 'pass.test'], { 'upstream.port': String(up.ports.imap), 'upstream.tls': 'starttls', 'upstream.login': 'passthrough' });
  // master.test: the local password is checked, then user*proxymaster goes upstream
  setAll(['--domain', 'master.test'], { 'upstream.login': 'master', 'upstream.master_user': MASTER.user });
  // nina: no TLS to the loopback server
  setAll(['--user', 'nina@local.test'], { 'upstream.tls': 'none', 'upstream.port': String(up.ports.imap) });
  // broken: a port nothing listens on, a CA that did not sign, an address the certificate does not name
  const downPort = await freePort();
  set(['--user', 'ivan@local.test'], 'upstream.port', String(downPort));
  set(['--user', 'hank@local.test'], 'upstream.ca', up.otherCaFile);
  set(['--user', 'ida@local.test'], 'upstream.host', '127.0.0.2');
  const srv = await serve(t, inst);
  const imapPort = srv.ports['imap'] ?? 0;
  const pop3Port = srv.ports['pop3'] ?? 0;
  const proxyCa = readFileSync(join(inst.dir, 'certs', 'ca.crt'));
  const log = (): string => readFileSync(join(inst.dir, 'pigeon.log'), 'utf8');

  function client(user: string, pass: string): ImapFlow {
    // STARTTLS to the proxy, verified with the instance's CA
    return new ImapFlow({ host: '127.0.0.1', port: imapPort, secure: false, tls: { ca: [proxyCa], servername: 'localhost' }, auth: { user, pass }, logger: false, verifyOnly: false } as ConstructorParameters<typeof ImapFlow>[0]);
  }

  async function imapLogin(user: string, pass: string): Promise<{ w: Wire; answer: string }> {
    const w = await Wire.open(imapPort);
    await w.until(/\r\n/);
    w.write(`a1 LOGIN "${user}" "${pass}"\r\n`);
    return { w, answer: await w.until(/^a1 .*\r\n/m) };
  }

  t.test('local login over implicit TLS: the upstream mailbox, its capabilities, IDLE, a large FETCH', async (t) => {
    const md = up.maildir('alice@local.test');
    putMessage(md, message('kept upstream', 'upstream body 42'));
    const c = client('alice@local.test', 'secret');
    await c.connect();
    t.teardown(() => c.close());
    t.ok(c.capabilities.has(up.marker), "after login the client sees the upstream server's capabilities");
    t.notOk(c.capabilities.has('AUTH=PLAIN'), 'no pre-login capability after login');
    const lock = await c.getMailboxLock('INBOX');
    try {
      t.equal((c.mailbox as { exists: number }).exists, 1, "SELECT sees the upstream's INBOX");
      const m = await c.fetchOne('1', { envelope: true, source: true });
      t.equal(m && m.envelope?.subject, 'kept upstream');
      // IDLE: a message arriving upstream is announced through the proxy
      const seen = new Promise<number>((res) => c.on('exists', (d: { count: number }) => res(d.count)));
      const idle = c.idle();
      putMessage(md, message('arrived while idling', 'x'));
      t.equal(await seen, 2, 'EXISTS through the proxy while idling');
      void idle;
      // a large FETCH (4 MB) comes through whole
      const line = `${'y'.repeat(76)}\r\n`;
      const big = message('big one', line.repeat(Math.ceil((4 * 1024 * 1024) / line.length)));
      putMessage(md, big);
      await c.noop(); // the session learns of it
      t.equal((c.mailbox as { exists: number }).exists, 3);
      const got = await c.fetchOne('3', { source: true });
      t.equal(got && got.source?.length, Buffer.byteLength(big), 'the whole 4 MB message');
      t.equal(got && createHash('sha256').update(got.source ?? Buffer.alloc(0)).digest('hex'), createHash('sha256').update(big).digest('hex'), 'byte for byte');
    } finally {
      lock.release();
    }
    await c.logout();
    t.match(log(), /imap-login: Login: user=<alice@local\.test>, method=PLAIN/);
    t.notMatch(log(), /secret/, 'no password in the log');
  });

  t.test('curl reads the mail through the proxy (what a new user would try)', async (t) => {
    if (!requireProgram(t, '/usr/bin/curl', 'curl')) return;
    const r = spawnSync('curl', ['-sS', '--max-time', '120', '--user', 'alice@local.test:secret', `imap://127.0.0.1:${imapPort}/INBOX;UID=1`], { encoding: 'utf8' });
    t.equal(r.status, 0, `curl exit 0 ${r.stderr}`);
    t.match(r.stdout, /Subject: kept upstream/);
    t.match(r.stdout, /upstream body 42/);
  });

  t.test('upstream.tls none: allowed to a loopback address', async (t) => {
    const { w, answer } = await imapLogin('nina@local.test', 'nina-pw');
    t.teardown(() => w.close());
    // the login answer carries the upstream's own capabilities
    t.match(answer, new RegExp(`^a1 OK \\[CAPABILITY [^\\]]*\\b${up.marker}\\b[^\\]]*\\] Logged in\\r\\n`, 'm'));
    w.write('a2 SELECT INBOX\r\n');
    t.match(await w.until(/^a2 .*\r\n/m), /^a2 OK/m, 'the session runs');
  });

  t.test('passthrough over STARTTLS: a user unknown here logs in with the upstream password', async (t) => {
    t.equal(inst.run(['user', 'show', 'erin@pass.test']).status, 67, 'erin does not exist locally');
    putMessage(up.maildir('erin@pass.test'), message('for erin', 'passthrough body'));
    const c = client('erin@pass.test', 'erin-pw');
    await c.connect();
    t.teardown(() => c.close());
    const lock = await c.getMailboxLock('INBOX');
    try {
      const m = await c.fetchOne('1', { source: true });
      t.match(m && m.source?.toString(), /passthrough body/);
    } finally {
      lock.release();
    }
    await c.logout();
    t.match(log(), /imap-login: Login: user=<erin@pass\.test>/);
  });

  t.test('an upstream refusal is answered exactly like a local wrong password', async (t) => {
    const local = await imapLogin('alice@local.test', 'wrong');
    t.teardown(() => local.w.close());
    t.match(local.answer, /^a1 NO \[AUTHENTICATIONFAILED\] Authentication failed\.\r\n$/m);
    // gina passes the local check, but upstream has another password
    const refused = await imapLogin('gina@local.test', 'gina-local');
    t.teardown(() => refused.w.close());
    t.equal(refused.answer, local.answer, 'local mode: same answer as a wrong password');
    // passthrough: the upstream alone decides
    const pt = await imapLogin('erin@pass.test', 'not-erins');
    t.teardown(() => pt.w.close());
    t.equal(pt.answer, local.answer, 'passthrough: same answer as a wrong password');
    t.match(log(), new RegExp(`auth failed \\(upstream 127\\.0\\.0\\.1:${up.ports.imaps} refused the login: NO \\[AUTHENTICATIONFAILED\\][^)]*\\): user=<gina@local\\.test>`));
    t.match(log(), /auth failed \(upstream 127\.0\.0\.1:\d+ refused the login[^)]*\): user=<erin@pass\.test>/);
    t.notMatch(log(), /gina-local|not-erins/, 'no password in the log');
  });

  t.test('master login: user*master with the node-local master password', async (t) => {
    putMessage(up.maildir('frank@master.test'), message('for frank', 'master body'));
    const c = client('frank@master.test', 'frank-local');
    await c.connect();
    t.teardown(() => c.close());
    const lock = await c.getMailboxLock('INBOX');
    try {
      const m = await c.fetchOne('1', { source: true });
      t.match(m && m.source?.toString(), /master body/);
    } finally {
      lock.release();
    }
    await c.logout();
    t.match(up.log(), /frank@master\.test/, 'the upstream logged frank in');
    t.notMatch(log(), new RegExp(MASTER.password), 'no master password in the log');
    // the local password is still checked first
    const bad = await imapLogin('frank@master.test', 'wrong');
    t.teardown(() => bad.w.close());
    t.match(bad.answer, /^a1 NO \[AUTHENTICATIONFAILED\]/m);
  });

  t.test('POP3: STLS and implicit TLS upstream, local and passthrough logins', async (t) => {
    putMessage(up.maildir('pop@local.test'), message('pop upstream', 'pop body'));
    const pop = async (user: string, pass: string): Promise<Wire> => {
      const w = await Wire.open(pop3Port);
      t.teardown(() => w.close());
      await w.until(/\r\n/);
      w.write(`USER ${user}\r\n`);
      await w.until(/\r\n/);
      w.write(`PASS ${pass}\r\n`);
      return w;
    };
    const w = await pop('pop@local.test', 'pop-pw');
    t.match(await w.until(/\r\n/), /^\+OK Logged in\./);
    w.write('STAT\r\n');
    t.match(await w.until(/\r\n/), /^\+OK 1 \d+/);
    w.write('RETR 1\r\n');
    t.match(await w.until(/\r\n\.\r\n/), /pop body/);
    w.write('QUIT\r\n');
    await w.waitClosed();
    // alice's domain: implicit TLS on the POP3S port
    set(['--user', 'alice@local.test'], 'upstream.port', String(up.ports.pop3s));
    const w2 = await pop('alice@local.test', 'secret');
    t.match(await w2.until(/\r\n/), /^\+OK Logged in\./);
    w2.write('STAT\r\n');
    t.match(await w2.until(/\r\n/), /^\+OK [1-9]\d* \d+/);
    w2.write('QUIT\r\n');
    await w2.waitClosed();
    set(['--user', 'alice@local.test'], 'upstream.port', String(up.ports.imaps));
    // passthrough over STLS, and a refusal: the same words as a local wrong password
    set(['--domain', 'pass.test'], 'upstream.port', String(up.ports.pop3));
    t.teardown(() => set(['--domain', 'pass.test'], 'upstream.port', String(up.ports.imap)));
    const w3 = await pop('erin@pass.test', 'erin-pw');
    t.match(await w3.until(/\r\n/), /^\+OK Logged in\./);
    w3.write('QUIT\r\n');
    await w3.waitClosed();
    const local = await pop('alice@local.test', 'wrong');
    const localAnswer = await local.until(/\r\n/);
    t.match(localAnswer, /^-ERR \[AUTH\] Authentication failed\./);
    const refused = await pop('erin@pass.test', 'wrong');
    t.equal(await refused.until(/\r\n/), localAnswer, 'upstream refusal = local wrong password');
  });

  /** A user of local.test pointed somewhere broken: the client gets UNAVAILABLE, the log names host:port. */
  async function unavailable(t: Test, user: string, logWhy: RegExp): Promise<void> {
    const { w, answer } = await imapLogin(user, 'pw');
    t.teardown(() => w.close());
    t.match(answer, /^a1 NO \[UNAVAILABLE\]/m);
    t.match(log(), logWhy);
    const p = await Wire.open(pop3Port);
    t.teardown(() => p.close());
    await p.until(/\r\n/);
    p.write(`USER ${user}\r\nPASS pw\r\n`);
    t.match(await p.until(/^(-ERR|\+OK Logged).*\r\n/m), /-ERR \[SYS\/TEMP\]/);
  }

  t.test('upstream down: UNAVAILABLE and a log line naming it', async (t) => {
    await unavailable(t, 'ivan@local.test', new RegExp(`Backend failure: start-failed: upstream 127\\.0\\.0\\.1:${downPort}: connect/TLS failed: ECONNREFUSED`));
  });

  t.test('a certificate upstream.ca did not sign: UNAVAILABLE', async (t) => {
    await unavailable(t, 'hank@local.test', new RegExp(`Backend failure: start-failed: upstream 127\\.0\\.0\\.1:${up.ports.imaps}: connect/TLS failed: [A-Z_]*(CERT|ISSUER|SIGNATURE)`));
  });

  t.test('a certificate that does not name the address connected to: UNAVAILABLE', async (t) => {
    await unavailable(t, 'ida@local.test', /Backend failure: start-failed: upstream 127\.0\.0\.2:\d+: connect\/TLS failed: ERR_TLS_CERT_ALTNAME_INVALID/);
  });
});
