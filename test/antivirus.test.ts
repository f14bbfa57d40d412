// The antivirus delivery module against a REAL clamd (private config, the local EICAR signature):
// one scan per message with per-recipient answers over LMTP (reject 550 5.7.1 naming the
// signature, quarantine into .Quarantine created as the mail user, tag), clean mail, notify (one
// notice per message and recipient), on_error defer/accept with clamd down, slow, answering
// garbage, closing mid-stream (tiny fake servers for the faults) and refusing an over-long stream,
// oversize accept/reject, a domain forcing the module on over a user's "false", and the issue's
// "Done when": EICAR through a real Postfix to two recipients, one rejecting, one quarantining.
import t, { type Test } from 'tap';
import net from 'node:net';
import { statSync, writeFileSync, readFileSync, existsSync, mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { loadInstance } from '../src/instance.js';
import { openStore } from '../src/store.js';
import { createLogger } from '../src/log.js';
import { createLmtpServer, listenLmtp } from '../src/delivery/lmtp.js';
import { cli, cliAsync, ok, makeInstance, setUser, maildirOf, files, msg, dovecotRead, startServe, imapSession, MAIL_UID, sleep } from './helpers/delivery-env.js';
import { Dialog, dataOf } from './helpers/delivery-lmtp.js';
import { recorder, withSendmail } from './helpers/sendmail.js';
import { startPostfix, freePort, smtpSubmit } from './helpers/delivery-postfix.js';
import { scratchDir } from './helpers/instance.js';
import { startClamd, EICAR, EICAR_NAME, CLAMD_STREAM_MAX } from './helpers/clamd.js';

// one clamd for the whole file (it takes a few seconds to load); Postfix and several instances
t.setTimeout(420_000);

const ALICE = 'alice@example.test';
const CAROL = 'carol@example.test';
const DAVE = 'dave@example.test';
const ERIN = 'erin@example.test';

/** A message with the EICAR test file as a base64 attachment (how a virus arrives). */
function infected(subject: string, to = ALICE): string {
  const b64 = Buffer.from(EICAR, 'latin1').toString('base64');
  return msg({
    to,
    subject,
    headers: 'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b1"\n',
    body: `--b1\nContent-Type: text/plain\n\nsee attachment\n--b1\nContent-Type: application/octet-stream\nContent-Disposition: attachment; filename="eicar.com"\nContent-Transfer-Encoding: base64\n\n${b64}\n--b1--\n`,
  });
}

function useClamd(inst: string, address: string, timeoutS = 30): void {
  writeFileSync(join(inst, 'conf.d', '60-clamd.yaml'), `clamd:\n  address: ${JSON.stringify(address)}\n  timeout_s: ${timeoutS}\n`);
}

function logTo(inst: string): string {
  const f = join(inst, 'pigeon.log');
  writeFileSync(join(inst, 'conf.d', '40-log.yaml'), `log:\n  file: ${JSON.stringify(f)}\n`);
  return f;
}
const readLog = (f: string): string => (existsSync(f) ? readFileSync(f, 'utf8') : '');

const FOUND = new RegExp(`${EICAR_NAME.replace(/\./g, '\\.')} FOUND`, 'g');
const FOUND_LINE = new RegExp(`${EICAR_NAME.replace(/\./g, '\\.')} FOUND`);

async function lmtpServer(inst: string, t: Test) {
  const instance = loadInstance(inst);
  const store = await openStore(instance.config.database, { baseDir: instance.dir });
  const lines: string[] = [];
  const logger = createLogger({ level: 'debug', sink: (l) => lines.push(l) });
  const server = createLmtpServer({ instance, store, logger, remote: null });
  t.teardown(() => store.close());
  const srv = await listenLmtp(server, { host: '127.0.0.1', port: 0, path: null });
  t.teardown(() => srv.close());
  const port = (srv.address() as net.AddressInfo).port;
  const sock = await new Promise<net.Socket>((res, rej) => {
    const s = net.connect({ host: '127.0.0.1', port }, () => res(s));
    s.once('error', rej);
  });
  t.teardown(() => sock.destroy());
  const d = Dialog.of(sock);
  await d.line();
  d.send('LHLO client.test\r\n');
  await d.reply();
  /** one transaction: the per-recipient replies after DATA */
  const send = async (rcpts: readonly string[], message: string): Promise<string[]> => {
    await d.cmd('MAIL FROM:<bob@remote.test>');
    for (const r of rcpts) await d.cmd(`RCPT TO:<${r}>`);
    await d.cmd('DATA');
    d.send(dataOf(message));
    const out: string[] = [];
    for (let i = 0; i < rcpts.length; i++) out.push(await d.line());
    return out;
  };
  return { send, lines };
}

const clamd = await startClamd(t);

if (clamd) {
  t.test('LMTP, one scan: reject (550 5.7.1 + name), quarantine (.Quarantine as the mail user), tag; clean passes', async (t) => {
    const inst = makeInstance(scratchDir(t), [ALICE, CAROL, DAVE]);
    useClamd(inst, clamd.socket);
    ok(cli(inst, ['config', 'set', '--global', 'antivirus.enabled', 'true']), 'enable');
    setUser(inst, CAROL, 'antivirus.action', 'quarantine');
    setUser(inst, DAVE, 'antivirus.action', 'tag');
    const { send, lines } = await lmtpServer(inst, t);
    const before = (clamd.log().match(FOUND) ?? []).length;
    const replies = await send([ALICE, CAROL, DAVE], infected('infected'));
    t.equal(replies[0], `550 5.7.1 Message rejected: virus found (${EICAR_NAME})`, 'alice (action reject, the default): 550 5.7.1 naming the signature');
    t.match(replies[1], /^250 2\.0\.0 <carol@example\.test> Saved$/, 'carol (quarantine): accepted');
    t.match(replies[2], /^250 2\.0\.0 <dave@example\.test> Saved$/, 'dave (tag): accepted');
    await clamd.waitLog(FOUND_LINE, before + 1); // clamd logs FOUND after it answered
    t.equal(lines.filter((l) => /antivirus: virus found/.test(l)).length, 1, 'one log line for the virus');

    t.equal(files(join(maildirOf(inst, ALICE), 'new')).length, 0, 'nothing stored for alice');
    const carol = maildirOf(inst, CAROL);
    t.equal(files(join(carol, 'new')).length, 0, "not in carol's INBOX");
    t.equal(statSync(join(carol, '.Quarantine')).uid, MAIL_UID, '.Quarantine created by the mail user');
    t.ok(existsSync(join(carol, '.Quarantine', 'maildirfolder')), 'a Maildir++ folder');
    const q = await dovecotRead(`maildir:${carol}`, 'Quarantine');
    t.equal(q.messages.length, 1, 'Dovecot serves the message in the folder Quarantine');
    t.match(q.messages[0]?.body.toString() ?? '', new RegExp(`^Return-Path: <bob@remote\\.test>\\r\\nDelivered-To: carol@example\\.test\\r\\nX-Virus-Status: Infected \\(${EICAR_NAME.replace(/\./g, '\\.')}\\)\\r\\n`));
    const dave = await dovecotRead(`maildir:${maildirOf(inst, DAVE)}`);
    t.equal(dave.messages.length, 1, 'dave: in INBOX');
    t.match(dave.messages[0]?.body.toString() ?? '', /\r\nX-Virus-Status: Infected \(Eicar-Test-Signature-Local\.UNOFFICIAL\)\r\n/, 'tagged');

    // a clean message passes for all three, marked clean
    const clean = await send([ALICE, CAROL, DAVE], msg({ subject: 'clean' }));
    for (const r of clean) t.match(r, /^250 2\.0\.0 /, 'clean mail delivered');
    const a = await dovecotRead(`maildir:${maildirOf(inst, ALICE)}`);
    t.equal(a.messages.length, 1);
    t.match(a.messages[0]?.body.toString() ?? '', /\r\nX-Virus-Status: Clean\r\n/);
    t.equal(files(join(carol, 'new')).length, 1, "carol's clean mail in INBOX");
    t.equal(files(join(carol, '.Quarantine', 'new')).length + files(join(carol, '.Quarantine', 'cur')).length, 1, 'not in quarantine');
    // counted a whole transaction later: a second scan of the infected message would be in the log by now
    t.equal((clamd.log().match(FOUND) ?? []).length - before, 1, 'clamd scanned the infected message once for three recipients');
  });

  t.test('notify: one notice per infected message and recipient, through sendmail; none for a message not delivered', async (t) => {
    const dir = scratchDir(t);
    const inst = makeInstance(dir, [ALICE, CAROL, DAVE, ERIN]);
    useClamd(inst, clamd.socket);
    const sm = recorder(dir);
    withSendmail(inst, sm.script);
    for (const u of [ALICE, CAROL, DAVE, ERIN]) setUser(inst, u, 'antivirus.enabled', 'true');
    // erin quarantines with a notice, but her mailbox is full: the message is not delivered
    setUser(inst, ERIN, 'antivirus.action', 'quarantine');
    setUser(inst, ERIN, 'antivirus.notify', 'true');
    setUser(inst, ERIN, 'mailstore.quota', '10');
    setUser(inst, ALICE, 'antivirus.notify', 'true');
    setUser(inst, CAROL, 'antivirus.notify', 'true');
    setUser(inst, CAROL, 'antivirus.action', 'quarantine');
    const { send } = await lmtpServer(inst, t);
    // carol twice (a duplicate RCPT is one copy): still one notice for her
    const replies = await send([ALICE, CAROL, CAROL, DAVE, ERIN], infected('virus inside'));
    t.match(replies[0], /^550 5\.7\.1 /);
    t.match(replies[1], /^250 /);
    t.match(replies[2], /^250 /);
    t.match(replies[3], /^550 5\.7\.1 /, 'dave rejects too, without a notice');
    t.match(replies[4], /^552 5\.2\.2 /, 'erin: over quota, not delivered');
    const calls = sm.calls();
    t.equal(calls.length, 2, 'two notices: alice and carol; none for dave (notify off) nor erin (not delivered)');
    const to = calls.map((c) => c.args.slice(-1)[0]).sort();
    t.same(to, [ALICE, CAROL]);
    for (const c of calls) {
      t.same(c.args.slice(0, 4), ['-i', '-f', '<>', '--'], 'null envelope sender');
      t.match(c.input, /^Subject: Virus found in a message to you$/m);
      t.match(c.input, new RegExp(`Virus: ${EICAR_NAME.replace(/\./g, '\\.')}`));
      t.match(c.input, /Subject: virus inside/);
      t.match(c.input, /^Auto-Submitted: auto-generated$/m);
    }
    t.match(calls.find((c) => c.args.includes(CAROL))?.input ?? '', /delivered into your folder Quarantine/);
    t.match(calls.find((c) => c.args.includes(ALICE))?.input ?? '', /rejected, not delivered/);
    // clean mail: no notice
    await send([ALICE], msg({ subject: 'clean' }));
    t.equal(sm.calls().length, 2, 'no notice for clean mail');
  });

  t.test('on_error: clamd down, slow, garbage, closing mid-stream, refusing the stream → defer (4.7.0) or accept unscanned; one log line naming clamd', async (t) => {
    const dir = scratchDir(t);
    const inst = makeInstance(dir, [ALICE]);
    const logFile = logTo(inst);
    setUser(inst, ALICE, 'antivirus.enabled', 'true');
    // fake clamds for the faults, on unix sockets in a short directory
    const sdir = mkdtempSync('/tmp/avfake-');
    t.teardown(() => rmSync(sdir, { recursive: true, force: true }));
    const fake = async (name: string, onConn: (s: net.Socket) => void): Promise<string> => {
      const path = join(sdir, name);
      const srv = net.createServer(onConn);
      await new Promise<void>((r) => srv.listen(path, () => r()));
      t.teardown(() => new Promise<void>((r) => srv.close(() => r())));
      return path;
    };
    const garbage = await fake('garbage', (s) => {
      s.once('data', () => s.write('HELLO THERE\0'));
      s.on('error', () => undefined);
    });
    const midStream = await fake('mid', (s) => {
      s.once('data', () => s.destroy()); // reads the first bytes, then goes away without an answer
      s.on('error', () => undefined);
    });
    const held: net.Socket[] = [];
    const slow = await fake('slow', (s) => {
      held.push(s); // reads everything, never answers
      s.resume();
      s.on('error', () => undefined);
    });
    t.teardown(() => held.forEach((s) => s.destroy()));
    const down = join(sdir, 'nobody-listens');

    const cases: [string, string, number, RegExp][] = [
      ['down', down, 30, /ENOENT/],
      ['slow', slow, 1, /no answer within 1 s/],
      ['garbage', garbage, 30, /garbage: "HELLO THERE"/],
      ['closing mid-stream', midStream, 30, /closed the connection before answering/],
    ];
    for (const [what, address, timeout, why] of cases) {
      useClamd(inst, address, timeout);
      setUser(inst, ALICE, 'antivirus.on_error', 'defer');
      const logBefore = readLog(logFile).length;
      // cliAsync: the fake servers live in this process, whose event loop must keep running
      let r = await cliAsync(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg({ subject: `${what} defer` }));
      t.equal(r.code, 75, `${what}, defer: exit 75 (Postfix retries)`);
      t.equal(r.stdout, '4.7.0 Virus scanner unavailable; try again later\n');
      const added = readLog(logFile).slice(logBefore);
      const fails = added.split('\n').filter((l) => /antivirus: clamd failed/.test(l));
      t.equal(fails.length, 1, `${what}: one log line`);
      t.ok(fails[0]?.includes(address), `${what}: it names clamd's address`);
      t.match(fails[0] ?? '', why, `${what}: and what happened`);
      t.equal(files(join(maildirOf(inst, ALICE), 'new')).length, 0, `${what}, defer: nothing stored`);

      setUser(inst, ALICE, 'antivirus.on_error', 'accept');
      r = await cliAsync(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg({ subject: `${what} accept` }));
      t.equal(r.code, 0, `${what}, accept: delivered ${r.stdout}`);
      const { messages } = await dovecotRead(`maildir:${maildirOf(inst, ALICE)}`);
      const last = messages[messages.length - 1]?.body.toString() ?? '';
      t.match(last, new RegExp(`X-Virus-Status: Unscanned \\(scanner error\\)\\r\\n[\\s\\S]*Subject: ${what} accept`), `${what}, accept: marked unscanned`);
    }

    // the real clamd refusing a stream over its StreamMaxLength: an ERROR answer, on_error decides
    useClamd(inst, clamd.socket);
    setUser(inst, ALICE, 'antivirus.on_error', 'defer');
    const big = msg({ subject: 'over clamd limit', body: `${'y'.repeat(99)}\n`.repeat(Math.ceil((CLAMD_STREAM_MAX * 1.5) / 100)) });
    const r = cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], big);
    t.equal(r.code, 75, 'clamd ERROR: deferred');
    // clamd answers and closes while the rest is still being sent: the answer is read when it
    // arrives first; when the write fails first (EPIPE; seen under two suites at once) Node has
    // destroyed the socket and the log says the connection closed. Deferred either way.
    t.match(readLog(logFile), /antivirus: clamd failed: clamd=\S*clamd\.sock, error=(answered "INSTREAM size limit exceeded\. ERROR"|closed the connection before answering)/, 'logged once, naming clamd: its own words, or that it closed mid-stream');
  });

  t.test('oversize (antivirus.max_size): accept with a header, or reject 5.3.4; clamd never asked', async (t) => {
    const inst = makeInstance(scratchDir(t), [ALICE]);
    useClamd(inst, clamd.socket);
    setUser(inst, ALICE, 'antivirus.enabled', 'true');
    setUser(inst, ALICE, 'antivirus.max_size', '2000');
    const big = infected('big virus') + `${'z'.repeat(99)}\n`.repeat(30);
    const before = (clamd.log().match(FOUND) ?? []).length;
    let r = cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], big);
    t.equal(r.code, 0, `oversize=accept (default): delivered ${r.stdout}`);
    const { messages } = await dovecotRead(`maildir:${maildirOf(inst, ALICE)}`);
    t.match(messages[0]?.body.toString() ?? '', /\r\nX-Virus-Status: Unscanned \(larger than 2000 bytes\)\r\n/);
    setUser(inst, ALICE, 'antivirus.oversize', 'reject');
    r = cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], big);
    t.equal(r.code, 65, 'oversize=reject: a permanent failure (bounced, not retried)');
    t.equal(r.stdout, '5.3.4 Message too big for the virus scan (limit 2000 bytes)\n');
    t.equal((clamd.log().match(FOUND) ?? []).length, before, 'clamd was not asked');
    // below the limit the same user is scanned
    r = cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], infected('small'));
    t.equal(r.code, 77, 'a virus: 5.7.1, exit 77');
    t.match(r.stdout, /^5\.7\.1 Message rejected: virus found \(Eicar-Test-Signature-Local\.UNOFFICIAL\)/);
  });

  t.test("a domain forcing antivirus.enabled (--override) makes a user's false ineffective, with a warning", async (t) => {
    const inst = makeInstance(scratchDir(t), [ALICE]);
    useClamd(inst, clamd.socket);
    let r = ok(cli(inst, ['config', 'set', '--user', ALICE, 'antivirus.enabled', 'false']), 'user false');
    t.equal(r.stderr, '', 'no warning while nothing forces it');
    r = cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], infected('not scanned'));
    t.equal(r.code, 0, 'not enabled: delivered unscanned');
    ok(cli(inst, ['config', 'set', '--domain', 'example.test', 'antivirus.enabled', 'true', '--override']), 'domain forces it');
    r = ok(cli(inst, ['config', 'set', '--user', ALICE, 'antivirus.enabled', 'false']), 'user false again');
    t.equal(r.stderr, `pigeon: warning: antivirus.enabled at user ${ALICE} has no effect: domain scope forces it (override)\n`);
    const shown = JSON.parse(ok(cli(inst, ['config', 'show', ALICE, '--json', '--explain']), 'show').stdout) as Record<string, { value: unknown; from: string }>;
    t.match(shown['antivirus.enabled'], { value: true, from: 'domain', ignored: [{ from: 'user', value: false, reason: 'override' }] }, 'effective: the domain value; the user row overridden');
    r = cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], infected('scanned'));
    t.equal(r.code, 77, 'scanned and rejected despite the user (5.7.1: exit 77, a policy refusal)');
    t.match(r.stdout, /^5\.7\.1 /);
    t.equal(files(join(maildirOf(inst, ALICE), 'new')).length, 1, 'only the first, unscanned message');
  });

  t.test('Done when: EICAR through a real Postfix to two recipients, one rejects, one quarantines', async (t) => {
    const dir = scratchDir(t);
    const inst = makeInstance(dir, [ALICE, CAROL]);
    useClamd(inst, clamd.socket);
    ok(cli(inst, ['config', 'set', '--domain', 'example.test', 'antivirus.enabled', 'true']), 'enable');
    setUser(inst, ALICE, 'antivirus.action', 'reject');
    setUser(inst, CAROL, 'antivirus.action', 'quarantine');
    writeFileSync(join(inst, 'conf.d', '50-listen.yaml'), 'listen:\n  - "lmtp=127.0.0.1:0"\n  - "imap=127.0.0.1:0"\n');
    const served = await startServe(t, inst);
    const smtpPort = await freePort();
    const pf = startPostfix({
      dir,
      smtpPort,
      main: `virtual_mailbox_domains = example.test
virtual_mailbox_maps = static:ok
virtual_transport = lmtp:inet:127.0.0.1:${served.ports['lmtp'] ?? 0}`,
      master: '',
    });
    t.teardown(() => pf.stop());
    const replies = await smtpSubmit(smtpPort, 'bob@remote.test', [ALICE, CAROL], infected('eicar via postfix', `${ALICE}, ${CAROL}`));
    t.match(replies[replies.length - 2] ?? '', /^250 .*queued/, `Postfix queued it: ${replies.join(' | ')}`);
    const end = Date.now() + 90_000;
    while (!(/to=<alice@example\.test>.*status=bounced/.test(pf.log()) && /to=<carol@example\.test>.*status=sent/.test(pf.log())) && Date.now() < end) await sleep(250);
    const log = pf.log();
    t.match(log, new RegExp(`to=<alice@example\\.test>.*dsn=5\\.7\\.1.*status=bounced \\(host 127\\.0\\.0\\.1\\[127\\.0\\.0\\.1\\] said: 550 5\\.7\\.1 Message rejected: virus found \\(${EICAR_NAME.replace(/\./g, '\\.')}\\)`), 'alice: bounced by Postfix with 550 5.7.1 and the name');
    t.match(log, /to=<carol@example\.test>.*status=sent \(250 2\.0\.0 <carol@example\.test> Saved\)/, 'carol: sent');
    const carol = maildirOf(inst, CAROL);
    t.equal(files(join(carol, 'new')).length, 0, "nothing in carol's INBOX");
    // carol finds it in her Quarantine folder over IMAP, through the proxy of the same daemon
    const tr = await imapSession(served.ports['imap'] ?? 0, CAROL, 'secret', ['LIST "" "*"', 'SELECT Quarantine', 'FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT X-VIRUS-STATUS)])']);
    t.match(tr, /\* LIST \([^)]*\) "\." Quarantine\r\n/, 'the folder is listed');
    t.match(tr, /\* 1 EXISTS/);
    t.match(tr, /X-Virus-Status: Infected \(Eicar-Test-Signature-Local\.UNOFFICIAL\)/);
    t.match(tr, /Subject: eicar via postfix/);
    t.equal(files(join(maildirOf(inst, ALICE), 'new')).length, 0, 'nothing for alice');
    pf.stop();
    await served.stop();
  });
}
