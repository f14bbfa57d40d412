// Syslog with real priorities: every line goes to facility mail with its own level (error → err,
// warn → warning, info → info, debug → debug) through the real logger(1) to a socket this test
// owns (standing in for syslogd's /dev/log); and `pigeon deliver` and `pigeon lmtp`, with no
// log.file (the default), log there.
import t, { type Test } from 'tap';
import { mkdtempSync, rmSync, writeFileSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createServer, type Socket } from 'node:net';
import { spawn } from 'node:child_process';
import { createLogger, syslogSink } from '../src/log.js';
import { cli, makeInstance, msg } from './helpers/delivery-env.js';
import { scratchDir } from './helpers/instance.js';
import { requireProgram } from './helpers/programs.js';

/** A unix socket that collects what logger(1) sends (it falls back to a stream socket). */
async function syslogd(t: Test): Promise<{ socket: string; records: () => string[] }> {
  const dir = mkdtempSync(join(tmpdir(), 'pigeon-syslog-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const socket = join(dir, 'log');
  let text = '';
  const conns = new Set<Socket>();
  const server = createServer((c) => {
    conns.add(c);
    c.setEncoding('latin1');
    c.on('data', (d: string) => (text += d));
    c.on('error', () => {});
  });
  await new Promise<void>((res) => server.listen(socket, res));
  // a logger(1) of this process stays connected until its stdin closes: cut it
  t.teardown(() => new Promise<void>((res) => {
    server.close(() => res());
    for (const c of conns) c.destroy();
  }));
  return { socket, records: () => text.split('\n').filter((l) => l !== '') };
}

/** Wait until `n` records arrived (each is one line logger(1) sent). */
async function records(get: () => string[], n: number, ms = 60_000): Promise<string[]> {
  const deadline = Date.now() + ms;
  while (get().length < n && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  return get();
}

t.test('each line carries its own priority, facility mail', async (t) => {
  if (!requireProgram(t, '/usr/bin/logger', 'bsdutils')) return;
  const d = await syslogd(t);
  const sink = syslogSink(d.socket);
  if (!sink) {
    t.fail('syslog is available through the test socket');
    return;
  }
  const log = createLogger({ level: 'debug', sink });
  log.log('error', 'imap-login', 'Temporary authentication failure: database down:', { rip: '192.0.2.1' });
  log.log('warn', 'deliver', 'vacation: reply not sent');
  log.log('info', 'imap-login', 'Login:', { user: 'alice@example.test', rip: '192.0.2.1' });
  log.log('debug', 'anvil', 'a detail');
  const got = await records(d.records, 4);
  t.equal(got.length, 4, 'four records');
  // PRI = facility mail (2) * 8 + severity
  t.match(got[0], /^<19>\w{3} [ \d]\d [\d:]{8} pigeon\[\d+\]: imap-login: Error: Temporary authentication failure/, 'error → mail.err (19)');
  t.match(got[1], /^<20>.* pigeon\[\d+\]: deliver: Warning: vacation: reply not sent$/, 'warn → mail.warning (20)');
  t.match(got[2], /^<22>.* pigeon\[\d+\]: imap-login: Login: user=<alice@example\.test>, rip=192\.0\.2\.1$/, 'info → mail.info (22)');
  t.match(got[3], /^<23>.* pigeon\[\d+\]: anvil: Debug: a detail$/, 'debug → mail.debug (23)');
});

t.test('pigeon deliver and pigeon lmtp log to syslog by default', async (t) => {
  if (!requireProgram(t, '/usr/bin/logger', 'bsdutils')) return;
  const d = await syslogd(t);
  const inst = makeInstance(scratchDir(t));
  // only the socket changes: log.file stays at its default (none)
  writeFileSync(join(inst, 'conf.d', '60-syslog.yaml'), `log:\n  syslog_socket: ${d.socket}\n`);
  const r = cli(inst, ['deliver', '-f', 'bob@remote.test', '--', 'alice@example.test'], msg({ subject: 'via syslog' }));
  t.equal(r.code, 0, r.stdout + r.stderr);
  t.equal(r.stdout + r.stderr, '', 'nothing on stdout or stderr (pipe(8) reads both)');
  let got = await records(d.records, 1);
  t.match(got.join('\n'), /^<22>.* pigeon\[\d+\]: deliver\(alice@example\.test\): delivered: .*from=bob@remote\.test/m, 'deliver: the delivery line, mail.info');
  // one LMTP session on stdin/stdout (Postfix spawn, swaks --pipe): each command after its reply
  const l = spawn(process.execPath, [join(import.meta.dirname, '..', 'dist', 'src', 'cli.js'), '-c', inst, 'lmtp'], { stdio: ['pipe', 'pipe', 'inherit'] });
  let said = '';
  l.stdout.setEncoding('latin1');
  // first listener: the text is complete before any wait below looks at it
  l.stdout.on('data', (s: string) => (said += s));
  /** wait for the n-th final reply line ("250 …", not "250-…") */
  const replies = (n: number): Promise<void> =>
    new Promise((res) => {
      const check = (): void => {
        if ((said.match(/^\d{3} [^\n]*\n/gm) ?? []).length < n && l.exitCode === null) return;
        l.stdout.off('data', check);
        l.off('exit', check);
        res();
      };
      l.stdout.on('data', check);
      l.on('exit', check);
      check();
    });
  await replies(1);
  const cmds = ['LHLO test', 'MAIL FROM:<bob@remote.test>', 'RCPT TO:<nobody@example.test>', 'QUIT'];
  for (const [i, cmd] of cmds.entries()) {
    l.stdin.write(`${cmd}\r\n`);
    await replies(i + 2);
  }
  t.match(said, /550 5\.1\.1/, 'lmtp refused the unknown recipient');
  got = await records(d.records, 2);
  t.match(got.join('\n'), /^<22>.* pigeon\[\d+\]: lmtp\(nobody@example\.test\): rejected: status=5\.1\.1/m, 'lmtp: its line in syslog too');
  t.notOk(existsSync(join(inst, 'pigeon.log')), 'no fallback file while syslog works');
});
