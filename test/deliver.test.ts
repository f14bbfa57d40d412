// pigeon deliver as Postfix pipe(8) runs it: exit codes, the one status line, recipients, senders
// and loops, and what the real Dovecot then reads from the Maildir. (Message formats, folders,
// quota, mbox: deliver-format.test.ts.)
import t from 'tap';
import { join } from 'node:path';
import { cli, makeInstance, maildirOf, files, msg, dovecotRead } from './helpers/delivery-env.js';
import { scratchDir } from './helpers/instance.js';

// tap's per-file timeout for this file: it ran 31 s alone on a lightly loaded machine, and two
// suites at once on 2 cores make a file take 2-3 times as long (the default is 180 s, .taprc)
t.setTimeout(240_000);

const ALICE = 'alice@example.test';

t.test('delivers into a Maildir that Dovecot serves, with Return-Path and Delivered-To', async (t) => {
  const inst = makeInstance(scratchDir(t));
  const r = cli(inst, ['deliver', '-f', 'bob@remote.test', '-a', ALICE, '--', ALICE], msg({ subject: 'first', body: 'line one\nFrom here on\n' }));
  t.equal(r.code, 0, r.stdout + r.stderr);
  t.equal(r.stdout + r.stderr, '', 'no output on success');
  const box = maildirOf(inst, ALICE);
  t.equal(files(join(box, 'new')).length, 1);
  t.equal(files(join(box, 'tmp')).length, 0, 'nothing left in tmp/');
  const name = files(join(box, 'new'))[0] ?? '';
  t.match(name, /^\d+\.M\d+P\d+Q\d+R[0-9a-f]+\.[^,]+,S=\d+,W=\d+$/, 'Dovecot-style file name with S= and W=');
  const { messages } = await dovecotRead(`maildir:${box}`);
  t.equal(messages.length, 1, 'Dovecot sees the message');
  const text = messages[0]?.body.toString() ?? '';
  t.match(text, /^Return-Path: <bob@remote\.test>\r\nDelivered-To: alice@example\.test\r\nFrom: bob@remote\.test\r\n/);
  t.match(text, /\r\n\r\nline one\r\nFrom here on\r\n$/);
  const s = /,S=(\d+),W=(\d+)/.exec(name);
  t.equal(messages[0]?.size, Number(s?.[2]), 'W= is the size Dovecot reports');
  const j = JSON.parse(cli(inst, ['user', 'show', ALICE, '--json']).stdout) as { home: string; allocation: { format: string; path: string } };
  t.same(j.allocation.path, box, 'allocation recorded is the path Dovecot was given');
  t.equal(j.home, 'node1');
});

t.test('unknown, disabled and malformed recipients; bad sender', async (t) => {
  const inst = makeInstance(scratchDir(t), [ALICE, 'carol@example.test']);
  let r = cli(inst, ['deliver', '-f', 'bob@remote.test', 'nobody@example.test'], msg());
  t.equal(r.code, 67);
  t.equal(r.stdout, '5.1.1 <nobody@example.test>: user unknown\n', 'exactly one line, enhanced code first');
  t.equal(r.stderr, '');
  r = cli(inst, ['deliver', '-f', 'bob@remote.test', 'alice@other.test'], msg());
  t.equal(r.code, 67);
  cli(inst, ['user', 'disable', 'carol@example.test']);
  r = cli(inst, ['deliver', '-f', 'bob@remote.test', 'carol@example.test'], msg());
  t.equal(r.code, 67);
  t.match(r.stdout, /^5\.2\.1 /);
  r = cli(inst, ['deliver', '-f', 'bob@remote.test', 'not an address'], msg());
  t.equal(r.code, 65);
  t.match(r.stdout, /^5\.1\.3 /);
  r = cli(inst, ['deliver', '-f', 'bad sender@x', ALICE], msg());
  t.equal(r.code, 65);
  t.match(r.stdout, /^5\.1\.7 /);
  r = cli(inst, ['deliver', '--no-such-option', ALICE], msg());
  t.equal(r.code, 75, 'a broken master.cf line defers, never bounces');
  t.match(r.stdout, /^4\.3\.5 /);
  t.equal(r.stdout.split('\n').length, 2, 'one line');
  r = cli(inst, ['deliver', '-f', 'bob@remote.test'], msg());
  t.equal(r.code, 75, 'no recipient: configuration problem → defer');
  r = cli(join(inst, 'nonexistent'), ['deliver', ALICE], msg());
  t.equal(r.code, 75, 'missing instance → 75');
  t.match(r.stdout, /^4\.3\.5 configuration error/);
  t.equal(files(join(maildirOf(inst, ALICE), 'new')).length, 0);
});

