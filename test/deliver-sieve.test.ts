// mailstore.mda dovecot-lda: Dovecot's own dovecot-lda delivers, running the user's Sieve script
// (sieve.script) through Debian's dovecot-sieve (Pigeonhole). The user reads the result over IMAP
// through the proxy (imapflow); a Sieve reject becomes the recipient's 5.7.1 (pipe(8): exit 77;
// LMTP: per recipient) and is not mailed by Dovecot itself; a broken script still delivers to
// INBOX with one log line; a domain can force its script over the user's.
import t, { type Test } from 'tap';
import { chownSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ImapFlow } from 'imapflow';
import { cli, ok, msg, maildirOf, files, setUser, startServe, MAIL_UID, MAIL_GID } from './helpers/delivery-env.js';
import { dataOf, lmtpDialog } from './helpers/delivery-lmtp.js';
import { recorder, withSendmail } from './helpers/sendmail.js';
import { scratchDir } from './helpers/instance.js';
import { requireProgram } from './helpers/programs.js';

// tap's per-file timeout: about 40 s alone (two serve daemons, ~40 CLI runs, each delivery one
// dovecot-lda); two suites at once on 2 cores make a file take 2-3 times as long
t.setTimeout(300_000);

const LDA = '/usr/lib/dovecot/dovecot-lda';
const SIEVE_PLUGIN = '/usr/lib/dovecot/modules/lib90_sieve_plugin.so';
const ALICE = 'alice@example.test';
const BOB = 'bob@example.test';

/** An instance with imap and lmtp listeners, users alice and bob, its log in pigeon.log. */
function instance(t: Test, listen = false): { inst: string; dir: string; log: () => string } {
  const dir = scratchDir(t);
  const inst = join(dir, 'inst');
  ok(cli(inst, ['init', inst, ...(listen ? ['--listen', 'imap=127.0.0.1:0', '--listen', 'lmtp=127.0.0.1:0'] : [])]), 'init');
  ok(cli(inst, ['domain', 'add', 'example.test']), 'domain');
  for (const u of [ALICE, BOB]) ok(cli(inst, ['user', 'add', u, '--password-stdin'], 'secret\n'), `user ${u}`);
  mkdirSync(join(inst, 'conf.d'), { recursive: true });
  writeFileSync(join(inst, 'conf.d', '50-log.yaml'), 'log:\n  file: pigeon.log\n');
  const logFile = join(inst, 'pigeon.log');
  return { inst, dir, log: () => (existsSync(logFile) ? readFileSync(logFile, 'utf8') : '') };
}

/** A Sieve script in a directory of the mail user (Pigeonhole saves its compiled form beside it). */
function script(dir: string, name: string, text: string): string {
  const d = join(dir, 'sieve');
  if (!existsSync(d)) {
    mkdirSync(d);
    chownSync(d, MAIL_UID, MAIL_GID);
  }
  const p = join(d, name);
  writeFileSync(p, text);
  chownSync(p, MAIL_UID, MAIL_GID);
  return p;
}

const RULES = `require ["fileinto", "reject"];
if exists "list-id" { fileinto "Lists"; stop; }
if header :contains "subject" "buy now" { reject "I do not buy anything by mail."; stop; }
`;

function deliver(inst: string, rcpt: string, text: string, sender = 'carol@remote.test'): ReturnType<typeof cli> {
  return cli(inst, ['deliver', '-f', sender, rcpt], text);
}

function needPrograms(t: Test): boolean {
  return requireProgram(t, LDA, 'dovecot-core') && requireProgram(t, SIEVE_PLUGIN, 'dovecot-sieve');
}

t.test('fileinto "Lists": the list message is in Lists over IMAP through the proxy, the rest in INBOX', async (t) => {
  if (!needPrograms(t)) return;
  const { inst, dir, log } = instance(t, true);
  setUser(inst, ALICE, 'mailstore.mda', 'dovecot-lda');
  setUser(inst, ALICE, 'sieve.script', script(dir, 'alice.sieve', RULES));
  let r = deliver(inst, ALICE, msg({ subject: 'weekly digest', headers: 'List-Id: <news.lists.remote.test>\n' }));
  t.equal(r.code, 0, `list message delivered: ${r.stdout}`);
  r = deliver(inst, ALICE, msg({ subject: 'hello alice' }));
  t.equal(r.code, 0, `plain message delivered: ${r.stdout}`);
  const box = maildirOf(inst, ALICE);
  t.ok(existsSync(join(box, 'dovecot.index.log')) || existsSync(join(box, 'dovecot-uidlist')), "Dovecot's index was updated at delivery time");
  t.notMatch(log(), /sieve: script failed/, 'the script ran without error');

  const served = await startServe(t, inst);
  const client = new ImapFlow({ host: '127.0.0.1', port: served.ports['imap'] ?? 0, secure: false, doSTARTTLS: false, auth: { user: ALICE, pass: 'secret' }, logger: false });
  await client.connect();
  t.teardown(() => client.close());
  const list = await client.list();
  const lists = list.find((m) => m.path === 'Lists');
  t.ok(lists, 'the Lists folder exists (created by fileinto)');
  t.ok(lists?.subscribed, 'and is subscribed, so mail clients show it');
  const subjects = async (box: string): Promise<string[]> => {
    const lock = await client.getMailboxLock(box);
    const out: string[] = [];
    try {
      for await (const m of client.fetch('1:*', { envelope: true })) out.push(m.envelope?.subject ?? '');
    } finally {
      lock.release();
    }
    return out;
  };
  t.same(await subjects('Lists'), ['weekly digest'], 'Lists holds the list message');
  t.same(await subjects('INBOX'), ['hello alice'], 'INBOX holds the other one');
  await client.logout();
});

