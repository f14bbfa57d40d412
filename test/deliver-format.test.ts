// pigeon deliver as Postfix pipe(8) runs it, the message side: odd messages, +detail folders,
// quota, the size limit and the mbox format, each as the real Dovecot then reads it. (Recipients,
// senders, loops: deliver.test.ts.)
import t from 'tap';
import { mkdirSync, chownSync, readFileSync, writeFileSync, existsSync, unlinkSync } from 'node:fs';
import { join } from 'node:path';
import { cli, cliAsync, makeInstance, setUser, maildirOf, files, msg, dovecotRead, MAIL_UID, MAIL_GID } from './helpers/delivery-env.js';
import { scratchDir } from './helpers/instance.js';

// tap's per-file timeout for this file: it ran 37 s alone on a lightly loaded machine, and two
// suites at once on 2 cores make a file take 2-3 times as long (the default is 180 s, .taprc)
t.setTimeout(240_000);

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
