// Where `pigeon deliver` and `pigeon lmtp` log without log.file: like the one-session IMAP/POP3
// modes, to syslog through log.syslog_socket when it exists (a python3 datagram receiver stands in
// for syslogd's /dev/log), else to log.fallback_file, which says once why. Never to stdout or
// stderr: pipe(8) reads those as the delivery status (one line, only on failure), and under
// spawn(8) or inetd they are the client's socket. Before, both logged nothing at all.
import t, { type Test } from 'tap';
import { untilText } from './helpers/wire.js';
import { spawn } from 'node:child_process';
import { writeFileSync, existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { cli, makeInstance, msg } from './helpers/delivery-env.js';
import { Dialog, dataOf } from './helpers/delivery-lmtp.js';
import { CLI, scratchDir } from './helpers/instance.js';
import { requireProgram } from './helpers/programs.js';
import { syslogStandIn } from './helpers/syslog.js';

const ALICE = 'alice@example.test';

const noLogFile = (inst: string, socket: string): void =>
  writeFileSync(join(inst, 'conf.d', '60-log.yaml'), `log:\n  file: null\n  syslog_socket: ${JSON.stringify(socket)}\n  fallback_file: fallback.log\n`);

const read = (p: string): string => (existsSync(p) ? readFileSync(p, 'latin1') : '');

/** One LMTP session with `pigeon lmtp --forker stdio` on pipes, as Postfix spawn(8) would hold the socket. */
async function lmtpSession(inst: string, rcpt: string): Promise<{ replies: string[]; stderr: string; code: number | null }> {
  const c = spawn(process.execPath, [CLI, '-c', inst, 'lmtp', '--forker', 'stdio'], { stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  c.stderr.setEncoding('latin1').on('data', (d: string) => (stderr += d));
  const closed = new Promise<number | null>((r) => c.on('close', (code) => r(code)));
  const d = new Dialog(c.stdout, c.stdin);
  const replies = [await d.line()];
  for (const cmd of ['LHLO mx.test', 'MAIL FROM:<bob@remote.test>', `RCPT TO:<${rcpt}>`, 'DATA']) replies.push(await d.cmd(cmd));
  d.send(dataOf(msg({ subject: 'over lmtp' })));
  replies.push(await d.line());
  replies.push(await d.cmd('QUIT'));
  c.stdin.end();
  return { replies, stderr, code: await closed };
}

/** A stand-in for syslogd: binds a datagram socket and appends every datagram to a file. */
async function syslogd(t: Test): Promise<{ socket: string; text: () => string } | null> {
  if (!requireProgram(t, '/usr/bin/python3', 'python3')) return null;
  const { socket, out, up } = await syslogStandIn(t);
  if (!t.ok(up, 'the syslog stand-in bound its socket')) return null;
  return { socket, text: () => read(out) };
}

t.test('no syslog socket: pigeon deliver logs to log.fallback_file; stdout/stderr carry only the status line', async (t) => {
  const inst = makeInstance(scratchDir(t));
  const missing = join(inst, 'no-syslog', 'log');
  noLogFile(inst, missing);
  const ok = cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg({ subject: 'first' }));
  t.equal(ok.code, 0);
  t.equal(ok.stdout + ok.stderr, '', 'a delivery prints nothing');
  const unknown = cli(inst, ['deliver', '-f', 'bob@remote.test', 'nobody@example.test'], msg());
  t.equal(unknown.code, 67);
  t.match(unknown.stdout, /^5\.1\.1 .*\n$/, 'a refusal prints its one status line');
  t.equal(unknown.stderr, '', 'and nothing on stderr');
  const log = read(join(inst, 'fallback.log'));
  t.match(log, `log: no syslog socket at ${missing} (ENOENT): logging to ${join(inst, 'fallback.log')} instead`, 'the file says why it is used');
  t.match(log, /deliver\(alice@example\.test\): delivered: from=bob@remote\.test/, 'the delivery is logged');
  t.match(log, /deliver\(nobody@example\.test\): rejected: status=5\.1\.1/, 'so is the refusal');
  t.equal(log.split('\n').filter((l) => l.includes('no syslog socket')).length, 1, 'the reason is said once, not once per process');
});

t.test('a syslog socket: pigeon deliver and pigeon lmtp log there, and no fallback file appears', async (t) => {
  const inst = makeInstance(scratchDir(t));
  const sys = await syslogd(t);
  if (!sys) return;
  noLogFile(inst, sys.socket);
  const r = cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg());
  t.equal(r.code, 0);
  t.equal(r.stdout + r.stderr, '');
  const s = await lmtpSession(inst, ALICE);
  t.match(s.replies, ['220 ', '250', '250', '250', '354', /^250 2\.0\.0/, '221'], 'the LMTP session delivers');
  t.equal(s.stderr, '', 'nothing on stderr (the client socket under spawn and inetd)');
  const text = await untilText(sys.text, /lmtp\(alice@example\.test\): delivered/);
  t.match(text, /^<22>.*pigeon\[\d+\]: deliver\(alice@example\.test\): delivered: from=bob@remote\.test/m, 'deliver: facility mail, tag pigeon');
  t.match(text, /pigeon\[\d+\]: lmtp\(alice@example\.test\): delivered: from=bob@remote\.test/, 'lmtp too');
  t.notOk(existsSync(join(inst, 'fallback.log')), 'no fallback file while syslog works');
});
