// The module pipeline: forward (keep or not, failure defers with nothing stored), vacation
// (RFC 3834 rules, once per sender per interval), modules enabled by the configuration layer
// (user / domain / override / ignore). sendmail here is a recording script; the real Postfix
// sendmail is exercised in postfix.test.ts.
import t from 'tap';
import { existsSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { cli, makeInstance, setUser, maildirOf, files, msg, MAIL_UID } from './helpers/delivery-env.js';
import { recorder, withSendmail } from './helpers/sendmail.js';
import { scratchDir } from './helpers/instance.js';

// tap's per-file timeout for this file: it ran 79 s alone on a lightly loaded machine, and two
// suites at once on 2 cores make a file take 2-3 times as long (the default is 180 s, .taprc)
t.setTimeout(420_000);

const ALICE = 'alice@example.test';

t.test('forward: keep a copy or not, through sendmail, loop-safe', async (t) => {
  const dir = scratchDir(t);
  const inst = makeInstance(dir);
  const sm = recorder(dir);
  withSendmail(inst, sm.script);
  setUser(inst, ALICE, 'forward.enabled', 'true');
  setUser(inst, ALICE, 'forward.to', 'carol@elsewhere.test, alice@example.test, not-an-address');
  let r = cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg({ subject: 'fwd keep' }));
  t.equal(r.code, 0, r.stdout);
  t.equal(files(join(maildirOf(inst, ALICE), 'new')).length, 1, 'kept a copy');
  let calls = sm.calls();
  t.equal(calls.length, 1);
  t.same(calls[0]?.args, ['-i', '-f', 'bob@remote.test', '--', 'carol@elsewhere.test'], 'original sender, self and invalid targets dropped');
  t.match(calls[0]?.input ?? '', /^Delivered-To: alice@example\.test\nFrom: bob@remote\.test\n/, 'forwarded copy carries Delivered-To (loop detection downstream)');
  t.notMatch(calls[0]?.input ?? '', /Return-Path/);

  setUser(inst, ALICE, 'forward.keep', 'false');
  r = cli(inst, ['deliver', '-f', '', ALICE], msg({ subject: 'fwd only' }));
  t.equal(r.code, 0, r.stdout);
  t.equal(files(join(maildirOf(inst, ALICE), 'new')).length, 1, 'keep=false: not stored');
  calls = sm.calls();
  t.same(calls[1]?.args, ['-i', '-f', '<>', '--', 'carol@elsewhere.test'], 'null sender stays null');

  // the forwarded copy coming back is a loop
  r = cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], calls[0]?.input ?? '');
  t.equal(r.code, 65);
  t.match(r.stdout, /^5\.4\.6 /);

  // sendmail failing: the recipient defers, nothing is stored
  setUser(inst, ALICE, 'forward.keep', 'true');
  sm.failWith(1);
  r = cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg({ subject: 'fwd fails' }));
  t.equal(r.code, 75, r.stdout);
  t.match(r.stdout, /^4\.3\.0 .*sendmail.*exit 1/);
  t.equal(files(join(maildirOf(inst, ALICE), 'new')).length, 1, 'nothing stored when the forward failed');
  t.equal(files(join(maildirOf(inst, ALICE), 'tmp')).length, 0, 'prepared tmp file aborted');
  withSendmail(inst, join(dir, 'no-such-sendmail'));
  r = cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg());
  t.equal(r.code, 75);
  t.match(r.stdout, /^4\.3\.0 cannot run .*ENOENT/);
});

t.test('nothing enabled → defer, never drop', async (t) => {
  const inst = makeInstance(scratchDir(t));
  setUser(inst, ALICE, 'mailstore.enabled', 'false');
  const r = cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg());
  t.equal(r.code, 75);
  t.match(r.stdout, /^4\.3\.5 /);
});

