// auth.chain: the database first, then a Dovecot passwd-file (hashes made by the real doveadm).
// A user known only to the file logs in through the proxy and is added to the database.
import t from 'tap';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { execFileSync, spawnSync } from 'node:child_process';
import { makeInstance, CLI } from './helpers/instance.js';

const inst = makeInstance(t, { users: { 'alice@example.test': 'dbpass' } });
const hash = execFileSync('doveadm', ['pw', '-s', 'SHA512-CRYPT', '-p', 'filepass'], { encoding: 'utf8' }).trim();
const file = join(inst.dir, 'users');
writeFileSync(file, `# Dovecot passwd-file\nbob@example.test:${hash}:8:8::/home/bob::\nalice@example.test:${hash}::::::\nzed@nodomain.test:${hash}::::::\n`);
writeFileSync(join(inst.dir, 'conf.d', '70-auth.yaml'), `auth:\n  chain: [database, passwd-file]\n  passwd_file: users\n`);

function imapLogin(user: string, pass: string): string {
  const r = spawnSync(process.execPath, [CLI, '-c', inst.dir, 'imap', '--forker', 'stdio'], { input: `a LOGIN ${user} ${pass}\r\nb LOGOUT\r\n`, encoding: 'utf8' });
  return r.stdout;
}

t.test('a passwd-file user logs in and is added to the database', async (t) => {
  t.equal(inst.run(['user', 'show', 'bob@example.test', '--json']).status, 67, 'not in the database before');
  t.match(imapLogin('bob@example.test', 'filepass'), /a OK \[CAPABILITY/);
  const show = JSON.parse(inst.run(['user', 'show', 'bob@example.test', '--json']).stdout) as { address: string; password_scheme: string | null; home: string };
  t.equal(show.address, 'bob@example.test');
  t.equal(show.password_scheme, null, 'no password copied into the database');
  t.equal(show.home, 'test1', 'mailbox allocated at first login');
  t.match(imapLogin('bob@example.test', 'wrong'), /a NO \[AUTHENTICATIONFAILED\]/);
});

t.test('the database comes first in the chain', async (t) => {
  t.match(imapLogin('alice@example.test', 'dbpass'), /a OK \[CAPABILITY/);
  t.match(imapLogin('alice@example.test', 'filepass'), /a NO \[AUTHENTICATIONFAILED\]/, "the file's hash is not consulted for a user with a database password");
});

t.test('a file user whose domain is not in the database is refused', async (t) => {
  t.match(imapLogin('zed@nodomain.test', 'filepass'), /a NO \[AUTHENTICATIONFAILED\]/);
  t.equal(inst.run(['user', 'show', 'zed@nodomain.test']).status, 67);
});

t.test('auth test uses the same chain; chain without a file is a config error', async (t) => {
  const r = inst.run(['auth', 'test', 'bob@example.test'], 'filepass\n');
  t.equal(r.status, 0);
  t.match(r.stdout, /auth succeeded/);
  writeFileSync(join(inst.dir, 'conf.d', '70-auth.yaml'), `auth:\n  chain: [database, passwd-file]\n`);
  const bad = inst.run(['config', 'test']);
  t.equal(bad.status, 78);
  t.match(bad.stderr, /passwd_file/);
});