t.test('reject: 5.7.1 for that recipient (pipe: exit 77; LMTP: per recipient), nothing stored, nothing mailed by Dovecot', async (t) => {
  if (!needPrograms(t)) return;
  const { inst, dir } = instance(t, true);
  const sm = recorder(dir);
  chownSync(join(dir, 'sendmail-calls'), MAIL_UID, MAIL_GID); // a rejection dovecot-lda mailed would be recorded
  withSendmail(inst, sm.script);
  setUser(inst, ALICE, 'mailstore.mda', 'dovecot-lda');
  setUser(inst, ALICE, 'sieve.script', script(dir, 'alice.sieve', RULES));
  setUser(inst, BOB, 'mailstore.mda', 'dovecot-lda');
  const box = maildirOf(inst, ALICE);

  const r = deliver(inst, ALICE, msg({ subject: 'BUY NOW cheap' }));
  t.equal(r.code, 77, 'EX_NOPERM');
  t.equal(r.stdout, "5.7.1 <alice@example.test>: rejected by the recipient's Sieve filter: I do not buy anything by mail.\n", 'the one status line, with the script\'s reason');
  t.same(files(join(box, 'new')), [], 'not stored');
  t.same(sm.calls(), [], 'no rejection mailed by dovecot-lda: the MTA bounces');

  const served = await startServe(t, inst);
  const { d, greeting } = await lmtpDialog(t, served.ports['lmtp'] ?? 0);
  t.match(greeting, /^220 /);
  t.match(await d.cmd('MAIL FROM:<carol@remote.test>'), /^250 /);
  t.match(await d.cmd(`RCPT TO:<${ALICE}>`), /^250 /);
  t.match(await d.cmd(`RCPT TO:<${BOB}>`), /^250 /);
  t.match(await d.cmd('DATA'), /^354 /);
  d.send(dataOf(msg({ subject: 'buy now: last chance', to: `${ALICE}, ${BOB}` })));
  t.match(await d.line(), /^5\d\d 5\.7\.1 <alice@example\.test>: rejected by the recipient's Sieve filter: I do not buy anything by mail\.$/, 'alice: 5.7.1 with the reason');
  t.match(await d.line(), /^250 2\.0\.0 <bob@example\.test> Saved/, 'bob (no script): delivered');
  await d.cmd('QUIT');
  t.same(files(join(box, 'new')), [], 'alice: still nothing stored');
  t.equal(files(join(maildirOf(inst, BOB), 'new')).length, 1, 'bob: stored');
  t.same(sm.calls(), [], 'still nothing mailed by dovecot-lda');
});

t.test('redirect: a message the script sends goes to the MTA through the node sendmail', async (t) => {
  if (!needPrograms(t)) return;
  const { inst, dir } = instance(t);
  const sm = recorder(dir);
  chownSync(join(dir, 'sendmail-calls'), MAIL_UID, MAIL_GID); // dovecot-lda runs sendmail as the mail user
  withSendmail(inst, sm.script);
  setUser(inst, ALICE, 'mailstore.mda', 'dovecot-lda');
  setUser(inst, ALICE, 'sieve.script', script(dir, 'alice.sieve', 'require "copy";\nredirect :copy "dave@elsewhere.test";\n'));
  const r = deliver(inst, ALICE, msg({ subject: 'pass it on' }));
  t.equal(r.code, 0, r.stdout);
  const calls = sm.calls();
  t.equal(calls.length, 1, 'one message to sendmail');
  t.same(calls[0]?.args.slice(-2), ['--', 'dave@elsewhere.test'], 'to the redirect target');
  t.match(calls[0]?.input ?? '', /Subject: pass it on/, 'the message itself');
  t.equal(files(join(maildirOf(inst, ALICE), 'new')).length, 1, ':copy keeps it in INBOX');
});

t.test('a script with a syntax error: delivered to INBOX, one log line', async (t) => {
  if (!needPrograms(t)) return;
  const { inst, dir, log } = instance(t);
  setUser(inst, ALICE, 'mailstore.mda', 'dovecot-lda');
  setUser(inst, ALICE, 'sieve.script', script(dir, 'broken.sieve', 'require "fileinto";\nif header :contains "subject" "x" { fileinto "Lists" \n'));
  const r = deliver(inst, ALICE, msg({ subject: 'x marks the spot', headers: 'List-Id: <l.remote.test>\n' }));
  t.equal(r.code, 0, `delivered: ${r.stdout}`);
  t.equal(files(join(maildirOf(inst, ALICE), 'new')).length, 1, 'in INBOX (implicit keep)');
  t.notOk(existsSync(join(maildirOf(inst, ALICE), '.Lists')), 'the broken rule did not run');
  const lines = log().split('\n').filter((l) => /sieve: script failed/.test(l));
  t.equal(lines.length, 1, 'one log line');
  t.match(lines[0] ?? '', /deliver\(alice@example\.test\).*sieve: script failed, delivered to INBOX.*script=\S*broken\.sieve.*Failed to compile/, 'naming the user, the script and the error');
});

t.test('no script: plain delivery into INBOX; +detail into an existing folder only', async (t) => {
  if (!needPrograms(t)) return;
  const { inst, log } = instance(t);
  setUser(inst, ALICE, 'mailstore.mda', 'dovecot-lda');
  let r = deliver(inst, ALICE, msg({ subject: 'plain' }));
  t.equal(r.code, 0, r.stdout);
  const box = maildirOf(inst, ALICE);
  t.equal(files(join(box, 'new')).length, 1, 'in INBOX');
  const stored = readFileSync(join(box, 'new', files(join(box, 'new'))[0] ?? ''), 'utf8');
  t.match(stored, /^Return-Path: <carol@remote\.test>\nDelivered-To: alice@example\.test\nFrom: /, 'the same trace header lines as the built-in MDA, once');
  t.notMatch(log(), /sieve:/, 'no Sieve involved');
  r = deliver(inst, 'alice+nosuch@example.test', msg({ subject: 'detail, no folder' }));
  t.equal(r.code, 0, r.stdout);
  t.notOk(existsSync(join(box, '.nosuch')), 'a +detail folder is never created by incoming mail');
  t.equal(files(join(box, 'new')).length, 2, 'into INBOX instead');
});

t.test('a domain forces its script: the user\'s own sieve.script has no effect (and config set says so)', async (t) => {
  if (!needPrograms(t)) return;
  const { inst, dir } = instance(t);
  ok(cli(inst, ['config', 'set', '--domain', 'example.test', 'mailstore.mda', 'dovecot-lda']), 'domain mda');
  ok(cli(inst, ['config', 'set', '--domain', 'example.test', 'sieve.script', script(dir, 'domain.sieve', 'require "fileinto";\nfileinto "Domain";\n'), '--override']), 'domain forces');
  const set = cli(inst, ['config', 'set', '--user', ALICE, 'sieve.script', script(dir, 'mine.sieve', 'require "fileinto";\nfileinto "Mine";\n')]);
  t.equal(set.code, 0);
  t.match(`${set.stdout}${set.stderr}`, /no effect.*domain/i, 'warns that the domain forces it');
  const r = deliver(inst, ALICE, msg({ subject: 'whose rule' }));
  t.equal(r.code, 0, r.stdout);
  const box = maildirOf(inst, ALICE);
  t.equal(files(join(box, '.Domain', 'new')).length, 1, "the domain's script ran");
  t.notOk(existsSync(join(box, '.Mine')), "the user's did not");
});

t.test('quota through Dovecot (same maildirsize); dovecot-lda missing defers', async (t) => {
  if (!needPrograms(t)) return;
  const { inst, dir } = instance(t);
  setUser(inst, ALICE, 'mailstore.mda', 'dovecot-lda');
  setUser(inst, ALICE, 'mailstore.quota', '400');
  let r = deliver(inst, ALICE, msg({ subject: 'fits' }));
  t.equal(r.code, 0, r.stdout);
  const box = maildirOf(inst, ALICE);
  t.match(readFileSync(join(box, 'maildirsize'), 'utf8'), /^400S\n/, 'Maildir++ maildirsize with the quota');
  r = deliver(inst, ALICE, msg({ subject: 'too much', body: 'x'.repeat(500) }));
  t.equal(r.code, 73, 'over quota bounces (quota_full bounce)');
  t.match(r.stdout, /^5\.2\.2 Mailbox full \(quota 400 bytes exceeded\)/);
  setUser(inst, ALICE, 'mailstore.quota_full', 'defer');
  r = deliver(inst, ALICE, msg({ subject: 'too much', body: 'x'.repeat(500) }));
  t.equal(r.code, 75, 'quota_full defer');
  t.match(r.stdout, /^4\.2\.2 /);
  t.equal(files(join(box, 'new')).length, 1, 'only the first stored');

  writeFileSync(join(inst, 'conf.d', '60-lda.yaml'), `dovecot:\n  lda: ${JSON.stringify(join(dir, 'no-such-lda'))}\n`);
  setUser(inst, ALICE, 'mailstore.quota', '0');
  r = deliver(inst, ALICE, msg({ subject: 'no lda' }));
  t.equal(r.code, 75, 'deferred, never bounced');
  t.match(r.stdout, /^4\.3\.0 dovecot-lda \(.*no-such-lda\) did not run: cannot run .*ENOENT/);
});