t.test('vacation: RFC 3834 rules, once per sender per interval, reply through sendmail', async (t) => {
  const dir = scratchDir(t);
  const inst = makeInstance(dir);
  const sm = recorder(dir);
  withSendmail(inst, sm.script);
  setUser(inst, ALICE, 'vacation.enabled', 'true');
  setUser(inst, ALICE, 'vacation.subject', 'Away (été)');
  setUser(inst, ALICE, 'vacation.body', 'Back on Monday.');
  const send = (from: string, extra: { headers?: string; to?: string } = {}): void => {
    const r = cli(inst, ['deliver', '-f', from, ALICE], msg({ from, ...extra }));
    t.equal(r.code, 0, r.stdout);
  };
  send('bob@remote.test');
  let calls = sm.calls();
  t.equal(calls.length, 1, 'first message: one reply');
  t.same(calls[0]?.args, ['-i', '-f', '<>', '--', 'bob@remote.test'], 'null envelope sender');
  const reply = calls[0]?.input ?? '';
  t.match(reply, /^From: <alice@example\.test>\nTo: <bob@remote\.test>\nSubject: =\?UTF-8\?B\?/);
  t.match(reply, /\nAuto-Submitted: auto-replied\n/);
  t.match(reply, /\nIn-Reply-To: <[^>]+@remote\.test>\n/);
  t.match(reply, /\n\nBack on Monday\.\n$/);
  send('bob@remote.test');
  t.equal(sm.calls().length, 1, 'same sender within the interval: no second reply');
  send('dave@remote.test');
  t.equal(sm.calls().length, 2, 'another sender: replied');
  const silent: [string, { headers?: string; to?: string }, string][] = [
    ['eve@remote.test', { headers: 'List-Id: <l.remote.test>\n' }, 'list'],
    ['eve@remote.test', { headers: 'Auto-Submitted: auto-generated\n' }, 'auto-submitted'],
    ['eve@remote.test', { headers: 'Precedence: bulk\n' }, 'bulk'],
    ['eve@remote.test', { to: 'someone-else@example.test' }, 'not addressed to the user'],
    ['owner-list@remote.test', {}, 'list owner'],
    ['MAILER-DAEMON@remote.test', {}, 'mailer-daemon'],
  ];
  for (const [from, extra, why] of silent) {
    send(from, extra);
    t.equal(sm.calls().length, 2, `no reply: ${why}`);
  }
  const r = cli(inst, ['deliver', '-f', '', ALICE], msg({ from: 'MAILER-DAEMON@remote.test' }));
  t.equal(r.code, 0);
  t.equal(sm.calls().length, 2, 'no reply to the null sender');
  send('eve@remote.test', { headers: 'Auto-Submitted: no\n' });
  t.equal(sm.calls().length, 3, 'Auto-Submitted: no is a person');
  // a failing sendmail for the reply does not defer an already stored message
  sm.failWith(75);
  send('frank@remote.test');
  calls = sm.calls();
  t.equal(files(join(maildirOf(inst, ALICE), 'new')).length, 12, 'every message stored');
  const state = join(inst, 'mail', '.pigeon-vacation', 'example.test', 'alice');
  t.ok(existsSync(state), 'state kept under the mail root');
  t.equal(statSync(state).uid, MAIL_UID, 'owned by the mail user (pipe deliveries run as it)');
});

t.test('modules follow the configuration layer: domain override and ignore', async (t) => {
  const dir = scratchDir(t);
  const inst = makeInstance(dir);
  const sm = recorder(dir);
  withSendmail(inst, sm.script);
  setUser(inst, ALICE, 'vacation.enabled', 'true');
  // the domain admin ignores every user vacation setting
  t.equal(cli(inst, ['config', 'set', '--domain', 'example.test', 'vacation.*', '--ignore']).code, 0);
  t.equal(cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg()).code, 0);
  t.equal(sm.calls().length, 0, 'vacation ignored for the domain');
  // the domain forces a quota over the user's own
  setUser(inst, ALICE, 'mailstore.quota', '0');
  t.equal(cli(inst, ['config', 'set', '--domain', 'example.test', 'mailstore.quota', '100', '--override']).code, 0);
  const r = cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg({ body: 'q'.repeat(500) }));
  t.equal(r.code, 73, r.stdout);
  t.match(r.stdout, /^5\.2\.2 /);
});
