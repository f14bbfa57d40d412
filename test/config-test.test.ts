/**
 * `pigeon config test` beyond parsing: the certificate pairs clients and peers see (tls.*,
 * tls.sni, peer.*), the binary of every backend some scope selects (and who selects it), and a
 * fresh instance that serves a Courier user as it is. (Files and database: config-file.test.ts.)
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { chmodSync, cpSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createCa, issueHostCert, writeKeyPair } from '../certs/ca.js';
import { requireProgram } from './helpers/programs.js';
import { courierBinaries } from './helpers/backends.js';
import { CLI_JS as CLI, cleanEnv, runCli, templateInstances, type CliRun } from './helpers/cli.js';

// tap's per-file timeout for this file: it ran 37 s alone on a lightly loaded machine, and two
// suites at once on 2 cores make a file take 2-3 times as long (the default is 180 s, .taprc)
t.setTimeout(240_000);

type Run = CliRun;
const run = runCli;

const { root, instance } = templateInstances(t, ['--node', 'cfg1', '--listen', 'imap=127.0.0.1:1143']);

t.test('config test checks the certificates clients see (tls.cert, tls.sni) and the node certificate (peer.cert)', async (t) => {
  const dir = instance();
  const DAY = 86400_000;
  // a "public" CA, not the cluster's: what an admin buys or gets from ACME
  const pub = await createCa('public');
  const pair = async (name: string, file: string, validity: { notBefore?: Date; notAfter?: Date } = {}): Promise<void> =>
    writeKeyPair(await issueHostCert(pub, name, [name], validity), join(dir, `${file}.crt`), join(dir, `${file}.key`));
  await pair('mail.example.org', 'mail');
  await pair('imap.example.net', 'net');
  await pair('old.example.org', 'old', { notBefore: new Date(Date.now() - 10 * DAY), notAfter: new Date(Date.now() - DAY) });
  await pair('soon.example.org', 'soon', { notAfter: new Date(Date.now() + 5 * DAY) });
  const conf = (text: string): Run => {
    writeFileSync(join(dir, 'conf.d', '60-tls.yaml'), text);
    return run(['-c', dir, 'config', 'test']);
  };

  const good = conf('tls:\n  cert: mail.crt\n  key: mail.key\n  sni:\n    imap.example.net: { cert: net.crt, key: net.key }\n');
  t.equal(good.code, 0, `a public certificate for clients and an SNI entry: OK (${good.err})`);
  t.match(good.out, new RegExp(`^tls: ${join(dir, 'mail.crt')} \\(mail\\.example\\.org;`, 'm'), 'names the client certificate and its names');
  t.match(good.out, /^tls\.sni\.imap\.example\.net: .*net\.crt \(imap\.example\.net;/m, 'and the SNI entry');
  t.match(good.out, new RegExp(`^peer: ${join(dir, 'certs', 'node.crt')} \\(node cfg1 from the cluster CA`, 'm'), 'peer links keep the node certificate');

  const mismatch = conf('tls:\n  cert: mail.crt\n  key: net.key\n');
  t.equal(mismatch.code, 78, 'a key that is not the certificate\'s: exit 78');
  t.match(mismatch.err, `pigeon: error: tls.key: ${join(dir, 'net.key')} is not the private key of ${join(dir, 'mail.crt')}`);

  const expired = conf('tls:\n  cert: old.crt\n  key: old.key\n');
  t.equal(expired.code, 78, 'an expired client certificate: exit 78');
  t.match(expired.err, new RegExp(`tls\\.cert: ${join(dir, 'old.crt')} expired on \\d{4}-`));

  const soon = conf('tls:\n  cert: soon.crt\n  key: soon.key\n');
  t.equal(soon.code, 0, 'a certificate that expires soon still works');
  t.match(soon.err, /pigeon: warning: tls\.cert: .*soon\.crt expires in [45] days/, 'with a warning');

  const two = conf('tls:\n  sni:\n    x.example.org: { cert: missing.crt, key: missing.key }\npeer:\n  cert: mail.crt\n  key: mail.key\n');
  t.equal(two.code, 78, 'an unreadable SNI pair and a peer certificate from another CA: exit 78');
  t.match(two.err, `tls.sni.x.example.org.cert: cannot read ${join(dir, 'missing.crt')}: ENOENT`, 'the SNI entry is named');
  t.match(two.err, /peer\.cert\/peer\.key: .*mail\.crt: certificate of mail\.example\.org was not issued by this cluster's CA/, 'the peer pair must come from the cluster CA');
  t.match(two.err, /configuration test failed: 2 problems/, 'every problem is reported, not only the first');

  const badName = conf('tls:\n  sni:\n    "mail example": { cert: mail.crt, key: mail.key }\n');
  t.equal(badName.code, 78, 'an SNI key that is not a host name: exit 78');
  t.match(badName.err, /60-tls\.yaml:\d+:\d+: tls\.sni\.mail example: a host name/);
});

t.test('config test starts the binary of every backend some scope selects, and names who selects it', async (t) => {
  const dir = instance();
  const C = ['-c', dir];
  for (const a of [
    ['domain', 'add', 'example.org'],
    ['domain', 'add', 'example.net'],
  ]) run([...C, ...a]);
  for (const [u, home] of [
    ['u1@example.org', null],
    ['far@example.net', 'other-node'],
  ] as const) {
    const r = run([...C, 'user', 'add', u, '--password-stdin', ...(home ? ['--home', home] : [])], { input: 'pw\n' });
    t.equal(r.code, 0, r.err);
  }
  const courier = courierBinaries();
  if (!requireProgram(t, courier.imapd, 'courier-imap (.deb unpacked by scripts/install-deps.sh)')) return;
  const fake = join(dir, 'fake-pop3d.sh');
  writeFileSync(fake, '#!/bin/sh\nexit 0\n');
  chmodSync(fake, 0o755);
  // a copy of Courier's imapd whose library cannot be found: the loader refuses to start it
  const broken = join(dir, 'imapd-broken');
  const elf = readFileSync(courier.imapd);
  const at = elf.indexOf('libfam.so.0\0');
  t.ok(at > 0, 'imapd links libfam.so.0');
  elf.write('libfam.so.9', at, 'latin1');
  writeFileSync(broken, elf, { mode: 0o755 });

  const base = run([...C, 'config', 'test']);
  t.equal(base.code, 0, `nobody uses Courier: only Dovecot is checked (${base.err})`);
  t.match(base.out, /^imap\.backend dovecot: \/usr\/lib\/dovecot\/imap starts \(default\)$/m);
  t.notMatch(base.out, /courier/, 'Courier is not checked while nobody selects it');

  t.equal(run([...C, 'config', 'set', '--domain', 'example.org', 'imap.backend', 'courier']).code, 0);
  t.equal(run([...C, 'config', 'set', '--user', 'u1@example.org', 'pop3.backend', 'courier']).code, 0);
  // a user homed on another node: that node's binaries, not ours
  t.equal(run([...C, 'config', 'set', '--user', 'far@example.net', 'imap.backend', 'courier']).code, 0);
  writeFileSync(join(dir, 'conf.d', '60-courier.yaml'), `courier:\n  imapd: ${join(dir, 'no-such-imapd')}\n  pop3d: ${fake}\n`);
  const bad = run([...C, 'config', 'test']);
  t.equal(bad.code, 78, 'binaries that cannot serve the users who select them: exit 78');
  t.match(bad.err, `pigeon: error: courier.imapd: ${join(dir, 'no-such-imapd')}: no such file; selected by imap.backend = courier (domain example.org): those logins would get NO [UNAVAILABLE]`, 'a missing binary, with the scope that selects it');
  t.notMatch(bad.err, /far@example\.net/, 'the user homed on another node does not count here');
  t.match(bad.err, `pigeon: error: courier.pop3d: ${fake} does not behave like Courier's courierpop3d`, 'another program at the path');
  t.match(bad.err, /selected by pop3\.backend = courier \(user u1@example\.org\)/);
  t.notMatch(bad.out, /configuration OK/, 'never OK with a problem');

  writeFileSync(join(dir, 'conf.d', '60-courier.yaml'), `courier:\n  imapd: ${broken}\n  pop3d: ${courier.pop3d}\n`);
  const lib = run([...C, 'config', 'test']);
  t.equal(lib.code, 78, 'a binary whose libraries do not load: exit 78');
  t.match(lib.err, `courier.imapd: ${broken} cannot start: `, 'it was started, not only looked at');
  t.match(lib.err, /libfam\.so\.9/, 'and the loader\'s reason is shown');

  writeFileSync(join(dir, 'conf.d', '60-courier.yaml'), `courier:\n  imapd: ${courier.imapd}\n  pop3d: ${courier.pop3d}\n`);
  const good = run([...C, 'config', 'test']);
  t.equal(good.code, 0, `working paths: OK (${good.err})`);
  t.match(good.out, new RegExp(`^imap\\.backend courier: ${courier.imapd} starts \\(domain example\\.org\\)$`, 'm'));
  t.match(good.out, new RegExp(`^pop3\\.backend courier: ${courier.pop3d} starts \\(user u1@example\\.org\\)$`, 'm'));
});

t.test('a fresh instance serves a Courier user as it is (init finds Courier; config test agrees with the login)', async (t) => {
  const courier = courierBinaries();
  if (!requireProgram(t, courier.imapd, 'courier-imap (.deb unpacked by scripts/install-deps.sh)')) return;
  if (!requireProgram(t, courier.pop3d, 'courier-pop (.deb unpacked by scripts/install-deps.sh)')) return;
  const dir = join(root, 'fresh-courier');
  t.equal(run(['init', dir, '--node', 'fresh']).code, 0);
  const C = ['-c', dir];
  run([...C, 'domain', 'add', 'example.test']);
  run([...C, 'user', 'add', 'cora@example.test', '--password-stdin'], { input: 'c0ra\n' });
  for (const k of ['imap.backend', 'pop3.backend']) t.equal(run([...C, 'config', 'set', '--global', k, 'courier']).code, 0);
  t.match(readFileSync(join(dir, 'pigeon.yaml'), 'utf8'), `imapd: ${courier.imapd}`, "pigeon.yaml names this machine's imapd");
  const ct = run([...C, 'config', 'test']);
  t.equal(ct.code, 0, `config test: OK (${ct.err})`);
  const imap = spawnSync(process.execPath, [CLI, ...C, 'imap', '--forker', 'stdio'], { input: 'a1 LOGIN cora@example.test c0ra\r\na2 LOGOUT\r\n', encoding: 'utf8', env: cleanEnv() });
  t.match(imap.stdout, /a1 OK \[CAPABILITY [^\]]*QUOTA[^\]]*\] Logged in/, "the login is answered with Courier's capabilities, no [UNAVAILABLE]");
  const pop3 = spawnSync(process.execPath, [CLI, ...C, 'pop3', '--forker', 'stdio'], { input: 'USER cora@example.test\r\nPASS c0ra\r\nQUIT\r\n', encoding: 'utf8', env: cleanEnv() });
  t.match(pop3.stdout, /\+OK logged in\.\r\n/, 'courierpop3d greets the POP3 login');
});

t.test('a node.crt that serve refuses fails config test too (one check for both)', async (t) => {
  // another certificate for this node's name from the cluster CA, issued through a copy of the
  // instance (its database records the announcement, this one's does not): a second node with
  // the same name, as far as this instance's registry knows
  const dir = instance();
  const other = instance();
  const out = `${other}-issued`; // beside the copy it was issued through, one per copy
  const issued = run(['-c', other, 'cert', 'issue', 'cfg1', '--out', out]);
  t.equal(issued.code, 0, `cert issue (${issued.err})`);
  cpSync(join(out, 'node.crt'), join(dir, 'certs', 'node.crt'));
  cpSync(join(out, 'node.key'), join(dir, 'certs', 'node.key'));
  const serve = run(['-c', dir, 'serve', '--workers', '1']);
  t.equal(serve.code, 78, `serve refuses it (${serve.err})`);
  t.match(serve.err, /pigeon: error: .*node name cfg1 is already registered with another certificate/);
  const ct = run(['-c', dir, 'config', 'test']);
  t.equal(ct.code, 78, 'config test fails with it');
  t.match(ct.err, /pigeon: error: peer\.cert: .*node\.crt: node name cfg1 is already registered with another certificate/, 'naming the file and why');
  t.notMatch(ct.out, /configuration OK/);

  // a peer listener other nodes cannot reach: serve's check, config test's too
  const dir2 = instance();
  writeFileSync(join(dir2, 'conf.d', '60-peer.yaml'), 'listen:\n  - peer=0.0.0.0:4190\n');
  const s2 = run(['-c', dir2, 'serve', '--workers', '1']);
  t.equal(s2.code, 78, `serve refuses an unreachable peer address (${s2.err})`);
  const c2 = run(['-c', dir2, 'config', 'test']);
  t.equal(c2.code, 78, 'and config test fails');
  t.match(c2.err, /peer listener on 0\.0\.0\.0:4190 is not an address other nodes can reach; set peer\.advertise/);

  // and the untouched instance passes both ways: serve starts (checked by the other files)
  const ok = run(['-c', instance(), 'config', 'test']);
  t.equal(ok.code, 0, `an intact instance passes (${ok.err})`);
  t.match(ok.out, /^node cfg1: registered, active$/m, 'config test says the registry accepts the node');
});
