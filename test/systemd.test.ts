// systemd (issue #17 item 3), without PID 1: `systemd-socket-activate` hands `pigeon serve` a
// listening socket (LISTEN_FDS, named with --fdname) that a real IMAP client logs in through;
// a datagram socket owned by the test (python3, an independent implementation) stands in for
// $NOTIFY_SOCKET and receives READY=1, RELOADING=1 … READY=1 on SIGHUP, STOPPING=1 on SIGTERM;
// `systemd-analyze verify` checks the shipped unit files.
import t from 'tap';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { accessSync, constants, copyFileSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import { ImapFlow } from 'imapflow';
import { makeInstance, freePort, CLI, ROOT } from './helpers/instance.js';
import { useBackend } from './helpers/backends.js';
import { requireProgram } from './helpers/programs.js';
import { owned, stopGroup } from './helpers/reaper.js';

const ACTIVATE = '/usr/bin/systemd-socket-activate';
const ANALYZE = '/usr/bin/systemd-analyze';
const PYTHON = '/usr/bin/python3';
const WAIT_MS = 120_000; // only stops a hang: two suites at once on 2 cores start slowly
if (![requireProgram(t, ACTIVATE, 'systemd'), requireProgram(t, ANALYZE, 'systemd'), requireProgram(t, PYTHON, 'python3')].every(Boolean)) {
  process.exit(process.env['PIGEON_TEST_ALLOW_MISSING'] === '1' ? 0 : 1);
}

const inst = makeInstance(t, { listen: ['imap=127.0.0.1:0'], users: { 'alice@example.test': 'secret' } });
if (!useBackend(t, inst, 'dovecot')) process.exit(1);
const work = join(inst.dir, '..', 'systemd');
mkdirSync(work);

/** Collects a child's output; `until` waits for a pattern (an event, with a bound against hangs). */
class Output {
  text = '';
  private waiters: (() => void)[] = [];
  constructor(child: ChildProcess) {
    for (const s of [child.stdout, child.stderr]) {
      s?.setEncoding('utf8');
      s?.on('data', (d: string) => {
        this.text += d;
        this.wake();
      });
    }
    child.once('exit', () => this.wake());
  }
  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }
  async until(re: RegExp, what: string): Promise<RegExpExecArray> {
    const deadline = Date.now() + WAIT_MS;
    for (;;) {
      const m = re.exec(this.text);
      if (m) return m;
      if (Date.now() > deadline) throw new Error(`no ${what} within ${WAIT_MS / 1000} s:\n${this.text}`);
      await new Promise<void>((res) => {
        this.waiters.push(res);
        setTimeout(res, 1000);
      });
    }
  }
}

// NOTIFY_SOCKET: a unix datagram socket; each datagram becomes one line (its newlines as |)
const notifySock = join(work, 'notify.sock');
const receiver = owned(
  spawn(PYTHON, ['-u', '-c', 'import socket,sys\ns=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM)\ns.bind(sys.argv[1])\nprint("bound")\nwhile True:\n  print(s.recv(4096).decode("utf-8","replace").replace("\\n","|"))', notifySock], {
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true,
  }),
);
t.teardown(() => stopGroup(receiver));
const notes = new Output(receiver);
await notes.until(/^bound$/m, 'notification socket');

function waitExit(child: ChildProcess): Promise<number | null> {
  return new Promise((res) => {
    if (child.exitCode !== null) res(child.exitCode);
    else child.once('exit', (code) => res(code));
  });
}

/** Knock on the socket: systemd-socket-activate starts the program at the first connection. */
function knock(port: number): Promise<void> {
  return new Promise((res) => {
    const s = connect(port, '127.0.0.1');
    s.once('connect', () => {
      s.destroy();
      res();
    });
    s.once('error', () => res());
  });
}

