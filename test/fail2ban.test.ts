// contrib/fail2ban against the lines the product really writes: failed IMAP and POP3 logins
// (LOGIN, USER/PASS, AUTHENTICATE/AUTH PLAIN and LOGIN, unknown users, user names with `>` and
// control characters, plaintext refused) through the real openbsd-inetd, once with log.file
// (the file form) and once through syslog (logger(1) to a socket this test owns; the records
// then written as syslogd writes them to mail.log). Debian's fail2ban-regex reads both with the
// shipped filter: every failure line must match, with the client's real address, and no
// success line may.
import t, { type Test } from 'tap';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import { createServer } from 'node:net';
import { makeInstance, freePort, CLI, ROOT, type Inst } from './helpers/instance.js';
import { requireProgram } from './helpers/programs.js';
import { Wire, waitPort, untilText } from './helpers/wire.js';
import { owned, stopGroup } from './helpers/reaper.js';

const FILTER = join(ROOT, 'contrib', 'fail2ban', 'filter.d', 'pigeon.conf');
const JAIL = join(ROOT, 'contrib', 'fail2ban', 'jail.d', 'pigeon.conf');
const b64 = (s: string): string => Buffer.from(s, 'latin1').toString('base64');

/** inetd running `pigeon -c DIR PROTO --forker inetd` on a fresh port. */
async function inetd(t: Test, inst: Inst, proto: 'imap' | 'pop3'): Promise<number> {
  const port = await freePort();
  const conf = join(inst.dir, `inetd-${proto}.conf`);
  writeFileSync(conf, `127.0.0.1:${port} stream tcp nowait.2000 root ${process.execPath} node ${CLI} -c ${inst.dir} ${proto} --forker inetd\n`);
  const d = owned(spawn('/usr/sbin/inetd', ['-d', conf], { stdio: 'ignore', detached: true }));
  t.teardown(() => stopGroup(d));
  return port;
}

/** Send one command and wait for the reply that ends it. */
async function say(w: Wire, line: string, end: RegExp): Promise<string> {
  w.write(`${line}\r\n`);
  return w.until(end);
}

async function imapSessions(t: Test, port: number): Promise<void> {
  // LOGIN with a wrong password, AUTHENTICATE PLAIN with one: two failures, then LOGOUT
  let w = await waitPort(port);
  await w.until(/\r\n/);
  t.match(await say(w, 'a1 LOGIN alice@example.test wrong', /a1 .*\r\n/), /a1 NO \[AUTHENTICATIONFAILED\]/);
  t.match(await say(w, `a2 AUTHENTICATE PLAIN ${b64('\0alice@example.test\0wrong')}`, /a2 .*\r\n/), /a2 NO \[AUTHENTICATIONFAILED\]/);
  await say(w, 'a3 LOGOUT', /a3 .*\r\n/);
  await w.waitClosed();
  w.close();
  // AUTHENTICATE LOGIN for an unknown user; LOGIN with a name that carries `>` and fields
  w = await waitPort(port);
  await w.until(/\r\n/);
  await say(w, 'b1 AUTHENTICATE LOGIN', /\+ .*\r\n/);
  await say(w, b64('nobody@example.test'), /\+ .*\r\n/);
  t.match(await say(w, b64('x'), /b1 .*\r\n/), /b1 NO \[AUTHENTICATIONFAILED\]/);
  t.match(await say(w, 'b2 LOGIN "evil>, method=PLAIN, rip=6.6.6.6" pw', /b2 .*\r\n/), /b2 NO \[AUTHENTICATIONFAILED\]/, 'a name with > is refused as a failed login');
  await say(w, 'b3 LOGOUT', /b3 .*\r\n/);
  await w.waitClosed();
  w.close();
  // AUTHENTICATE PLAIN with a control character in the name
  w = await waitPort(port);
  await w.until(/\r\n/);
  t.match(await say(w, `c1 AUTHENTICATE PLAIN ${b64('\0al\x01<ice>@example.test\0pw')}`, /c1 .*\r\n/), /c1 NO \[AUTHENTICATIONFAILED\]/, 'a control character and <> in a SASL name: refused');
  await say(w, 'c2 LOGOUT', /c2 .*\r\n/);
  await w.waitClosed();
  w.close();
  // a good login: its lines must not match
  w = await waitPort(port);
  await w.until(/\r\n/);
  t.match(await say(w, 'd1 LOGIN alice@example.test pw', /d1 .*\r\n/), /d1 OK/);
  await say(w, 'd2 LOGOUT', /d2 .*\r\n/);
  await w.waitClosed();
  w.close();
}

