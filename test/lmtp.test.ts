// LMTP: one reply per accepted RCPT after DATA (duplicates included), per-recipient outcomes,
// TCP and unix socket listeners (the functions `pigeon serve` uses), and `pigeon lmtp --forker
// stdio|inetd`. Dovecot reads back what was stored.
import t from 'tap';
import net from 'node:net';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { loadInstance } from '../src/instance.js';
import { openStore } from '../src/store.js';
import { createLogger } from '../src/log.js';
import { createLmtpServer, listenLmtp } from '../src/delivery/lmtp.js';
import { CLI, makeInstance, setUser, maildirOf, files, msg, dovecotRead } from './helpers/delivery-env.js';
import { Dialog, dataOf } from './helpers/delivery-lmtp.js';
import { scratchDir } from './helpers/instance.js';
import { requireRecorder } from './helpers/load-recorder.js';

const ALICE = 'alice@example.test';
const CAROL = 'carol@example.test';

async function serverFor(inst: string, t: { teardown: (f: () => void | Promise<void>) => void }) {
  const instance = loadInstance(inst);
  const store = await openStore(instance.config.database, { baseDir: instance.dir });
  const lines: string[] = [];
  const logger = createLogger({ level: 'debug', sink: (l) => lines.push(l) });
  const server = createLmtpServer({ instance, store, logger, remote: null });
  t.teardown(() => store.close());
  return { server, lines };
}

function connect(opts: net.NetConnectOpts): Promise<net.Socket> {
  return new Promise((res, rej) => {
    const s = net.connect(opts, () => res(s));
    s.once('error', rej);
  });
}

t.test('per-recipient replies after DATA, duplicate RCPT, unknown user, over quota', async (t) => {
  const inst = makeInstance(scratchDir(t), [ALICE, CAROL]);
  setUser(inst, CAROL, 'mailstore.quota', '100');
  const { server, lines } = await serverFor(inst, t);
  const srv = await listenLmtp(server, { host: '127.0.0.1', port: 0, path: null });
  t.teardown(() => srv.close());
  const port = (srv.address() as net.AddressInfo).port;
  const sock = await connect({ host: '127.0.0.1', port });
  t.teardown(() => sock.destroy());
  const d = Dialog.of(sock);
  t.match(await d.line(), /^220 .* LMTP/);
  const lhlo = await (async () => {
    d.send('LHLO client.test\r\n');
    return d.reply();
  })();
  t.ok(lhlo.some((l) => l.includes('ENHANCEDSTATUSCODES')), 'LHLO lists ENHANCEDSTATUSCODES');
  t.notOk(lhlo.some((l) => /STARTTLS|AUTH/.test(l)), 'no STARTTLS, no AUTH');
  t.match(await d.cmd('MAIL FROM:<bob@remote.test>'), /^250 /);
  t.match(await d.cmd(`RCPT TO:<${ALICE}>`), /^250 /);
  t.equal(await d.cmd('RCPT TO:<nobody@example.test>'), '550 5.1.1 <nobody@example.test>: user unknown', 'unknown user refused at RCPT, one enhanced code');
  t.match(await d.cmd(`RCPT TO:<${ALICE.toUpperCase()}>`), /^250 /, 'duplicate RCPT accepted');
  t.match(await d.cmd(`RCPT TO:<${CAROL}>`), /^250 /);
  t.match(await d.cmd('DATA'), /^354 /);
  d.send(dataOf(msg({ subject: 'lmtp one', body: `.leading dot\n${'z'.repeat(300)}\nend\n` })));
  const replies = [await d.line(), await d.line(), await d.line()];
  t.match(replies[0], /^250 2\.0\.0 <alice@example\.test> Saved$/);
  t.match(replies[1], /^250 2\.0\.0 <alice@example\.test> Saved$/, 'the duplicate RCPT gets its own reply');
  t.match(replies[2], /^552 5\.2\.2 Mailbox full/, 'carol over quota: 552 5.2.2');
  t.equal(await d.cmd('NOOP'), '250 2.0.0 OK', 'exactly three replies: the next line answers NOOP');
  // second transaction on the same session, null sender
  t.match(await d.cmd('MAIL FROM:<>'), /^250 /);
  t.match(await d.cmd(`RCPT TO:<${ALICE}>`), /^250 /);
  t.match(await d.cmd('DATA'), /^354 /);
  d.send(dataOf(msg({ subject: 'lmtp two' })));
  t.match(await d.line(), /^250 2\.0\.0 /);
  t.match(await d.cmd('QUIT'), /^221 /);
  const { messages } = await dovecotRead(`maildir:${maildirOf(inst, ALICE)}`);
  t.equal(messages.length, 2, 'alice got one copy per transaction (duplicate RCPT stored once)');
  const first = messages[0]?.body.toString() ?? '';
  t.match(first, /Delivered-To: alice@example\.test\r\n/);
  t.match(first, /\r\n\r\n\.leading dot\r\n/, 'dot-unstuffed');
  t.match(messages[1]?.body.toString() ?? '', /^Return-Path: <>\r\n/);
  t.equal(files(join(maildirOf(inst, CAROL), 'new')).length, 0);
  t.ok(lines.some((l) => /lmtp\(alice@example\.test\): delivered/.test(l)), 'Dovecot-style log line');
});

