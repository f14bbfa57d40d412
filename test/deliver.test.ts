// pigeon deliver as Postfix pipe(8) runs it: exit codes, the one status line, and what the real
// Dovecot then reads from the Maildir / mbox.
import t from 'tap';
import { mkdirSync, chownSync, readFileSync, writeFileSync, existsSync, unlinkSync } from 'node:fs';
import { join } from 'node:path';
import { cli, cliAsync, makeInstance, setUser, maildirOf, files, msg, dovecotRead, MAIL_UID, MAIL_GID } from './helpers/delivery-env.js';
import { scratchDir } from './helpers/instance.js';

const ALICE = 'alice@example.test';

/** Wait until `re` appears in the log file (the event); false only after a minute (a hang). */
async function logged(file: string, re: RegExp, ms = 60_000): Promise<boolean> {
  const end = Date.now() + ms;
  for (;;) {
    if (existsSync(file) && re.test(readFileSync(file, 'utf8'))) return true;
    if (Date.now() > end) return false;
    await new Promise((r) => setTimeout(r, 50));
  }
}

// every `pigeon deliver` run as root (as here) forks its mail-writer child: on 2 shared cores
// under a second copy of the suite this file needs more than the default 180 s
t.setTimeout(360_000);

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

t.test('odd messages: no headers, bare LF, CRLF, NUL, 8-bit, no final newline, empty', async (t) => {
  const inst = makeInstance(scratchDir(t));
  const cases: [string, Buffer, RegExp | ((s: Buffer) => boolean)][] = [
    ['no headers', Buffer.from('just a body line\nand another\n'), /\r\n\r\njust a body line\r\nand another\r\n$/],
    ['header block without blank line', Buffer.from('Subject: x\nthis is not a header\n'), /Subject: x\r\n\r\nthis is not a header\r\n$/],
    ['CRLF', Buffer.from('Subject: crlf\r\n\r\nbody\r\n'), /Subject: crlf\r\n\r\nbody\r\n$/],
    ['NUL and 8-bit', Buffer.from('Subject: bin\n\nnul:\0: 8bit:\xe9\xff\n', 'latin1'), (b) => b.includes(Buffer.from(': 8bit:\xe9\xff', 'latin1'))],
    ['no final newline', Buffer.from('Subject: nonl\n\nlast line'), /\r\n\r\nlast line$/],
    ['empty message', Buffer.alloc(0), /^Return-Path: <bob@remote\.test>\r\nDelivered-To: alice@example\.test\r\n\r\n$/],
    ['mbox postmark', Buffer.from('From bob@remote.test Thu Dec  3 09:00:00 2026\nSubject: pm\n\nx\n'), /Delivered-To: alice@example\.test\r\nSubject: pm\r\n/],
  ];
  for (const [name, input] of cases) {
    const r = cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], input);
    t.equal(r.code, 0, `${name}: ${r.stdout}`);
  }
  const { messages } = await dovecotRead(`maildir:${maildirOf(inst, ALICE)}`);
  t.equal(messages.length, cases.length);
  // Dovecot returns messages in delivery order (UIDs)
  cases.forEach(([name, , check], i) => {
    const b = messages[i]?.body ?? Buffer.alloc(0);
    if (check instanceof RegExp) t.match(b.toString('latin1'), check, name);
    else t.ok(check(b), name);
  });
  const nul = files(join(maildirOf(inst, ALICE), 'new')).length + files(join(maildirOf(inst, ALICE), 'cur')).length;
  t.equal(nul, cases.length);
});

t.test('+detail into an existing folder; missing folder → INBOX; detail=false → INBOX; -m', async (t) => {
  const inst = makeInstance(scratchDir(t));
  // first mail allocates the box; then the user creates folder "Lists" (as Dovecot would)
  t.equal(cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg()).code, 0);
  const box = maildirOf(inst, ALICE);
  for (const d of ['.Lists', '.Lists/cur', '.Lists/new', '.Lists/tmp']) {
    mkdirSync(join(box, d));
    chownSync(join(box, d), MAIL_UID, MAIL_GID);
  }
  t.equal(cli(inst, ['deliver', '-f', 'bob@remote.test', 'alice+lists@example.test'], msg({ subject: 'to lists' })).code, 0);
  t.equal(cli(inst, ['deliver', '-f', 'bob@remote.test', 'alice+nosuch@example.test'], msg({ subject: 'to inbox' })).code, 0);
  t.equal(cli(inst, ['deliver', '-f', 'bob@remote.test', '-m', 'Lists', ALICE], msg({ subject: 'dash m' })).code, 0);
  t.equal(files(join(box, '.Lists', 'new')).length, 2);
  t.equal(files(join(box, 'new')).length, 2);
  setUser(inst, ALICE, 'mailstore.detail', 'false');
  t.equal(cli(inst, ['deliver', '-f', 'bob@remote.test', 'alice+lists@example.test'], msg({ subject: 'detail off' })).code, 0);
  t.equal(files(join(box, 'new')).length, 3);
  const lists = await dovecotRead(`maildir:${box}`, 'Lists');
  t.equal(lists.messages.length, 2, 'Dovecot sees both in folder Lists');
  t.match(lists.messages[0]?.body.toString() ?? '', /Delivered-To: alice\+lists@example\.test/);
});

