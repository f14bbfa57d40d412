// The lmtp listeners of `pigeon serve` (TCP and unix socket): mail delivered over LMTP is then read
// by the user over IMAP through the proxy (Dovecot started pre-authenticated by `serve`).
import t from 'tap';
import net from 'node:net';
import { mkdtempSync, rmSync, chmodSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { cli, ok, msg, maildirOf, files, startServe } from './helpers/delivery-env.js';
import { Dialog, dataOf } from './helpers/delivery-lmtp.js';
import { scratchDir } from './helpers/instance.js';

const ALICE = 'alice@example.test';

function connect(opts: net.NetConnectOpts): Promise<net.Socket> {
  return new Promise((res, rej) => {
    const s = net.connect(opts, () => res(s));
    s.once('error', rej);
  });
}

t.test('pigeon serve: lmtp=HOST:PORT and lmtp=/socket, then IMAP through the proxy', async (t) => {
  const dir = scratchDir(t);
  const sdir = mkdtempSync(join(tmpdir(), 'pserve-'));
  chmodSync(sdir, 0o755);
  t.teardown(() => rmSync(sdir, { recursive: true, force: true }));
  const sockPath = join(sdir, 'lmtp.sock');
  const inst = join(dir, 'inst');
  ok(cli(inst, ['init', inst, '--listen', 'lmtp=127.0.0.1:0', '--listen', `lmtp=${sockPath}`, '--listen', 'imap=127.0.0.1:0']), 'init');
  ok(cli(inst, ['domain', 'add', 'example.test']), 'domain');
  ok(cli(inst, ['user', 'add', ALICE, '--password-stdin'], 'secret\n'), 'user');

  const served = await startServe(t, inst);
  const ports = served.ports;
  const err = served.stderr();
  t.match(err, /listening lmtp .*lmtp\.sock/, 'unix socket listener open');
  t.ok(ports['lmtp'] && ports['imap'], `ports ${JSON.stringify(ports)}`);

  for (const target of [{ host: '127.0.0.1', port: ports['lmtp'] ?? 0 }, { path: sockPath }]) {
    const s = await connect(target);
    const d = Dialog.of(s);
    t.match(await d.line(), /^220 .*LMTP/);
    d.send('LHLO mx.test\r\n');
    await d.reply();
    t.match(await d.cmd('MAIL FROM:<bob@remote.test>'), /^250 /);
    t.match(await d.cmd(`RCPT TO:<${ALICE}>`), /^250 /);
    t.match(await d.cmd('RCPT TO:<ghost@example.test>'), /^550 5\.1\.1 /);
    t.match(await d.cmd('DATA'), /^354 /);
    d.send(dataOf(msg({ subject: `via serve ${'path' in target ? 'unix' : 'tcp'}` })));
    t.match(await d.line(), /^250 2\.0\.0 <alice@example\.test> Saved/);
    await d.cmd('QUIT');
    s.destroy();
  }
  t.equal(files(join(maildirOf(inst, ALICE), 'new')).length, 2);

  // the user reads it over IMAP, through the proxy
  const s = await connect({ host: '127.0.0.1', port: ports['imap'] ?? 0 });
  t.teardown(() => s.destroy());
  const d = Dialog.of(s);
  const untagged = async (tag: string, cmd: string): Promise<string> => {
    d.send(`${tag} ${cmd}\r\n`);
    let all = '';
    for (;;) {
      const line = await d.lineRaw();
      all += `${line}\r\n`;
      if (line.startsWith(`${tag} `)) return all;
    }
  };
  t.match(await d.lineRaw(), /^\* OK/);
  t.match(await untagged('a', `LOGIN ${ALICE} secret`), /a OK/);
  t.match(await untagged('b', 'SELECT INBOX'), /\* 2 EXISTS[\s\S]*b OK/);
  const fetched = await untagged('c', 'FETCH 1:2 (BODY.PEEK[HEADER.FIELDS (SUBJECT DELIVERED-TO)])');
  t.match(fetched, /Subject: via serve tcp/);
  t.match(fetched, /Subject: via serve unix/);
  t.match(fetched, /Delivered-To: alice@example\.test/);
  t.match(await untagged('d', 'LOGOUT'), /d OK/);
  await served.stop(); // before tap removes the test directory
});
