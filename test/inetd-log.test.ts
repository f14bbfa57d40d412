// Where `pigeon imap --forker inetd` logs without log.file, under the real openbsd-inetd: to
// syslog through log.syslog_socket when that socket exists (here a datagram socket a small
// python3 receiver binds, standing in for syslogd's /dev/log), and when it does not, to
// log.fallback_file, which says once why. Before, logger(1) dropped every line silently.
import t, { type Test } from 'tap';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { makeInstance, freePort, CLI, type Inst } from './helpers/instance.js';
import { requireProgram } from './helpers/programs.js';
import { Wire, waitPort, untilText } from './helpers/wire.js';
import { spawn } from 'node:child_process';
import { owned, stopGroup } from './helpers/reaper.js';
import { syslogStandIn } from './helpers/syslog.js';

/** inetd running `pigeon -c DIR imap --forker inetd` on a fresh port. */
async function inetd(t: Test, inst: Inst): Promise<number> {
  const port = await freePort();
  const conf = join(inst.dir, 'inetd.conf');
  writeFileSync(conf, `127.0.0.1:${port} stream tcp nowait.2000 root ${process.execPath} node ${CLI} -c ${inst.dir} imap --forker inetd\n`);
  const d = owned(spawn('/usr/sbin/inetd', ['-d', conf], { stdio: 'ignore', detached: true }));
  t.teardown(() => stopGroup(d));
  return port;
}

async function session(port: number, pass: string): Promise<string> {
  const w = await waitPort(port);
  try {
    await w.until(/\r\n/);
    w.write(`a1 LOGIN alice@example.test ${pass}\r\n`);
    const r = await w.until(/a1 .*\r\n/);
    w.write('a2 LOGOUT\r\n');
    await w.until(/a2 .*\r\n/);
    await w.waitClosed();
    return r;
  } finally {
    w.close();
  }
}

// every line of the instance's own log goes to syslog or the fallback: no log.file
const NO_LOG_FILE = (socket: string): string => `log:\n  file: null\n  syslog_socket: ${socket}\n  fallback_file: fallback.log\n`;

t.test('no syslog socket: inetd sessions log to log.fallback_file, which says why once', async (t) => {
  if (!requireProgram(t, '/usr/sbin/inetd', 'openbsd-inetd')) return;
  if (!requireProgram(t, '/usr/lib/dovecot/imap', 'dovecot-imapd')) return;
  const inst = makeInstance(t, { users: { 'alice@example.test': 'pw' } });
  const missing = join(inst.dir, 'no-syslog', 'log');
  writeFileSync(join(inst.dir, 'conf.d', '60-log.yaml'), NO_LOG_FILE(missing));
  const ct = inst.run(['config', 'test']);
  t.match(ct.stdout, `inetd, Postfix spawn and stdio sessions to ${join(inst.dir, 'fallback.log')} (log.fallback_file): no syslog socket at ${missing} (ENOENT)`, 'config test says where those lines go');
  const port = await inetd(t, inst);
  t.match(await session(port, 'pw'), /a1 OK .*Logged in/);
  t.match(await session(port, 'wrong'), /a1 NO \[AUTHENTICATIONFAILED\]/);
  const file = join(inst.dir, 'fallback.log');
  const text = await untilText(() => (existsSync(file) ? readFileSync(file, 'utf8') : ''), /Disconnected \(auth failed[\s\S]*$/);
  t.match(text, /imap-login: Login: user=<alice@example\.test>, method=PLAIN, rip=127\.0\.0\.1/, 'the login line of the first session');
  t.match(text, /imap-login: auth failed \(bad-credentials\): user=<alice@example\.test>/, 'the failure line of the second, for fail2ban');
  const notices = text.split('\n').filter((l) => l.includes('log: no syslog socket'));
  t.equal(notices.length, 1, 'the reason is said once, not once per session');
  t.match(notices[0], `log: no syslog socket at ${missing} (ENOENT): logging to ${file} instead`);
  t.notOk(existsSync(join(inst.dir, 'pigeon.log')), 'nothing in the log.file of the test helper (it is unset)');
});

t.test('a syslog socket: inetd sessions log there, and no fallback file appears', async (t) => {
  if (!requireProgram(t, '/usr/sbin/inetd', 'openbsd-inetd')) return;
  if (!requireProgram(t, '/usr/bin/python3', 'python3')) return;
  if (!requireProgram(t, '/usr/lib/dovecot/imap', 'dovecot-imapd')) return;
  const inst = makeInstance(t, { users: { 'alice@example.test': 'pw' } });
  // a stand-in for syslogd: every datagram appended to syslog.out
  const { socket, out: got, up } = await syslogStandIn(t, join(inst.dir, 'syslog.out'));
  if (!t.ok(up, 'the syslog stand-in bound its socket')) return;
  writeFileSync(join(inst.dir, 'conf.d', '60-log.yaml'), NO_LOG_FILE(socket));
  t.match(inst.run(['config', 'test']).stdout, `inetd, Postfix spawn and stdio sessions to syslog through ${socket}`);
  const port = await inetd(t, inst);
  t.match(await session(port, 'pw'), /a1 OK .*Logged in/);
  const text = await untilText(() => (existsSync(got) ? readFileSync(got, 'latin1') : ''), /imap\(alice@example\.test\): Disconnected/);
  t.match(text, /<\d+>.*pigeon\[\d+\]: imap-login: Login: user=<alice@example\.test>, method=PLAIN, rip=127\.0\.0\.1/, 'the login line reached the syslog socket, tagged pigeon');
  t.match(text, /^<22>/m, 'facility mail, priority info');
  t.notOk(existsSync(join(inst.dir, 'fallback.log')), 'no fallback file while syslog works');
});