t.test('empty sender, -d, duplicate recipients, Return-Path fallback', async (t) => {
  const inst = makeInstance(scratchDir(t));
  let r = cli(inst, ['deliver', '-f', '', '-d', ALICE], msg({ subject: 'bounce' }));
  t.equal(r.code, 0, r.stdout);
  r = cli(inst, ['deliver', '-f', '<>', ALICE, 'Alice@Example.TEST', ALICE], msg({ subject: 'dup' }));
  t.equal(r.code, 0, r.stdout);
  r = cli(inst, ['deliver', ALICE], `Return-Path: <list@remote.test>\n${msg({ subject: 'rp' })}`);
  t.equal(r.code, 0, r.stdout);
  const { messages } = await dovecotRead(`maildir:${maildirOf(inst, ALICE)}`);
  t.equal(messages.length, 3, 'duplicate recipients get one copy');
  const texts = messages.map((m) => m.body.toString());
  t.ok(texts.some((x) => x.startsWith('Return-Path: <>\r\n') && x.includes('Subject: bounce')), 'null sender → Return-Path: <>');
  const rp = texts.find((x) => x.includes('Subject: rp')) ?? '';
  t.match(rp, /^Return-Path: <list@remote\.test>\r\n/);
  t.equal(rp.match(/^Return-Path:/gim)?.length, 1, 'old Return-Path replaced, not duplicated');
});

t.test('mail loop: Delivered-To naming the recipient → 5.4.6, nothing stored', async (t) => {
  const inst = makeInstance(scratchDir(t));
  const r = cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg({ headers: 'Delivered-To: alice@example.test\n' }));
  t.equal(r.code, 65);
  t.match(r.stdout, /^5\.4\.6 .*loop/);
  const many = Array.from({ length: 40 }, (_, i) => `Delivered-To: hop${i}@elsewhere.test\n`).join('');
  const r2 = cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg({ headers: many }));
  t.equal(r2.code, 65);
  t.match(r2.stdout, /^5\.4\.6 /);
  t.equal(files(join(maildirOf(inst, ALICE), 'new')).length, 0);
});

t.test('Postfix pipe(8) flags=D trace block above the topmost Received: is this delivery, not a loop', async (t) => {
  const inst = makeInstance(scratchDir(t));
  // what pipe(8) flags=DRhu hands over: its block (R, O, D), then Postfix's Received:
  const pipeBlock = 'Return-Path: <bob@remote.test>\nX-Original-To: alice@example.test\nDelivered-To: alice@example.test\nReceived: from client.remote.test by mx.example.test (Postfix) with ESMTP id 4ABC\n';
  const clean = cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], pipeBlock + msg({ subject: 'clean' }));
  t.equal(clean.code, 0, `delivered: ${clean.stdout}`);
  const { messages } = await dovecotRead(`maildir:${maildirOf(inst, ALICE)}`);
  const text = messages[0]?.body.toString() ?? '';
  t.equal(text.match(/^Delivered-To:/gm)?.length, 1, 'one Delivered-To (pipe(8) wrote it; pigeon does not repeat it)');
  t.equal(text.match(/^Return-Path:/gm)?.length, 1, 'one Return-Path');
  t.match(text, /^Return-Path: <bob@remote\.test>\r\nX-Original-To: alice@example\.test\r\nDelivered-To: alice@example\.test\r\nReceived: /);
  // the same block, with the recipient's Delivered-To further down, below a Received: a real loop
  const looped = cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], `${pipeBlock}Delivered-To: alice@example.test\nReceived: from a.test by b.test\n${msg({ subject: 'loop' })}`);
  t.equal(looped.code, 65);
  t.match(looped.stdout, /^5\.4\.6 <alice@example\.test>: mail forwarding loop \(Delivered-To: alice@example\.test already present\)/);
  // a Delivered-To at the top NOT followed by Received: is not pipe(8)'s block: it counts
  const noReceived = cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], `Delivered-To: alice@example.test\n${msg({ subject: 'top' })}`);
  t.equal(noReceived.code, 65);
  const box = maildirOf(inst, ALICE);
  t.equal(files(join(box, 'new')).length + files(join(box, 'cur')).length, 1, 'only the clean message stored');
});