t.test('quota: maildirsize as Dovecot/Courier keep it; bounce or defer, configurable', async (t) => {
  const inst = makeInstance(scratchDir(t));
  setUser(inst, ALICE, 'mailstore.quota', '2000');
  t.equal(cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg({ body: 'a'.repeat(500) + '\n' })).code, 0);
  const box = maildirOf(inst, ALICE);
  const ms = readFileSync(join(box, 'maildirsize'), 'latin1').split('\n');
  t.equal(ms[0], '2000S', 'limit line');
  let r = cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg({ body: 'b'.repeat(1800) + '\n' }));
  t.equal(r.code, 73);
  t.match(r.stdout, /^5\.2\.2 Mailbox full/);
  setUser(inst, ALICE, 'mailstore.quota_full', 'defer');
  r = cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg({ body: 'b'.repeat(1800) + '\n' }));
  t.equal(r.code, 75);
  t.match(r.stdout, /^4\.2\.2 Mailbox full/);
  t.equal(cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg({ body: 'c'.repeat(300) + '\n' })).code, 0, 'a small one still fits');
  const lines = readFileSync(join(box, 'maildirsize'), 'latin1').trim().split('\n');
  const used = lines.slice(1).reduce((a, l) => a + Number(l.split(' ')[0]), 0);
  const real = files(join(box, 'new')).reduce((a, f) => a + Number(/,S=(\d+)/.exec(f)?.[1]), 0);
  t.equal(used, real, 'maildirsize sums to the stored sizes');
  t.equal(files(join(box, 'tmp')).length, 0, 'rejected deliveries leave nothing in tmp/');
  // Dovecot's own quota plugin (maildir backend) agrees on the usage
  const { transcript } = await dovecotReadQuota(box);
  t.match(transcript, new RegExp(`STORAGE ${Math.ceil(real / 1024)} `), 'Dovecot quota plugin reads maildirsize');
});

async function dovecotReadQuota(box: string): Promise<{ transcript: string }> {
  const { spawn } = await import('node:child_process');
  return new Promise((res, rej) => {
    const c = spawn('/usr/lib/dovecot/imap', ['-O', '-o', `mail_location=maildir:${box}`, '-o', 'mail_plugins=quota imap_quota', '-o', 'plugin/quota=maildir:User quota', '-o', 'plugin/quota_rule=*:storage=2000B', '-o', 'log_path=/dev/stderr'], {
      uid: MAIL_UID,
      gid: MAIL_GID,
      env: { USER: 'alice', HOME: box, PATH: '/usr/bin:/bin' },
    });
    let out = '';
    c.stdout.on('data', (d: Buffer) => (out += d.toString()));
    c.on('error', rej);
    c.on('close', () => res({ transcript: out }));
    c.stdin.end('a GETQUOTAROOT INBOX\r\nb LOGOUT\r\n');
  });
}

t.test('message size limit: 5.3.4 above mailstore.max_size', async (t) => {
  const inst = makeInstance(scratchDir(t));
  setUser(inst, ALICE, 'mailstore.max_size', '1000');
  const r = cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg({ body: 'x'.repeat(5000) + '\n' }));
  t.equal(r.code, 65);
  t.match(r.stdout, /^5\.3\.4 /);
  t.equal(files(join(maildirOf(inst, ALICE), 'new')).length, 0);
});

t.test('mbox format: dotlock, mboxrd quoting, Dovecot reads it', async (t) => {
  const dir = scratchDir(t);
  const inst = makeInstance(dir);
  cli(inst, ['config', 'set', '--domain', 'example.test', 'mailstore.format', 'mbox']);
  t.equal(cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg({ subject: 'm1', body: 'From the start\n>From quoted\nplain\n' })).code, 0);
  t.equal(cli(inst, ['deliver', '-f', '', ALICE], msg({ subject: 'm2', body: 'no newline at end' })).code, 0);
  const j = JSON.parse(cli(inst, ['user', 'show', ALICE, '--json']).stdout) as { allocation: { format: string; path: string } };
  t.equal(j.allocation.format, 'mbox');
  const file = j.allocation.path;
  const raw = readFileSync(file, 'latin1');
  t.match(raw, /^From bob@remote\.test \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\nReturn-Path: <bob@remote\.test>\n/);
  t.match(raw, /\n>From the start\n>From quoted\nplain\n\nFrom MAILER-DAEMON /);
  t.ok(raw.endsWith('no newline at end\n\n'));
  t.notOk(existsSync(`${file}.lock`), 'dotlock released');
  // a held dotlock makes the delivery wait (it says so in the log), then succeed when it goes away
  const log = join(dir, 'pigeon.log');
  writeFileSync(join(inst, 'conf.d', '50-log.yaml'), `log:\n  file: ${JSON.stringify(log)}\n`);
  writeFileSync(`${file}.lock`, '1\n');
  const waiting = cliAsync(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg({ subject: 'm3' }));
  t.ok(await logged(log, /deliver: mbox: waiting for the dotlock another process holds/), 'the delivery waits for the dotlock');
  t.notMatch(readFileSync(file, 'latin1'), /Subject: m3/, 'nothing appended while it is held');
  unlinkSync(`${file}.lock`);
  t.equal((await waiting).code, 0, 'delivered once the dotlock is gone');
  const root = join(dir, 'dovecot-mbox');
  mkdirSync(root);
  chownSync(root, MAIL_UID, MAIL_GID);
  const { messages } = await dovecotRead(`mbox:${root}:INBOX=${file}:INDEX=MEMORY`);
  t.equal(messages.length, 3, 'Dovecot parses three messages');
  t.match(messages[0]?.body.toString() ?? '', /\r\n\r\n>From the start\r\n>From quoted\r\nplain\r\n$/, 'one message per From_ line: the body line was quoted');
  t.match(messages[1]?.body.toString() ?? '', /^Return-Path: <>\r\n[\s\S]*no newline at end/);
});