t.test('serve under systemd-socket-activate: the inherited socket, and READY/RELOADING/STOPPING', async (t) => {
  const port = await freePort();
  const child = owned(
    spawn(ACTIVATE, ['-l', `127.0.0.1:${port}`, '--fdname=imap', '-E', `NOTIFY_SOCKET=${notifySock}`, process.execPath, CLI, '-c', inst.dir, 'serve', '--workers', '2'], {
      stdio: ['ignore', 'pipe', 'pipe'],
      detached: true,
    }),
  );
  t.teardown(() => stopGroup(child));
  const out = new Output(child);
  await out.until(/Listening on 127\.0\.0\.1:\d+ as 3/, 'systemd-socket-activate listening');

  const c = new ImapFlow({ host: '127.0.0.1', port, secure: false, tls: { rejectUnauthorized: false }, auth: { user: 'alice@example.test', pass: 'secret' }, logger: false, connectionTimeout: WAIT_MS, greetingTimeout: WAIT_MS });
  await c.connect();
  const lock = await c.getMailboxLock('INBOX');
  t.equal(c.mailbox && c.mailbox.path, 'INBOX', 'imapflow logged in and opened INBOX through the inherited socket');
  lock.release();
  await c.logout();

  const banner = await out.until(/pigeon: ready \((\d+) listeners\)/, 'ready banner');
  t.match(out.text, new RegExp(`listening imap 127\\.0\\.0\\.1:${port} \\(inherited fd 3\\)`), 'the imap listener is the inherited fd 3');
  t.equal(banner[1], '1', "pigeon.yaml's own imap listener was not opened besides it");

  const ready = await notes.until(/^READY=1\|MAINPID=(\d+)\|STATUS=2 workers ready$/m, 'READY=1');
  t.equal(Number(ready[1]), child.pid, 'READY=1 once both workers listen, with MAINPID the activated process');

  const before = notes.text.length;
  child.kill('SIGHUP');
  const reloading = await notes.until(/^RELOADING=1\|MONOTONIC_USEC=(\d+)$/m, 'RELOADING=1');
  t.ok(Number(reloading[1]) > 0, 'SIGHUP: RELOADING=1 with MONOTONIC_USEC');
  t.ok(reloading.index >= before, 'sent after the signal');
  const reloaded = await notes.until(/^RELOADING=1\|.*\n(READY=1\|STATUS=configuration reloaded)$/m, 'READY=1 after the reload');
  t.ok(reloaded[1], 'READY=1 once every worker has reloaded');

  child.kill('SIGTERM');
  await notes.until(/^STOPPING=1$/m, 'STOPPING=1');
  t.pass('SIGTERM: STOPPING=1');
  t.equal(await waitExit(child), 0, 'and serve exits 0');
});

t.test('an inherited socket without a name is a configuration error', async (t) => {
  const port = await freePort();
  const child = owned(spawn(ACTIVATE, ['-l', `127.0.0.1:${port}`, process.execPath, CLI, '-c', inst.dir, 'serve', '--workers', '1'], { stdio: ['ignore', 'pipe', 'pipe'], detached: true }));
  t.teardown(() => stopGroup(child));
  const out = new Output(child);
  await out.until(/Listening on 127\.0\.0\.1:\d+ as 3/, 'systemd-socket-activate listening');
  await knock(port);
  t.equal(await waitExit(child), 78, 'exit 78');
  t.match(out.text, /LISTEN_FDNAMES: inherited socket fd 3 is named "": expected one of imap, imaps, pop3, pop3s, lmtp, metrics/, 'saying which fd and what names are expected');
});

t.test('systemd-analyze verify accepts the shipped units', async (t) => {
  const dir = join(ROOT, 'contrib', 'systemd');
  const units = readdirSync(dir).sort();
  t.same(units, ['pigeon-imap.socket', 'pigeon-imaps.socket', 'pigeon-lmtp.socket', 'pigeon-pop3.socket', 'pigeon-pop3s.socket', 'pigeon.service'], 'the service and a socket unit per protocol');
  for (const u of units.filter((u) => u.endsWith('.socket'))) {
    const proto = u.slice('pigeon-'.length, -'.socket'.length);
    t.match(readFileSync(join(dir, u), 'utf8'), new RegExp(`^FileDescriptorName=${proto}$`, 'm'), `${u} names its socket ${proto}`);
  }
  t.match(readFileSync(join(dir, 'pigeon.service'), 'utf8'), /^Type=notify$/m, 'pigeon.service is Type=notify');
  // verify checks that ExecStart's program exists: /usr/local/bin/pigeon where scripts/link-pigeon.sh
  // put it (as root); elsewhere a copy of the units runs this clone's CLI instead, nothing else changed
  let at = dir;
  let note = 'as shipped';
  try {
    accessSync('/usr/local/bin/pigeon', constants.X_OK);
  } catch {
    at = join(work, 'units');
    mkdirSync(at);
    for (const u of units) copyFileSync(join(dir, u), join(at, u));
    writeFileSync(join(at, 'pigeon.service'), readFileSync(join(dir, 'pigeon.service'), 'utf8').replaceAll('/usr/local/bin/pigeon', CLI));
    note = `with ExecStart=${CLI} (no /usr/local/bin/pigeon here)`;
  }
  const r = spawnSync(ANALYZE, ['verify', ...units.map((u) => join(at, u))], { encoding: 'utf8' });
  t.equal(r.status, 0, `systemd-analyze verify exits 0 ${note}`);
  t.equal(`${r.stdout}${r.stderr}`, '', 'and has nothing to say');
});
