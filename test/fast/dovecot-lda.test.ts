// Fast tier: what dovecot-lda's answers become (src/delivery/dovecot-lda.ts statusOf), and how its
// sendmail stand-in tells a rejection (the multipart/report dovecot-lda 2.3 writes for a Sieve
// reject, as captured from Debian's dovecot-lda) from a message to pass on.
import t from 'tap';
import { statusOf, scriptPath } from '../../src/delivery/dovecot-lda.js';
import { rejectionReason } from '../../src/delivery/lda-sendmail.js';
import { exitCodeOf } from '../../src/delivery/outcome.js';
import { parseShimArg, sendmailArg } from '../../src/delivery/lda-sendmail-wire.js';

const req: { quota: number; quotaFull: 'bounce' | 'defer'; user: string } = { quota: 1000, quotaFull: 'bounce', user: 'alice@example.test' };
const out = (code: number | null, lines: string[] = [], more: Partial<{ signal: string; timedOut: boolean; reject: string }> = {}) => ({
  code,
  signal: more.signal ?? null,
  timedOut: more.timedOut ?? false,
  reject: more.reject ?? null,
  sieveFailed: null,
  lines,
});
const QUOTA = ['Dec 05 07:47:09 lda(u@d.test)<20718><E0KxB33B>: Info: msgid=<1@x>: save failed to INBOX: Quota exceeded (mailbox for user is full)', 'Quota exceeded (mailbox for user is full)'];

t.test('exit statuses of dovecot-lda → enhanced status codes → sysexits', async (t) => {
  const dsn = (o: ReturnType<typeof out>, r = req): string => statusOf(o, r, '/usr/lib/dovecot/dovecot-lda').dsn;
  t.equal(dsn(out(0)), '2.0.0');
  t.equal(dsn(out(0, [], { reject: 'not wanted' })), '5.7.1', 'a captured rejection');
  t.equal(exitCodeOf(statusOf(out(0, [], { reject: 'x' }), req, 'lda')), 77, 'pipe(8): EX_NOPERM');
  t.equal(dsn(out(75)), '4.3.0');
  t.equal(dsn(out(75, QUOTA), { ...req, quotaFull: 'defer' }), '4.2.2', 'quota_full defer: quota_full_tempfail');
  t.equal(dsn(out(77, QUOTA)), '5.2.2', 'over quota, bounce');
  t.equal(dsn(out(77, ['Error: something else'])), '4.3.0', 'any other refusal: in doubt, defer');
  t.equal(dsn(out(67)), '5.1.1');
  for (const c of [64, 78, 89]) t.equal(dsn(out(c, ['Fatal: bad setting'])), '4.3.5', `exit ${c}: configuration`);
  t.equal(dsn(out(null, [], { signal: 'SIGKILL' })), '4.3.0', 'killed');
  t.equal(dsn(out(null, [], { signal: 'SIGKILL', timedOut: true })), '4.3.0', 'time limit');
  t.match(statusOf(out(75, ['Dec 05 lda(u@d.test)<1><s>: Error: open(/x) failed: Permission denied']), req, 'lda').text, /temporary failure: Error: open\(\/x\) failed: Permission denied$/, 'the error line without its prefix');
  t.match(statusOf(out(0, [], { reject: 'line one\r\n  line two' }), req, 'lda').text, /: line one line two$/, 'a multi-line reason on one line');
});

t.test('sieve.script: absolute, or relative to the mailbox; empty is none', async (t) => {
  t.equal(scriptPath('', '/m/a'), null);
  t.equal(scriptPath('/etc/s.sieve', '/m/a'), '/etc/s.sieve');
  t.equal(scriptPath('sieve/active.sieve', '/m/a'), '/m/a/sieve/active.sieve');
});

const REJECTION = `Message-ID: <dovecot-1796456778-996990-0@vm>
Date: Sat, 05 Dec 2026 07:46:18 +0000
From: Postmaster <postmaster@d.test>
To: <s@x.test>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=disposition-notification;
\tboundary="17455/vm"
Subject: Rejected: nope
Auto-Submitted: auto-replied (rejected)
Precedence: bulk

This is a MIME-encapsulated message

--17455/vm
Content-Type: text/plain; charset=utf-8
Content-Disposition: inline
Content-Transfer-Encoding: 8bit

go away, s'il vous plaît
--17455/vm
Content-Type: message/disposition-notification

Reporting-UA: vm; Dovecot Mail Delivery Agent
Final-Recipient: rfc822; u@d.test
Disposition: automatic-action/MDN-sent-automatically; deleted

--17455/vm--
`;

t.test("the sendmail stand-in: a rejection is handed back, anything else is not one", async (t) => {
  t.equal(rejectionReason(REJECTION, '<>'), "go away, s'il vous plaît");
  t.equal(rejectionReason(REJECTION.replace(/\n/g, '\r\n'), '<>'), "go away, s'il vous plaît", 'CRLF');
  t.equal(rejectionReason(REJECTION, 'bob@remote.test'), null, 'not from the null sender: passed on');
  t.equal(rejectionReason(REJECTION.replace('auto-replied (rejected)', 'auto-replied'), '<>'), null, 'a vacation reply: passed on');
  t.equal(rejectionReason('From: a@b\nSubject: redirected\n\nbody\n', '<>'), null);
  const arg = sendmailArg('/usr/bin/node', '/opt/p/lda-sendmail.js', { sendmail: '/usr/sbin/send mail', mailConfig: '/etc/postfix' }).split(' ');
  t.equal(arg.length, 3, 'one word per part: dovecot-lda splits sendmail_path at spaces');
  t.same(parseShimArg(arg[2] ?? ''), { sendmail: '/usr/sbin/send mail', mailConfig: '/etc/postfix' });
  t.throws(() => sendmailArg('/opt/my node/node', '/x.js', { sendmail: 's', mailConfig: null }), /white space/);
});
