// Auth sources are asynchronous modules with one registry (issue #13 step 1, issue #18): a source
// kept outside this tree plugs in through `auth.modules` in pigeon.yaml (here the dummy source of
// test/fixtures/auth-dummy.mjs, standing for an LDAP or HTTP source) and logs users in through
// the real proxy; `auth.chain` is checked against the registry when the configuration loads.
import t from 'tap';
import { copyFileSync, chmodSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { makeInstance, CLI, ROOT } from './helpers/instance.js';

const inst = makeInstance(t, { users: { 'alice@example.test': 'dbpass' } });
const module = join(inst.dir, 'auth-dummy.mjs');
copyFileSync(join(ROOT, 'test', 'fixtures', 'auth-dummy.mjs'), module);
chmodSync(module, 0o644);
const conf = join(inst.dir, 'conf.d', '70-auth.yaml');
const dummyConf = (chain: string): string =>
  `auth:\n  chain: ${chain}\n  modules:\n    dummy: auth-dummy.mjs\n  dummy:\n    users: [carol@example.test, alice@example.test, outage@example.test]\n    password: "dir-pass"\n`;
writeFileSync(conf, dummyConf('[database, dummy]'));

function imapLogin(user: string, pass: string): string {
  const r = spawnSync(process.execPath, [CLI, '-c', inst.dir, 'imap', '--forker', 'stdio'], { input: `a LOGIN ${user} ${pass}\r\nb LOGOUT\r\n`, encoding: 'utf8', timeout: 60_000 });
  return r.stdout;
}

t.test('a source from auth.modules logs a user in through the proxy; the user is provisioned', async (t) => {
  t.equal(inst.run(['user', 'show', 'carol@example.test']).status, 67, 'carol is not in the database before');
  t.match(imapLogin('carol@example.test', 'dir-pass'), /a OK \[CAPABILITY/, 'the dummy source knows carol');
  const show = JSON.parse(inst.run(['user', 'show', 'carol@example.test', '--json']).stdout) as { address: string; password_scheme: string | null; home: string | null };
  t.match(show, { address: 'carol@example.test', password_scheme: null, home: 'test1' }, 'added to the database, no password copied, mailbox allocated');
  t.match(imapLogin('carol@example.test', 'wrong'), /a NO \[AUTHENTICATIONFAILED\]/, 'a wrong password is refused');
  t.match(imapLogin('outage@example.test', 'dir-pass'), /a NO \[UNAVAILABLE\]/, "the source's outage is a temporary failure, not a wrong password");
  t.match(imapLogin('nobody@example.test', 'dir-pass'), /a NO \[AUTHENTICATIONFAILED\]/, 'unknown to every source: refused');
});

t.test('chain order: the database decides for its own users', async (t) => {
  t.match(imapLogin('alice@example.test', 'dbpass'), /a OK \[CAPABILITY/);
  t.match(imapLogin('alice@example.test', 'dir-pass'), /a NO \[AUTHENTICATIONFAILED\]/, 'the dummy source is not asked for a user the database knows');
  writeFileSync(conf, dummyConf('[dummy, database]'));
  t.match(imapLogin('alice@example.test', 'dir-pass'), /a OK \[CAPABILITY/, 'with the dummy source first, it decides');
  const r = inst.run(['auth', 'test', 'alice@example.test'], 'dir-pass\n');
  t.equal(r.status, 0, `auth test uses the same chain ${r.stderr}`);
  writeFileSync(conf, dummyConf('[database, dummy]'));
});

t.test('auth.chain and the auth section are checked at load, naming the key', async (t) => {
  writeFileSync(conf, 'auth:\n  chain: [database, ldap]\n');
  let r = inst.run(['config', 'test']);
  t.equal(r.status, 78, 'an unknown source: configuration error');
  t.match(r.stderr, /70-auth\.yaml:\d+:\d+: auth\.chain\.1: unknown auth source "ldap"; known: database, passwd-file/);
  writeFileSync(conf, 'auth:\n  chain: [database]\n  dummy: { users: [], password: x }\n');
  r = inst.run(['config', 'test']);
  t.equal(r.status, 78, 'a key no source owns');
  t.match(r.stderr, /auth\.dummy: unknown key/);
  writeFileSync(conf, 'auth:\n  chain: [database, dummy]\n  modules:\n    dummy: auth-dummy.mjs\n');
  r = inst.run(['auth', 'test', 'carol@example.test'], 'dir-pass\n');
  t.equal(r.status, 78, "a module's own settings are checked by the module");
  t.match(r.stderr, /dummy: expected \{ users/);
  chmodSync(module, 0o666);
  writeFileSync(conf, dummyConf('[database, dummy]'));
  r = inst.run(['auth', 'test', 'carol@example.test'], 'dir-pass\n');
  t.equal(r.status, 78, 'a module file others can change is not loaded');
  t.match(r.stderr, /auth\.modules\.dummy: .*auth-dummy\.mjs must be owned by root .* and writable by no one else/);
  chmodSync(module, 0o644);
  t.equal(inst.run(['auth', 'test', 'carol@example.test'], 'dir-pass\n').status, 0, 'fixed: it loads again');
});
