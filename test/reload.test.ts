// SIGHUP to `pigeon serve`: the new auth chain (a passwd-file source added), the new client
// certificate and the new settings apply to the next login without a restart; a configuration
// that does not load is logged and the old one keeps working whole; what a reload cannot apply
// (here a new listener) is named in the one reload line. Checked with imapflow logins and a TLS
// client against the real daemon and Dovecot.
import t from 'tap';
import { ImapFlow } from 'imapflow';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { connect } from 'node:net';
import { connect as tlsConnect, type PeerCertificate } from 'node:tls';
import { makeInstance, serve } from './helpers/instance.js';
import { requireProgram } from './helpers/programs.js';
import { createCa, issueHostCert, writeKeyPair } from '../certs/ca.js';

t.setTimeout(240_000);

/** Log in (and out) with imapflow; true when the server accepted the password. */
async function login(port: number, user: string, pass: string): Promise<boolean> {
  const c = new ImapFlow({ host: '127.0.0.1', port, secure: false, doSTARTTLS: false, auth: { user, pass }, logger: false, emitLogs: false, connectionTimeout: 60_000 } as ConstructorParameters<typeof ImapFlow>[0]);
  c.on('error', () => {});
  try {
    await c.connect();
  } catch (e) {
    if ((e as { authenticationFailed?: boolean }).authenticationFailed === true) return false;
    throw e;
  }
  await c.logout();
  return true;
}

/** The certificate STARTTLS presents (no SNI). */
async function starttlsCert(port: number): Promise<PeerCertificate> {
  const raw = connect(port, '127.0.0.1');
  let got = '';
  const wait = (re: RegExp): Promise<void> =>
    new Promise((res, rej) => {
      const on = (d: Buffer): void => {
        got += d.toString('latin1');
        if (re.test(got)) {
          raw.off('data', on);
          res();
        }
      };
      raw.on('data', on);
      raw.once('error', rej);
    });
  await wait(/^\* OK.*\r\n/);
  raw.write('s1 STARTTLS\r\n');
  await wait(/s1 OK.*\r\n/);
  const s = tlsConnect({ socket: raw, rejectUnauthorized: false });
  await new Promise<void>((res, rej) => {
    s.once('secureConnect', () => res());
    s.once('error', rej);
  });
  const cert = s.getPeerCertificate();
  s.destroy();
  return cert;
}

/** Wait until the daemon's log has one more line matching `re` than `before` (the reload's answer). */
async function logged(file: string, re: RegExp, before: number, ms = 90_000): Promise<string> {
  const deadline = Date.now() + ms;
  for (;;) {
    const lines = readFileSync(file, 'utf8').split('\n').filter((l) => re.test(l));
    if (lines.length > before || Date.now() > deadline) return lines[before] ?? '';
    await new Promise((r) => setTimeout(r, 100));
  }
}
const count = (file: string, re: RegExp): number => readFileSync(file, 'utf8').split('\n').filter((l) => re.test(l)).length;

t.test('SIGHUP reloads the auth chain, client certificate and settings; a bad configuration keeps the old one; a restart-only change is named', async (t) => {
  if (!requireProgram(t, '/usr/lib/dovecot/imap', 'dovecot-imapd')) return;
  const inst = makeInstance(t, { listen: ['imap=127.0.0.1:0'], users: { 'alice@example.test': 'pw' } });
  const log = join(inst.dir, 'pigeon.log');
  const s = await serve(t, inst);
  const port = s.ports['imap'] ?? 0;
  const RELOADED = /master: .*configuration reloaded/;
  const FAILED = /master: Error: reload failed, keeping the old configuration/;

  t.equal(await login(port, 'alice@example.test', 'pw'), true, 'alice logs in (database)');
  t.equal(await login(port, 'bob@example.test', 'bobpw'), false, 'bob is unknown before the reload');
  const certBefore = await starttlsCert(port);

  // a passwd-file source in the chain, and a new client certificate
  const hash = inst.run(['pw', '-s', 'SHA512-CRYPT'], 'bobpw\n').stdout.trim();
  writeFileSync(join(inst.dir, 'users'), `bob@example.test:${hash}\n`);
  const pub = await createCa('public');
  writeKeyPair(await issueHostCert(pub, 'mail.example.org', ['mail.example.org']), join(inst.dir, 'mail.crt'), join(inst.dir, 'mail.key'));
  writeFileSync(join(inst.dir, 'conf.d', '70-reload.yaml'), 'auth:\n  chain: [database, passwd-file]\n  passwd_file: users\ntls:\n  cert: mail.crt\n  key: mail.key\n');
  let n = count(log, RELOADED);
  s.child.kill('SIGHUP');
  const line = await logged(log, RELOADED, n);
  t.match(line, /master: configuration reloaded \(/, 'the reload is logged');
  t.notMatch(line, /needs a restart/, 'nothing here needs a restart');
  t.equal(await login(port, 'bob@example.test', 'bobpw'), true, 'bob logs in through the new passwd-file source');
  t.equal(await login(port, 'alice@example.test', 'pw'), true, 'alice still does');
  const certAfter = await starttlsCert(port);
  t.not(certAfter.fingerprint256, certBefore.fingerprint256, 'STARTTLS presents the new certificate');
  t.equal(certAfter.subject.CN, 'mail.example.org');

  // a configuration that does not load: an error line, and everything keeps working as it was
  writeFileSync(join(inst.dir, 'conf.d', '80-bad.yaml'), 'limits:\n  no_such_limit: 1\n');
  n = count(log, FAILED);
  s.child.kill('SIGHUP');
  t.match(await logged(log, FAILED, n), /80-bad\.yaml:\d+:\d+: .*no_such_limit/, 'the error names the file, line and key');
  t.equal(await login(port, 'bob@example.test', 'bobpw'), true, 'the old configuration (with the passwd-file) stays in force');
  rmSync(join(inst.dir, 'conf.d', '80-bad.yaml'));

  // a second listener cannot be opened by a reload: named in the one reload line
  writeFileSync(join(inst.dir, 'conf.d', '90-listen.yaml'), 'listen:\n  - imap=127.0.0.1:0\n  - pop3=127.0.0.1:0\n');
  n = count(log, RELOADED);
  s.child.kill('SIGHUP');
  const warn = await logged(log, RELOADED, n);
  t.match(warn, /master: Warning: configuration reloaded \(.*\); needs a restart to take effect: listen \(imap=127\.0\.0\.1:0 pop3=127\.0\.0\.1:0\)$/, 'one line names the listeners as needing a restart');
  t.equal(await login(port, 'bob@example.test', 'bobpw'), true, 'the rest of the configuration applies');
  t.equal(readFileSync(log, 'utf8').split('\n').filter((l) => /needs a restart/.test(l)).length, 1, 'said once, in that line');
});