t.test('unix socket listener; transient failure is 451 for that recipient only', async (t) => {
  const dir = scratchDir(t);
  const inst = makeInstance(dir, [ALICE, CAROL]);
  setUser(inst, CAROL, 'mailstore.creator', 'none'); // never allocated → 4.2.1, deferred
  const { server } = await serverFor(inst, t);
  // sun_path is limited to 108 bytes: keep the socket path short
  const sdir = mkdtempSync(join(tmpdir(), 'plmtp-'));
  t.teardown(() => rmSync(sdir, { recursive: true, force: true }));
  const path = join(sdir, 'lmtp.sock');
  const srv = await listenLmtp(server, { host: '', port: 0, path });
  t.teardown(() => srv.close());
  const sock = await connect({ path });
  t.teardown(() => sock.destroy());
  const d = Dialog.of(sock);
  await d.line();
  d.send('LHLO x\r\n');
  await d.reply();
  await d.cmd('MAIL FROM:<bob@remote.test>');
  await d.cmd(`RCPT TO:<${CAROL}>`);
  await d.cmd(`RCPT TO:<${ALICE}>`);
  await d.cmd('DATA');
  d.send(dataOf(msg()));
  t.match(await d.line(), /^451 4\.2\.1 /, 'carol deferred');
  t.match(await d.line(), /^250 2\.0\.0 /, 'alice delivered');
  await d.cmd('QUIT');
});

function lmtpChild(inst: string, forker: string, stdio: 'pipe' | net.Socket, node: readonly string[] = []) {
  const c = spawn(process.execPath, [...node, CLI, '-c', inst, 'lmtp', '--forker', forker], {
    stdio: stdio === 'pipe' ? ['pipe', 'pipe', 'pipe'] : [stdio, stdio, 'pipe'],
  });
  let stderr = '';
  c.stderr?.on('data', (x: Buffer) => (stderr += x.toString()));
  return { c, stderr: () => stderr };
}

