// Envelope senders keep their bytes: an SMTPUTF8 sender from `-f`, from the Return-Path (no -f) or
// from LMTP MAIL FROM is written into Return-Path and handed to sendmail (forward) as the same
// UTF-8 bytes; bytes that are not UTF-8 never become U+FFFD or Latin-1 mojibake in an address:
// `-f` and MAIL FROM refuse them (5.1.7), an unusable Return-Path counts as the null sender.
import t from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { CLI, cli, makeInstance, setUser, maildirOf, files } from './helpers/delivery-env.js';
import { Dialog, dataOf } from './helpers/delivery-lmtp.js';
import { recorder, withSendmail } from './helpers/sendmail.js';
import { scratchDir } from './helpers/instance.js';

const ALICE = 'alice@example.test';
const JUERGEN = 'jürgen@remote.test';
const utf8 = (s: string): Buffer => Buffer.from(s, 'utf8');

const message = (head: Buffer = Buffer.alloc(0)): Buffer =>
  Buffer.concat([head, utf8(`From: x@remote.test\nTo: ${ALICE}\nSubject: bytes\nMessage-ID: <${Math.random().toString(36).slice(2)}@remote.test>\n\nhello\n`)]);

/** The newest message in alice's new/, as bytes. */
function newest(inst: string): Buffer {
  const dir = join(maildirOf(inst, ALICE), 'new');
  const f = files(dir).sort((a, b) => Number(a.split('.')[0]) - Number(b.split('.')[0]) || a.localeCompare(b));
  return readFileSync(join(dir, f[f.length - 1] ?? ''));
}

t.test('pigeon deliver: a UTF-8 sender stays UTF-8 in Return-Path and in the forward envelope; bytes that are not UTF-8 never become an address', async (t) => {
  const dir = scratchDir(t);
  const inst = makeInstance(dir);
  const sm = recorder(dir);
  withSendmail(inst, sm.script);
  setUser(inst, ALICE, 'forward.enabled', 'true');
  setUser(inst, ALICE, 'forward.to', 'carol@elsewhere.test');

  // -f from argv
  t.equal(cli(inst, ['deliver', '-f', JUERGEN, ALICE], message()).code, 0, '-f jürgen@…: delivered');
  t.ok(newest(inst).subarray(0, 40).includes(utf8(`Return-Path: <${JUERGEN}>\n`)), 'Return-Path holds the UTF-8 bytes (not Latin-1 ü)');
  t.ok(sm.calls()[0]?.argsRaw.includes(utf8(`-f\n${JUERGEN}\n`)), 'the forward goes out with the same envelope sender bytes');

  // no -f: the Return-Path header (UTF-8 bytes) becomes the sender
  t.equal(cli(inst, ['deliver', ALICE], message(utf8(`Return-Path: <${JUERGEN}>\n`))).code, 0, 'Return-Path: <jürgen@…>: delivered');
  t.ok(newest(inst).subarray(0, 40).includes(utf8(`Return-Path: <${JUERGEN}>\n`)), 'stored Return-Path: the same bytes');
  t.ok(sm.calls()[1]?.argsRaw.includes(utf8(`-f\n${JUERGEN}\n`)), 'forward: -f with the header bytes decoded as UTF-8 (was jÃ¼rgen)');

  // no -f, a Return-Path that is not UTF-8 (Latin-1 ü): no address can be made of it
  const latin1 = Buffer.concat([utf8('Return-Path: <j'), Buffer.from([0xfc]), utf8('rgen@remote.test>\n')]);
  t.equal(cli(inst, ['deliver', ALICE], message(latin1)).code, 0, 'a Latin-1 Return-Path: delivered');
  t.ok(newest(inst).subarray(0, 20).includes(utf8('Return-Path: <>\n')), 'as from the null sender');
  t.same(sm.calls()[2]?.args.slice(0, 3), ['-i', '-f', '<>'], 'forwarded with the null sender');

  // -f with bytes that are not UTF-8 (node gives U+FFFD for them): refused, nothing delivered
  const before = files(join(maildirOf(inst, ALICE), 'new')).length;
  const bad = spawnSync('sh', ['-c', `exec "$0" "$1" -c "$2" deliver -f "$(printf 'j\\374rgen@remote.test')" "$3"`, process.execPath, CLI, inst, ALICE], { input: message(), encoding: 'latin1' });
  t.equal(bad.status, 65, `-f j\\xfcrgen@…: exit 65 ${bad.stdout}${bad.stderr}`);
  t.equal(bad.stdout, '5.1.7 bad sender address: not UTF-8\n', 'one line: 5.1.7, without the U+FFFD node put in');
  t.equal(files(join(maildirOf(inst, ALICE), 'new')).length, before, 'nothing stored');
  t.equal(sm.calls().length, 3, 'nothing forwarded');
});

t.test('pigeon lmtp: MAIL FROM that is not UTF-8 is refused (5.1.7); a UTF-8 one is kept as it came', async (t) => {
  const inst = makeInstance(scratchDir(t));
  const c = spawn(process.execPath, [CLI, '-c', inst, 'lmtp', '--forker', 'stdio'], { stdio: ['pipe', 'pipe', 'pipe'] });
  const closed = new Promise<void>((r) => c.on('close', () => r()));
  t.teardown(() => {
    c.kill('SIGKILL');
  });
  const d = new Dialog(c.stdout, c.stdin);
  t.match(await d.line(), /^220 /);
  t.match(await d.cmd('LHLO mx.test'), /^250/);
  d.send(Buffer.concat([utf8('MAIL FROM:<j'), Buffer.from([0xfc]), utf8('rgen@remote.test>\r\n')]));
  t.match(await d.line(), /^5\d\d 5\.1\.7 bad sender address: not UTF-8/, 'refused: the sender would have held U+FFFD');
  d.send(utf8(`MAIL FROM:<${JUERGEN}> SMTPUTF8\r\n`));
  t.match(await d.line(), /^250/, 'a UTF-8 sender is accepted');
  t.match(await d.cmd(`RCPT TO:<${ALICE}>`), /^250/);
  t.match(await d.cmd('DATA'), /^354/);
  d.send(dataOf(message().toString('latin1')));
  t.match(await d.line(), /^250 2\.0\.0/);
  t.match(await d.cmd('QUIT'), /^221/);
  c.stdin.end();
  await closed;
  t.ok(newest(inst).subarray(0, 40).includes(utf8(`Return-Path: <${JUERGEN}>\n`)), 'Return-Path holds the UTF-8 bytes');
});