async function pop3Sessions(t: Test, port: number): Promise<void> {
  let w = await waitPort(port);
  await w.until(/\r\n/);
  await say(w, 'USER alice@example.test', /\r\n/);
  t.match(await say(w, 'PASS wrong', /\r\n/), /^-ERR \[AUTH\]/);
  t.match(await say(w, `AUTH PLAIN ${b64('\0alice@example.test\0wrong')}`, /\r\n/), /^-ERR \[AUTH\]/);
  await say(w, 'QUIT', /\r\n/);
  await w.waitClosed();
  w.close();
  w = await waitPort(port);
  await w.until(/\r\n/);
  await say(w, 'AUTH LOGIN', /\+ .*\r\n/);
  await say(w, b64('x>y@example.test, rip=6.6.6.6'), /\+ .*\r\n/);
  t.match(await say(w, b64('pw'), /\r\n/), /^-ERR \[AUTH\]/, 'POP3: a name with > is refused');
  await say(w, 'USER nobody@example.test', /\r\n/);
  t.match(await say(w, 'PASS x', /\r\n/), /^-ERR \[AUTH\]/);
  await say(w, 'QUIT', /\r\n/);
  await w.waitClosed();
  w.close();
  w = await waitPort(port);
  await w.until(/\r\n/);
  await say(w, 'USER alice@example.test', /\r\n/);
  t.match(await say(w, 'PASS pw', /\r\n/), /^\+OK/);
  await say(w, 'QUIT', /\r\n/);
  await w.waitClosed();
  w.close();
}

/** With login.plaintext never, from loopback: refused before any credentials, in both protocols. */
async function plaintextRefused(t: Test, inst: Inst, imap: number, pop3: number): Promise<void> {
  t.equal(inst.run(['config', 'set', '--global', 'login.plaintext', 'never']).status, 0);
  let w = await waitPort(imap);
  await w.until(/\r\n/);
  t.match(await say(w, 'p1 LOGIN alice@example.test pw', /p1 .*\r\n/), /p1 NO \[PRIVACYREQUIRED\]/);
  t.match(await say(w, 'p2 AUTHENTICATE PLAIN', /p2 .*\r\n/), /p2 NO \[PRIVACYREQUIRED\]/);
  await say(w, 'p3 LOGOUT', /p3 .*\r\n/);
  await w.waitClosed();
  w.close();
  w = await waitPort(pop3);
  await w.until(/\r\n/);
  t.match(await say(w, 'USER alice@example.test', /\r\n/), /^-ERR \[AUTH\] Plaintext/);
  await say(w, 'QUIT', /\r\n/);
  await w.waitClosed();
  w.close();
  t.equal(inst.run(['config', 'unset', '--global', 'login.plaintext']).status, 0);
}

