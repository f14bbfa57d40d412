#!/usr/bin/env node
// The demo: an instance in ./demo with domain example.test, user demo@example.test, a welcome
// message in the mailbox, and `pigeon serve` on loopback (IMAP 10143, POP3 10110, IMAPS 10993,
// POP3S 10995, LMTP 10024). Re-running reuses the instance. Ctrl-C stops it.
import { spawnSync, spawn } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync, openSync, writeSync, fsyncSync, closeSync, renameSync, chownSync, realpathSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import { join, resolve } from 'node:path';

const root = resolve(new URL('..', import.meta.url).pathname);
const cli = join(root, 'dist/src/cli.js');
const dir = resolve(process.env.PIGEON_DEMO_DIR ?? join(root, 'demo'));
const pig = (args, input) => {
  const r = spawnSync(process.execPath, [cli, '-c', dir, ...args], { input, encoding: 'utf8' });
  if (r.status !== 0) {
    process.stderr.write(r.stderr);
    process.exit(r.status ?? 1);
  }
  return r.stdout;
};

const pwFile = join(dir, 'demo-password.txt');
if (!existsSync(join(dir, 'pigeon.yaml'))) {
  const init = ['init', dir, '--node', 'demo'];
  for (const l of ['imap=127.0.0.1:10143', 'pop3=127.0.0.1:10110', 'imaps=127.0.0.1:10993', 'pop3s=127.0.0.1:10995', 'lmtp=127.0.0.1:10024']) init.push('--listen', l);
  const r = spawnSync(process.execPath, [cli, ...init], { encoding: 'utf8' });
  if (r.status !== 0) {
    process.stderr.write(r.stderr);
    process.exit(r.status ?? 1);
  }
  const password = randomBytes(9).toString('base64url');
  pig(['domain', 'add', 'example.test']);
  pig(['user', 'add', 'demo@example.test', '--password-stdin'], `${password}\n`);
  writeFileSync(pwFile, `${password}\n`, { mode: 0o600 });
  // the welcome message, written the way the delivery agent writes: allocate, tmp/ -> fsync -> new/
  const { loadInstance } = await import(join(root, 'dist/src/instance.js'));
  const { openStore } = await import(join(root, 'dist/src/store.js'));
  const { resolve: resolveCfg } = await import(join(root, 'dist/src/resolve.js'));
  const { placeUser } = await import(join(root, 'dist/src/allocation.js'));
  const { resolveMailUser } = await import(join(root, 'dist/src/mailuser.js'));
  const inst = loadInstance(dir);
  const store = await openStore(inst.config.database, { baseDir: inst.dir });
  const found = await store.lookup('demo@example.test');
  const mailUser = resolveMailUser(inst.config.mail_user);
  const p = await placeUser({ store, node: inst.config.node, mailRoot: inst.mailRoot, mailUser }, found.user, resolveCfg(found.rows));
  const msg = [
    'Return-Path: <postmaster@example.test>',
    'Delivered-To: demo@example.test',
    'From: PigeonDeliver <postmaster@example.test>',
    'To: demo@example.test',
    'Subject: Welcome to PigeonDeliver',
    `Date: ${new Date().toUTCString()}`,
    `Message-ID: <welcome.${Date.now()}@example.test>`,
    'MIME-Version: 1.0',
    'Content-Type: text/plain; charset=utf-8',
    '',
    'Welcome! You logged in through PigeonDeliver, which checked your password in its own',
    'database and started Dovecot already logged in as you. This message sits in the Maildir',
    `${p.allocation.path} that Dovecot serves.`,
    '',
  ].join('\r\n');
  const name = `${Math.floor(Date.now() / 1000)}.P${process.pid}.${hostname()}`;
  const tmp = join(p.allocation.path, 'tmp', name);
  const fd = openSync(tmp, 'wx', 0o600);
  writeSync(fd, msg);
  fsyncSync(fd);
  closeSync(fd);
  if (mailUser.switchTo) chownSync(tmp, mailUser.uid, mailUser.gid);
  renameSync(tmp, join(p.allocation.path, 'new', `${name},S=${Buffer.byteLength(msg)}`));
  await store.close();
}
const password = readFileSync(pwFile, 'utf8').trim();
// how to call this clone's CLI from a shell: `pigeon` when the PATH leads here (the set-up line links it)
const onPath = (process.env.PATH ?? '').split(':').some((d) => {
  try {
    return d !== '' && realpathSync(join(d, 'pigeon')) === realpathSync(cli);
  } catch {
    return false;
  }
});
const pigeonCmd = onPath ? 'pigeon' : `node ${cli}`;
console.log(`PigeonDeliver demo instance: ${dir}
user: demo@example.test   password: ${password}

Try, in another terminal:
  curl -s 'imap://127.0.0.1:10143/INBOX;UID=1' -u 'demo@example.test:${password}'
  curl -s 'pop3://127.0.0.1:10110/1' -u 'demo@example.test:${password}'
  curl -sk 'imaps://127.0.0.1:10993/INBOX' -u 'demo@example.test:${password}' -X 'STATUS INBOX (MESSAGES)'
  curl -sk --ssl-reqd 'pop3://127.0.0.1:10110/' -u 'demo@example.test:${password}'
  ${pigeonCmd} -c ${dir} config show demo@example.test --explain
Stop with Ctrl-C.
`);
const child = spawn(process.execPath, [cli, '-c', dir, 'serve'], { stdio: 'inherit' });
for (const s of ['SIGINT', 'SIGTERM']) process.on(s, () => child.kill('SIGTERM'));
child.on('exit', (code) => process.exit(code ?? 0));