t.test('pigeon lmtp --forker stdio (pipes)', async (t) => {
  const dir = scratchDir(t);
  const inst = makeInstance(dir);
  const req = requireRecorder(dir);
  const { c, stderr } = lmtpChild(inst, 'stdio', 'pipe', ['-r', req.preload]);
  const exited = new Promise<number | null>((r) => c.on('close', (code) => r(code)));
  if (!c.stdout || !c.stdin) throw new Error('no pipes');
  const d = new Dialog(c.stdout, c.stdin);
  t.match(await d.line(), /^220 /);
  d.send('LHLO x\r\n');
  await d.reply();
  t.match(await d.cmd('MAIL FROM:<bob@remote.test>'), /^250 /);
  t.match(await d.cmd(`RCPT TO:<${ALICE}>`), /^250 /);
  t.match(await d.cmd('DATA'), /^354 /);
  d.send(dataOf(msg({ subject: 'stdio' })));
  t.match(await d.line(), /^250 2\.0\.0 <alice@example\.test> Saved/);
  t.match(await d.cmd('QUIT'), /^221 /);
  t.equal(await exited, 0, `exits 0 after QUIT ${stderr()}`);
  t.equal(stderr(), '', 'nothing on stderr');
  t.equal(files(join(maildirOf(inst, ALICE), 'new')).length, 1);
  // one session per process: it counts nothing (src/metrics.ts countNothing), prom-client stays unloaded
  t.ok(req.read().some((f) => f.endsWith('.cjs')), 'the preload recorded what require() loaded');
  t.same(req.read().filter((f) => f.includes('/node_modules/prom-client/')), [], 'prom-client not loaded');
});

t.test('pigeon lmtp --forker inetd (TCP socket on fd 0)', async (t) => {
  const inst = makeInstance(scratchDir(t));
  const server = net.createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  t.teardown(() => server.close());
  const accepted = new Promise<net.Socket>((r) => server.once('connection', r));
  const client = await connect({ host: '127.0.0.1', port: (server.address() as net.AddressInfo).port });
  t.teardown(() => client.destroy());
  const serverSide = await accepted;
  const { c } = lmtpChild(inst, 'inetd', serverSide);
  serverSide.destroy(); // the child has its own copy of the fd, as under inetd
  const d = Dialog.of(client);
  t.match(await d.line(), /^220 /);
  d.send('LHLO x\r\n');
  await d.reply();
  await d.cmd('MAIL FROM:<bob@remote.test>');
  t.match(await d.cmd(`RCPT TO:<${ALICE}>`), /^250 /);
  await d.cmd('DATA');
  d.send(dataOf(msg({ subject: 'inetd' })));
  t.match(await d.line(), /^250 2\.0\.0 /);
  t.match(await d.cmd('QUIT'), /^221 /);
  await new Promise((r) => c.on('close', r));
  const { messages } = await dovecotRead(`maildir:${maildirOf(inst, ALICE)}`);
  t.equal(messages.length, 1);
});

t.test('client gone in the middle of DATA: nothing stored, the server keeps serving', async (t) => {
  const inst = makeInstance(scratchDir(t));
  const { server } = await serverFor(inst, t);
  const srv = await listenLmtp(server, { host: '127.0.0.1', port: 0, path: null });
  t.teardown(() => srv.close());
  const port = (srv.address() as net.AddressInfo).port;
  const s1 = await connect({ host: '127.0.0.1', port });
  const d1 = Dialog.of(s1);
  await d1.line();
  d1.send('LHLO x\r\n');
  await d1.reply();
  await d1.cmd('MAIL FROM:<bob@remote.test>');
  await d1.cmd(`RCPT TO:<${ALICE}>`);
  await d1.cmd('DATA');
  // ~280 KB, no final dot: handed to the kernel, then the client is gone
  await new Promise((r) => s1.write(`Subject: cut\r\n\r\n${'partial line\r\n'.repeat(20_000)}`, r));
  s1.destroy();
  // the server has seen the connection end (the event), then nothing may have been stored
  for (;;) {
    const n = await new Promise<number>((res, rej) => srv.getConnections((e, c) => (e ? rej(e) : res(c))));
    if (n === 0) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  const box = maildirOf(inst, ALICE);
  t.equal(files(join(box, 'new')).length, 0, 'nothing in new/');
  t.equal(files(join(box, 'tmp')).length, 0, 'nothing in tmp/');
  const s2 = await connect({ host: '127.0.0.1', port });
  t.teardown(() => s2.destroy());
  const d2 = Dialog.of(s2);
  t.match(await d2.line(), /^220 /, 'next session served');
  await d2.cmd('QUIT');
});