/** Lines the product wrote that are login failures (what fail2ban must count). */
const FAILURE = /(?:imap|pop3)-login: (?:auth failed \(|Disconnected \(auth failed, |Aborted login \(tried to use disallowed plaintext auth\))/;
const SUCCESS = /(?:imap|pop3)-login: Login: /;
// per phase: 9 refused attempts (5 IMAP, 4 POP3), 5 connection summaries, 3 plaintext refusals
const EXPECTED_FAILURES = 9 + 5 + 3;

/** Run fail2ban-regex with the shipped filter; returns the matched rows (ip, user, line). */
function fail2banRegex(t: Test, dir: string, log: string): { ip: string; user: string; line: string }[] {
  // the filter includes Debian's common.conf, found beside it
  mkdirSync(join(dir, 'filter.d'), { recursive: true });
  copyFileSync('/etc/fail2ban/filter.d/common.conf', join(dir, 'filter.d', 'common.conf'));
  copyFileSync(FILTER, join(dir, 'filter.d', 'pigeon.conf'));
  const r = spawnSync('/usr/bin/fail2ban-regex', ['-o', '<ip>|<F-USER>|<msg>', log, join(dir, 'filter.d', 'pigeon.conf')], { encoding: 'utf8', timeout: 60_000 });
  t.equal(r.status, 0, `fail2ban-regex ran (${r.stderr})`);
  return r.stdout
    .split('\n')
    .filter((l) => l.includes('|'))
    .map((l) => {
      const [ip = '', user = '', ...rest] = l.split('|');
      return { ip, user, line: rest.join('|') };
    });
}

function checkMatches(t: Test, dir: string, log: string, form: string): void {
  const lines = readFileSync(log, 'utf8').split('\n').filter((l) => l !== '');
  const failures = lines.filter((l) => FAILURE.test(l));
  t.equal(failures.length, EXPECTED_FAILURES, `${form}: the product wrote every failure line (${failures.length})`);
  t.ok(lines.filter((l) => SUCCESS.test(l)).length >= 2, `${form}: and the success lines (IMAP and POP3)`);
  const rows = fail2banRegex(t, dir, log);
  t.same(
    rows.map((r) => r.line).sort(),
    [...failures].sort(),
    `${form}: fail2ban-regex matched every failure line and nothing else`,
  );
  t.same([...new Set(rows.map((r) => r.ip))], ['127.0.0.1'], `${form}: always the client's real address, never one a user name carries`);
  const sanitised = rows.filter((r) => r.user.startsWith('evil'));
  t.equal(sanitised.length, 2, `${form}: the name with > is logged (refused attempt and its connection's summary)`);
  t.equal(sanitised[0]?.user, 'evil?, method=PLAIN, rip=6.6.6.6', `${form}: with < and > replaced, inside user=<…>`);
  t.ok(rows.some((r) => r.user === 'al??ice?@example.test'), `${form}: a control character is replaced too`);
  t.notOk(lines.some((l) => /user=<[^>]*<|rip=6\.6\.6\.6,/.test(l)), `${form}: no line carries a raw < or > inside user=<…>`);
}

t.test('fail2ban-regex with contrib/fail2ban matches every failure line, in the log-file and the syslog form', async (t) => {
  if (!requireProgram(t, '/usr/bin/fail2ban-regex', 'fail2ban')) return;
  if (!requireProgram(t, '/usr/sbin/inetd', 'openbsd-inetd')) return;
  if (!requireProgram(t, '/usr/bin/logger', 'bsdutils')) return;
  if (!requireProgram(t, '/usr/lib/dovecot/imap', 'dovecot-imapd')) return;
  if (!requireProgram(t, '/usr/lib/dovecot/pop3', 'dovecot-pop3d')) return;
  // a short delay that does not grow: this test makes 24 failed logins from one address
  const inst = makeInstance(t, { users: { 'alice@example.test': 'pw' }, conf: '  auth_failure_delay_max_ms: 50\n' });
  const imap = await inetd(t, inst, 'imap');
  const pop3 = await inetd(t, inst, 'pop3');

  // the file form: log.file (makeInstance sets pigeon.log)
  const file = join(inst.dir, 'pigeon.log');
  await imapSessions(t, imap);
  await pop3Sessions(t, pop3);
  await plaintextRefused(t, inst, imap, pop3);
  const fileFailures = (): number => (existsSync(file) ? readFileSync(file, 'utf8').split('\n').filter((l) => FAILURE.test(l)).length : 0);
  await untilText(() => String(fileFailures()), new RegExp(`^${EXPECTED_FAILURES}$`));
  checkMatches(t, join(inst.dir, 'f2b-file'), file, 'log.file');

  // the syslog form: no log.file; logger(1) writes to a socket this test owns (unix paths are short)
  const sdir = mkdtempSync(join(tmpdir(), 'pigeon-f2b-'));
  t.teardown(() => rmSync(sdir, { recursive: true, force: true }));
  const socket = join(sdir, 'log');
  let records = '';
  const syslogd = createServer((c) => {
    c.setEncoding('latin1');
    c.on('data', (d: string) => (records += d));
    c.on('error', () => {});
  });
  await new Promise<void>((res) => syslogd.listen(socket, res));
  t.teardown(() => new Promise<void>((res) => syslogd.close(() => res())));
  writeFileSync(join(inst.dir, 'conf.d', '60-log.yaml'), `log:\n  file: null\n  syslog_socket: ${socket}\n  fallback_file: fallback.log\n`);
  await imapSessions(t, imap);
  await pop3Sessions(t, pop3);
  await plaintextRefused(t, inst, imap, pop3);
  const count = (): number => records.split('\n').filter((l) => FAILURE.test(l)).length;
  await untilText(() => String(count()), new RegExp(`^${EXPECTED_FAILURES}$`));
  t.notOk(existsSync(join(inst.dir, 'fallback.log')), 'syslog took the lines: no fallback file');
  const recs = records.split('\n').filter((l) => l !== '');
  t.ok(recs.every((l) => /^<\d+>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d pigeon\[\d+\]: /.test(l)), 'every record: <PRI>, timestamp, pigeon[pid]');
  t.ok(recs.filter((l) => FAILURE.test(l)).every((l) => l.startsWith('<22>')), 'failure lines are mail.info');
  // what syslogd writes to /var/log/mail.log: the priority dropped, the host name added
  const maillog = join(inst.dir, 'mail.log');
  writeFileSync(maillog, recs.map((l) => l.replace(/^<\d+>(\S+ +\S+ \S+) /, '$1 mx1 ')).join('\n') + '\n');
  checkMatches(t, join(inst.dir, 'f2b-syslog'), maillog, 'syslog');
});

t.test('the jail names the shipped filter and fail2ban accepts the configuration', async (t) => {
  if (!requireProgram(t, '/usr/bin/fail2ban-client', 'fail2ban')) return;
  const dir = t.testdir({});
  // a copy of Debian's configuration with our filter and jail added; the log file must exist
  const conf = join(dir, 'fail2ban');
  spawnSync('cp', ['-r', '/etc/fail2ban', conf]);
  copyFileSync(FILTER, join(conf, 'filter.d', 'pigeon.conf'));
  const log = join(dir, 'mail.log');
  writeFileSync(log, '');
  writeFileSync(join(conf, 'jail.local'), '[DEFAULT]\nbackend = auto\n[sshd]\nenabled = false\n');
  writeFileSync(join(conf, 'jail.d', 'pigeon.conf'), readFileSync(JAIL, 'utf8').replace(/^logpath\s*=.*$/m, `logpath  = ${log}`));
  for (const f of ['defaults-debian.conf']) rmSync(join(conf, 'jail.d', f), { force: true });
  const r = spawnSync('/usr/bin/fail2ban-client', ['-c', conf, '-d'], { encoding: 'utf8', timeout: 60_000 });
  t.equal(r.status, 0, `fail2ban-client -d parsed the jail (${r.stderr.slice(0, 2000)})`);
  t.match(r.stdout, /\['add', 'pigeon', 'auto'\]/, 'the pigeon jail is added');
  t.match(r.stdout, new RegExp(`\\['set', 'pigeon', 'addlogpath', '${log.replace(/[/.]/g, '\\$&')}'`), 'reading the configured log');
  t.match(r.stdout, /'pigeon', 'addfailregex', \['\^auth failed/, 'with the pigeon filter');
});
