// A real private Postfix instance delivering to pigeon through the three documented forms — pipe(8)
// (`pigeon deliver`), LMTP over TCP to the `pigeon serve` daemon, LMTP over a unix socket to
// `pigeon lmtp` under spawn(8) — from an SMTP submission, to a message the real Dovecot serves, directly and over IMAP through
// the proxy of the same daemon.
// Exit codes and LMTP replies are checked as Postfix logs them (sent / bounced / deferred).
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { writeFileSync } from 'node:fs';
import { CLI, ROOT, cli, ok, makeInstance, setUser, maildirOf, files, msg, dovecotRead, startServe, imapSession, waitFor } from './helpers/delivery-env.js';
import { startPostfix, freePort, smtpSubmit } from './helpers/delivery-postfix.js';
import { scratchDir } from './helpers/instance.js';

/** The `pigeon` command file (package.json bin): a CommonJS entry that loads the ES modules of an in-process delivery */
const PIGEON = join(ROOT, 'dist', 'src', 'cli.cjs');


t.test('Postfix → pipe / lmtp:inet / lmtp:unix+spawn → Maildir → Dovecot', async (t) => {
  const dir = scratchDir(t);
  const inst = makeInstance(dir, []);
  for (const d of ['pipe.test', 'lmtp.test', 'spawn.test']) ok(cli(inst, ['domain', 'add', d]), d);
  for (const u of ['alice@pipe.test', 'full@pipe.test', 'alice@lmtp.test', 'full@lmtp.test', 'alice@spawn.test']) ok(cli(inst, ['user', 'add', u, '--password-stdin'], 'pw\n'), u);
  setUser(inst, 'full@pipe.test', 'mailstore.quota', '10');
  setUser(inst, 'full@lmtp.test', 'mailstore.quota', '10');
  setUser(inst, 'full@lmtp.test', 'mailstore.quota_full', 'defer');
  // pipe(8) and spawn(8) run pigeon as user=mail: the instance must be writable by it
  spawnSync('chown', ['-R', 'mail:mail', inst]);

  // the daemon: LMTP listener for Postfix, IMAP listener for the user
  writeFileSync(join(inst, 'conf.d', '50-listen.yaml'), 'listen:\n  - "lmtp=127.0.0.1:0"\n  - "imap=127.0.0.1:0"\n');
  const served = await startServe(t, inst);
  const lmtpPort = served.ports['lmtp'] ?? 0;

  const smtpPort = await freePort();
  const node = process.execPath;
  const pf = startPostfix({
    dir,
    smtpPort,
    main: `virtual_mailbox_domains = pipe.test lmtp.test spawn.test
virtual_mailbox_maps = static:ok
transport_maps = inline:{ pipe.test=pigeon:, lmtp.test=lmtp:inet:127.0.0.1:${lmtpPort}, spawn.test=lmtp:unix:private/pigeon-lmtp }
pigeon_destination_recipient_limit = 1`,
    // the lines docs/delivery.md shows, with this test's paths
    master: `pigeon    unix  -       n       n       -       -       pipe
  flags=Rq user=mail argv=${node} ${CLI} -c ${inst} deliver -f \${sender} -a \${original_recipient} -- \${recipient}
pigeon-lmtp unix -      n       n       -       -       spawn
  user=mail argv=${node} ${CLI} -c ${inst} lmtp --forker stdio`,
  });
  t.teardown(() => pf.stop());

  const replies = await smtpSubmit(smtpPort, 'bob@remote.test', ['alice@pipe.test', 'nobody@pipe.test', 'full@pipe.test', 'alice@lmtp.test', 'nobody@lmtp.test', 'full@lmtp.test', 'alice@spawn.test'], msg({ to: 'alice@pipe.test', subject: 'via postfix', body: 'hello through postfix\n.dot line\n' }));
  t.match(replies[replies.length - 2] ?? '', /^250 .*queued/, `Postfix queued the message: ${replies.join(' | ')}`);

  const boxes = ['alice@pipe.test', 'alice@lmtp.test', 'alice@spawn.test'].map((u) => maildirOf(inst, u));
  await waitFor('delivery to the three mailboxes', () => boxes.every((b) => files(join(b, 'new')).length === 1));
  await waitFor('Postfix log lines', () => {
    const l = pf.log();
    // every recipient's outcome is logged (Postfix logs "sent" after the mailbox has the message)
    return ['alice@pipe', 'alice@lmtp', 'alice@spawn', 'nobody@pipe', 'nobody@lmtp', 'full@pipe', 'full@lmtp'].every((u) => new RegExp(`to=<${u}\\.test>.*status=`).test(l));
  });
  const log = pf.log();
  t.match(log, /to=<alice@pipe\.test>.*relay=pigeon.*status=sent/, 'pipe: sent');
  t.match(log, /to=<nobody@pipe\.test>.*dsn=5\.1\.1.*status=bounced \(<nobody@pipe\.test>: user unknown/, 'pipe: exit 67 + our line → bounced 5.1.1');
  t.match(log, /to=<full@pipe\.test>.*dsn=5\.2\.2.*status=bounced/, 'pipe: over quota bounced 5.2.2');
  t.match(log, /to=<alice@lmtp\.test>.*relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+.*status=sent \(250 2\.0\.0 <alice@lmtp\.test> Saved\)/, 'lmtp: sent');
  t.match(log, /to=<nobody@lmtp\.test>.*dsn=5\.1\.1.*status=bounced/, 'lmtp: unknown user bounced at RCPT');
  t.match(log, /to=<full@lmtp\.test>.*dsn=4\.2\.2.*status=deferred/, 'lmtp: quota_full=defer → deferred 4.2.2');
  t.match(log, /to=<alice@spawn\.test>.*relay=.*pigeon-lmtp.*status=sent/, 'lmtp via spawn(8): sent');

  for (const b of boxes) {
    const { messages } = await dovecotRead(`maildir:${b}`);
    t.equal(messages.length, 1, `Dovecot serves the message in ${b}`);
    const text = messages[0]?.body.toString() ?? '';
    t.match(text, /^Return-Path: <bob@remote\.test>\r\nDelivered-To: alice@(pipe|lmtp|spawn)\.test\r\n/);
    t.equal(text.match(/^Return-Path:/gm)?.length, 1, 'one Return-Path (pipe R flag replaced, not duplicated)');
    t.match(text, /Received: from client\.pigeon\.test/, 'Postfix trace kept');
    t.match(text, /\r\n\r\nhello through postfix\r\n\.dot line\r\n$/);
  }
  t.equal(files(join(maildirOf(inst, 'full@pipe.test'), 'new')).length, 0);

  // and the users read their mail over IMAP through the proxy of the same daemon
  for (const u of ['alice@pipe.test', 'alice@lmtp.test']) {
    const tr = await imapSession(served.ports['imap'] ?? 0, u, 'pw', ['SELECT INBOX', 'FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT DELIVERED-TO)])']);
    t.match(tr, /\* 1 EXISTS/, `${u}: one message over IMAP via the proxy`);
    t.match(tr, new RegExp(`Delivered-To: ${u.replace('.', '\\.')}`));
    t.match(tr, /Subject: via postfix/);
  }

  // a bounce (null sender) through pipe(8): ${sender} expands to MAILER-DAEMON → Return-Path: <>
  const r2 = await smtpSubmit(smtpPort, '', ['alice@pipe.test'], msg({ subject: 'null sender' }));
  t.match(r2[r2.length - 2] ?? '', /^250 /);
  await waitFor('second pipe delivery', () => files(join(boxes[0] ?? '', 'new')).length + files(join(boxes[0] ?? '', 'cur')).length === 2);
  const { messages } = await dovecotRead(`maildir:${boxes[0] ?? ''}`);
  t.match(messages[1]?.body.toString() ?? '', /^Return-Path: <>\r\n/);
  // stop both before tap removes the test directory (its teardown runs first)
  pf.stop();
  await served.stop();
});

t.test('Postfix pipe flags=DRhu (the dovecot-lda master.cf line): delivered; a Delivered-To below Received still bounces 5.4.6', async (t) => {
  const dir = scratchDir(t);
  const inst = makeInstance(dir, []);
  ok(cli(inst, ['domain', 'add', 'drhu.test']), 'domain');
  ok(cli(inst, ['user', 'add', 'alice@drhu.test', '--password-stdin'], 'pw\n'), 'user');
  spawnSync('chown', ['-R', 'mail:mail', inst]);
  const smtpPort = await freePort();
  const pf = startPostfix({
    dir,
    smtpPort,
    main: `virtual_mailbox_domains = drhu.test
virtual_mailbox_maps = static:ok
virtual_transport = pigeon:
pigeon_destination_recipient_limit = 1`,
    master: `pigeon    unix  -       n       n       -       -       pipe
  flags=DRhu user=mail argv=${process.execPath} ${PIGEON} -c ${inst} deliver -f \${sender} -a \${original_recipient} -d \${recipient}`,
  });
  t.teardown(() => pf.stop());
  const box = maildirOf(inst, 'alice@drhu.test');
  const submit = async (rcpt: string, m: string): Promise<void> => {
    const r = await smtpSubmit(smtpPort, 'bob@remote.test', [rcpt], m);
    t.match(r[r.length - 2] ?? '', /^250 /, `queued: ${r.join(' | ')}`);
  };
  await submit('alice@drhu.test', msg({ to: 'alice@drhu.test', subject: 'clean' }));
  await waitFor('the clean message', () => /to=<alice@drhu\.test>.*status=(sent|bounced|deferred)/.test(pf.log()));
  t.match(pf.log(), /to=<alice@drhu\.test>.*relay=pigeon.*status=sent/, 'flags=DRhu: sent, not bounced as a loop');
  const { messages } = await dovecotRead(`maildir:${box}`);
  t.equal(messages.length, 1);
  const text = messages[0]?.body.toString() ?? '';
  t.equal(text.match(/^Delivered-To: alice@drhu\.test\r$/gm)?.length, 1, 'exactly one Delivered-To (pipe(8)\'s)');
  t.equal(text.match(/^Return-Path:/gm)?.length, 1, 'one Return-Path');
  t.match(text, /^Return-Path: <bob@remote\.test>\r\nDelivered-To: alice@drhu\.test\r\nReceived: /, 'trace block above the topmost Received:');

  // the message already carried the user's Delivered-To below its Received: (it was delivered
  // here before and came back): pigeon's own check bounces it, also for the +detail address
  // that pipe(8)'s check (same recipient only) lets through
  const looped = msg({ to: 'alice@drhu.test', subject: 'looped', headers: 'Received: from old.hop by drhu.test\nDelivered-To: alice@drhu.test\n' });
  await submit('alice+tag@drhu.test', looped);
  await submit('alice@drhu.test', looped);
  await waitFor('both looped messages bounced', () => /to=<alice\+tag@drhu\.test>.*status=bounced/.test(pf.log()) && (pf.log().match(/to=<alice@drhu\.test>.*status=/g) ?? []).length >= 2);
  const log = pf.log();
  t.match(log, /to=<alice\+tag@drhu\.test>.*dsn=5\.4\.6.*status=bounced \(<alice\+tag@drhu\.test>: mail forwarding loop \(Delivered-To: alice@drhu\.test already present\)/, 'pigeon: 5.4.6 for the address below Received:');
  t.match(log, /to=<alice@drhu\.test>.*dsn=5\.4\.6.*status=bounced/, 'same recipient: bounced 5.4.6');
  t.equal(files(join(box, 'new')).length + files(join(box, 'cur')).length, 1, 'nothing stored from the loops');
  pf.stop();
});
