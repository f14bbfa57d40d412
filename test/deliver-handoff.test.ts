// `pigeon deliver` hands its message to a running `pigeon serve` of the same instance
// (src/delivery/handoff-client.ts, handoff-server.ts): through a real Postfix pipe(8) with the
// exit codes Postfix acts on; back to in-process delivery when serve stops or is killed (stale
// runtime file and socket); only root and the mail user's group may connect to the socket; a
// serve killed in the middle of a message → 75 and no copy, the retry delivers exactly one.
// Which process delivered is read from pigeon.log: every line carries the writer's pid.
import t, { type Test } from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import { chmodSync, chownSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { CLI, ROOT, cli, ok, need, makeInstance, setUser, maildirOf, files, msg, startServe, waitFor, MAIL_UID, MAIL_GID } from './helpers/delivery-env.js';
import { startPostfix, freePort, smtpSubmit } from './helpers/delivery-postfix.js';
import { scratchDir } from './helpers/instance.js';
import { loadRecorder, recordDir } from './helpers/load-recorder.js';

const NOBODY = 65534;
/** The `pigeon` command (package.json bin, scripts/link-pigeon.sh): what pipe(8) runs */
const PIGEON = join(ROOT, 'dist', 'src', 'cli.cjs');
const PATH = `PATH=${process.env['PATH'] ?? '/usr/bin:/bin'}`;
/**
 * A command as another user, with pipe(8)'s small environment: setpriv, then env -i (the test
 * runner adds NODE_OPTIONS hooks to every process it spawns, which write where that user may not).
 */
const as = (uid: number, gid: number, cmd: readonly string[]): string[] => [`--reuid=${uid}`, `--regid=${gid}`, '--clear-groups', 'env', '-i', PATH, ...cmd];


/**
 * An instance as pipe(8) user=mail needs it (README): everything the mail user writes is its;
 * run_dir short (a unix socket path has at most 107 bytes) and reachable by the mail user;
 * debug log in pigeon.log, writable by both serve (root) and deliver (mail).
 */
function handoffInstance(t: Test, users: readonly string[], runMode: number): { dir: string; inst: string; run: string; log: () => string } {
  need('/usr/bin/setpriv', 'util-linux');
  const dir = scratchDir(t);
  const inst = makeInstance(dir, []);
  const domains = new Set(users.map((u) => u.slice(u.indexOf('@') + 1)));
  for (const d of domains) if (d !== 'example.test') ok(cli(inst, ['domain', 'add', d]), d);
  for (const u of users) ok(cli(inst, ['user', 'add', u, '--password-stdin'], 'pw\n'), u);
  const run = mkdtempSync('/tmp/pdh-');
  t.teardown(() => rmSync(run, { recursive: true, force: true }));
  chownSync(run, 0, MAIL_GID);
  chmodSync(run, runMode);
  mkdirSync(join(inst, 'conf.d'), { recursive: true });
  writeFileSync(join(inst, 'conf.d', '50-handoff.yaml'), `run_dir: ${run}\nlog:\n  level: debug\n  file: pigeon.log\n`);
  writeFileSync(join(inst, 'pigeon.log'), '');
  spawnSync('chown', ['-R', 'mail:mail', inst]);
  return { dir, inst, run, log: () => readFileSync(join(inst, 'pigeon.log'), 'utf8') };
}

/** Whether a `pigeon -c INST deliver` (pipe(8)'s command) is still running. */
function deliverRunning(inst: string): boolean {
  const mark = `${PIGEON}\0-c\0${inst}\0deliver\0`;
  for (const p of readdirSync('/proc')) {
    if (!/^\d+$/.test(p)) continue;
    try {
      if (readFileSync(`/proc/${p}/cmdline`, 'latin1').includes(mark)) return true;
    } catch {
      /* gone meanwhile */
    }
  }
  return false;
}

/** The pid of the serve that logged `pigeon started` (it logs it just after it said ready). */
async function servePid(log: () => string): Promise<number> {
  const started = /pigeon\[(\d+)\]: master: pigeon started/;
  await waitFor('serve\'s start line in pigeon.log', () => started.test(log()));
  return Number(started.exec(log())?.[1]);
}

/** An instance for alice with its serve running (hand-off on): the instance, serve's pid, its log. */
async function servedHandoff(t: Test): Promise<{ inst: string; pid: number; log: () => string }> {
  const h = handoffInstance(t, ['alice@example.test'], 0o750);
  await startServe(t, h.inst);
  return { inst: h.inst, pid: await servePid(h.log), log: h.log };
}

/** A record directory with one file `name` the mail user may write (helpers/load-recorder.ts). */
function recordFile(t: Test, name: string): { rec: string; loaded: string } {
  const { rec, files } = recordDir(t, [name], MAIL_UID, MAIL_GID);
  return { rec, loaded: files[0] ?? '' };
}

/**
 * One `deliver` as the mail user, `node NODE_ARGS… FILE -c INST deliver …` (a recorder among the
 * node arguments), into serve's alice; asserts it was handed off and delivered once.
 */
function deliverOnce(t: Test, h: { inst: string; pid: number; log: () => string }, nodeArgs: readonly string[], file: string, subject: string): void {
  const r = spawnSync('setpriv', as(MAIL_UID, MAIL_GID, [process.execPath, ...nodeArgs, file, '-c', h.inst, 'deliver', '-f', 'bob@remote.test', '--', 'alice@example.test']), {
    input: msg({ subject }),
    encoding: 'utf8',
    timeout: 120_000,
  });
  t.equal(r.status, 0, `exit 0: ${r.stdout}${r.stderr}`);
  t.equal(r.stdout, '', 'no status line on success');
  t.match(h.log(), new RegExp(`pigeon\\[${h.pid}\\]: deliver\\(alice@example\\.test\\): delivered`), 'serve delivered it (a hand-off, not in-process)');
  t.equal(files(join(maildirOf(h.inst, 'alice@example.test'), 'new')).length, 1, 'one copy');
}

/** `pigeon -c CONFIG deliver` as pipe(8) user=mail runs it; `feed` writes stdin (then it is ended). */
function deliverAsMail(config: string, args: readonly string[], feed: (w: NodeJS.WritableStream) => Promise<void>): Promise<{ code: number | null; out: string; pid: number }> {
  return new Promise((res, rej) => {
    const c = spawn('setpriv', as(MAIL_UID, MAIL_GID, [process.execPath, PIGEON, '-c', config, 'deliver', ...args]), { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    c.stdout.on('data', (d: Buffer) => (out += d.toString()));
    c.stderr.on('data', (d: Buffer) => (out += d.toString()));
    c.on('error', rej);
    c.on('close', (code) => res({ code, out, pid: c.pid ?? 0 }));
    c.stdin.on('error', () => undefined);
    void feed(c.stdin).then(
      () => c.stdin.end(),
      () => c.stdin.destroy(),
    );
  });
}

/** Whether `uid` may connect to the unix socket at `path`: 'connected' or the error code. */
function connectAs(uid: number, path: string): string {
  const code = `require('net').connect(${JSON.stringify(path)}).on('connect', function () { process.stdout.write('connected'); this.destroy(); }).on('error', (e) => process.stdout.write(e.code))`;
  const r = spawnSync('setpriv', as(uid, uid, [process.execPath, '-e', code]), { encoding: 'utf8', timeout: 60_000 });
  return r.stdout;
}

t.test('Postfix pipe(8) with pigeon serve running: serve delivers, exit codes 0/67/73/75 as in-process; serve stopped → in-process', async (t) => {
  const h = handoffInstance(t, ['alice@pipe.test', 'full@pipe.test', 'defer@pipe.test'], 0o750);
  const { inst } = h;
  setUser(inst, 'full@pipe.test', 'mailstore.quota', '10');
  setUser(inst, 'defer@pipe.test', 'mailstore.quota', '10');
  setUser(inst, 'defer@pipe.test', 'mailstore.quota_full', 'defer');
  spawnSync('chown', ['-R', 'mail:mail', inst]);
  const served = await startServe(t, inst);
  const pid = await servePid(h.log);
  t.ok(existsSync(join(inst, 'deliver-handoff.json')), 'serve names its hand-off socket in the instance directory');
  // the instance directory is the mail user's (SQLite WAL): serve, root, never writes into it itself
  t.equal(statSync(join(inst, 'deliver-handoff.json')).uid, MAIL_UID, 'the runtime file is written as the owner of the mail-writable instance directory, not as root');

  const smtpPort = await freePort();
  const pf = startPostfix({
    dir: h.dir,
    smtpPort,
    main: `virtual_mailbox_domains = pipe.test
virtual_mailbox_maps = static:ok
virtual_transport = pigeon:
pigeon_destination_recipient_limit = 1`,
    // README's pipe(8) line, with this test's paths
    master: `pigeon    unix  -       n       n       -       -       pipe
  flags=Rq user=mail argv=${process.execPath} ${PIGEON} -c ${inst} deliver -f \${sender} -a \${original_recipient} -- \${recipient}`,
  });
  t.teardown(() => pf.stop());

  const rcpts = ['alice@pipe.test', 'nobody@pipe.test', 'full@pipe.test', 'defer@pipe.test'];
  const replies = await smtpSubmit(smtpPort, 'bob@remote.test', rcpts, msg({ to: 'alice@pipe.test', subject: 'handed off', body: 'through serve\n.dot line\n' }));
  t.match(replies[replies.length - 2] ?? '', /^250 .*queued/, `queued: ${replies.join(' | ')}`);
  await waitFor('Postfix status lines', () => rcpts.every((u) => new RegExp(`to=<${u.replace('.', '\\.')}>.*status=`).test(pf.log())));
  const pflog = pf.log();
  t.match(pflog, /to=<alice@pipe\.test>.*relay=pigeon.*status=sent/, 'exit 0: sent');
  t.match(pflog, /to=<nobody@pipe\.test>.*dsn=5\.1\.1.*status=bounced \(<nobody@pipe\.test>: user unknown/, 'exit 67 + the line: bounced 5.1.1');
  t.match(pflog, /to=<full@pipe\.test>.*dsn=5\.2\.2.*status=bounced/, 'exit 73: over quota bounced 5.2.2');
  t.match(pflog, /to=<defer@pipe\.test>.*dsn=4\.2\.2.*status=deferred/, 'exit 75: quota_full=defer deferred 4.2.2');

  const log = h.log();
  t.match(log, new RegExp(`pigeon\\[${pid}\\]: deliver\\(alice@pipe\\.test\\): delivered: from=bob@remote\\.test`), 'the delivery was made by serve');
  t.match(log, new RegExp(`pigeon\\[${pid}\\]: deliver\\(nobody@pipe\\.test\\): rejected: status=5\\.1\\.1`), 'the unknown user was answered by serve');
  t.match(log, new RegExp(`pigeon\\[${pid}\\]: deliver\\(full@pipe\\.test\\): rejected: status=5\\.2\\.2`), 'over quota: serve');
  t.match(log, new RegExp(`pigeon\\[${pid}\\]: deliver\\(defer@pipe\\.test\\): Warning: deferred: status=4\\.2\\.2`), 'deferred: serve');
  t.notMatch(log, new RegExp(`pigeon\\[(?!${pid}\\])\\d+\\]: deliver\\(alice@pipe\\.test\\): delivered`), 'no delivery by another process');
  const box = maildirOf(inst, 'alice@pipe.test');
  t.equal(files(join(box, 'new')).length, 1, 'one copy');
  const stored = readFileSync(join(box, 'new', files(join(box, 'new'))[0] ?? ''), 'latin1');
  t.match(stored, /^Return-Path: <bob@remote\.test>\nDelivered-To: alice@pipe\.test\n/, 'envelope as in-process (-f, the recipient)');
  t.match(stored, /\n\nthrough serve\n\.dot line\n$/, 'the message bytes as Postfix gave them');

  // serve stops: the runtime file goes with it, and deliver delivers in its own process
  await served.stop();
  t.notOk(existsSync(join(inst, 'deliver-handoff.json')), 'runtime file removed on a clean exit');
  const r2 = await smtpSubmit(smtpPort, 'bob@remote.test', ['alice@pipe.test'], msg({ subject: 'no serve' }));
  t.match(r2[r2.length - 2] ?? '', /^250 /);
  await waitFor('the second delivery', () => files(join(box, 'new')).length === 2);
  await waitFor('its log line', () => (h.log().match(/deliver\(alice@pipe\.test\): delivered/g) ?? []).length === 2);
  t.match(h.log(), new RegExp(`pigeon\\[(?!${pid}\\])\\d+\\]: deliver\\(alice@pipe\\.test\\): delivered`), 'without serve: delivered in-process');
  // the deliver process may still log (debug) after its delivered line: done only once pipe(8)
  // saw it exit (Postfix's second status=sent), else it writes into the directory being removed
  await waitFor("Postfix's status line for the second delivery", () => (pf.log().match(/to=<alice@pipe\.test>.*status=sent/g) ?? []).length === 2);
  // Postfix retries the deferred message every few seconds (this helper's backoff): a retry's
  // `pigeon deliver` may be running when Postfix stops; the instance goes only after it exited
  pf.stop();
  await waitFor('no pigeon deliver of this instance still running', () => !deliverRunning(inst));
});

t.test('hand-off socket: the mail user may connect, others may not; serve killed mid-message → 75, no copy; the retry delivers once, in-process', async (t) => {
  // run_dir open to all (0755): the socket's own mode and group must keep other users out
  const h = handoffInstance(t, ['alice@example.test'], 0o755);
  const { inst, run } = h;
  await startServe(t, inst);
  const pid = await servePid(h.log);
  const sock = join(run, 'deliver.sock');
  t.equal(connectAs(MAIL_UID, sock), 'connected', 'the mail user connects');
  t.equal(connectAs(NOBODY, sock), 'EACCES', 'another local user cannot connect (socket mode 0660, group of mail_user)');

  const box = join(maildirOf(inst, 'alice@example.test'), 'new');
  const first = await deliverAsMail(inst, ['-f', 'bob@remote.test', 'alice@example.test'], async (w) => {
    w.write(msg({ subject: 'one' }));
  });
  t.equal(first.code, 0, `delivered: ${JSON.stringify(first)}`);
  t.match(h.log(), new RegExp(`pigeon\\[${pid}\\]: deliver\\(alice@example\\.test\\): delivered`), 'by serve');
  t.equal(files(box).length, 1);

  // another configuration file in the same directory is another instance: not handed to this serve
  const other = join(inst, 'other.yaml');
  copyFileSync(join(inst, 'pigeon.yaml'), other);
  chownSync(other, MAIL_UID, MAIL_GID);
  const mine = await deliverAsMail(other, ['-f', 'bob@remote.test', 'alice@example.test'], async (w) => {
    w.write(msg({ subject: 'other config' }));
  });
  t.equal(mine.code, 0, `delivered: ${JSON.stringify(mine)}`);
  t.match(h.log(), new RegExp(`pigeon\\[${mine.pid}\\]: deliver\\(alice@example\\.test\\): delivered`), '-c other.yaml: delivered in-process, not by the serve of pigeon.yaml');
  t.equal(files(box).length, 2);

  // a message larger than the pipe and socket buffers: once its first MiB is written, deliver
  // must be reading stdin, which it does only after serve said "go"; then serve dies
  const head = msg({ subject: 'cut' }).replace(/hello\n$/, '');
  const big = Buffer.alloc(1024 * 1024, 'x\n'.repeat(512));
  const cut = await deliverAsMail(inst, ['-f', 'bob@remote.test', 'alice@example.test'], async (w) => {
    w.write(head);
    await new Promise<void>((res) => w.write(big, () => res()));
    process.kill(-pid, 'SIGKILL');
    await waitFor('serve gone', () => {
      try {
        process.kill(pid, 0);
        return false;
      } catch {
        return true;
      }
    });
    w.write(big);
  });
  t.equal(cut.code, 75, 'serve killed mid-message: 75 (Postfix retries)');
  t.match(cut.out, /^4\.3\.0 pigeon serve went away during the delivery hand-off; try again\n$/, 'one status line');
  t.equal(files(box).length, 2, 'nothing delivered from the cut message');
  t.ok(existsSync(join(inst, 'deliver-handoff.json')), 'the killed serve left its runtime file (stale)');

  // the retry: the stale file names a socket nobody listens on → in-process, exactly one copy
  const again = await deliverAsMail(inst, ['-f', 'bob@remote.test', 'alice@example.test'], async (w) => {
    w.write(head);
    w.write(big);
    w.write(big);
  });
  t.equal(again.code, 0, `retry delivered: ${JSON.stringify(again)}`);
  t.equal(files(box).length, 3, 'exactly one copy of the retried message');
  t.match(h.log(), new RegExp(`pigeon\\[${again.pid}\\]: deliver\\(alice@example\\.test\\): delivered`), 'delivered by the deliver process itself');
});

t.test('a hand-off loads one file of pigeon (dist/src/cli.js, the delivery entry inlined) and no node:child_process', async (t) => {
  // pipe(8) starts one process per message: on Node 20 the ES module loader's cost is per module
  // file, so `npm run build` inlines the hand-off path into cli.js (scripts/bundle-deliver.mjs)
  const h = await servedHandoff(t);
  // a resolve hook (node's module.register) records every module the process resolves, and at
  // exit every node built-in it loaded; in a directory the mail user can read and write
  const { rec, loaded } = recordFile(t, 'loaded.txt');
  const register = loadRecorder(rec, loaded);
  deliverOnce(t, h, ['--import', register], CLI, 'what a hand-off loads');
  const urls = readFileSync(loaded, 'utf8').split('\n').filter(Boolean);
  t.ok(urls.includes('builtin:net'), 'the record has the built-ins (node:net, the hand-off socket)');
  const ours = [...new Set(urls.filter((u) => u.startsWith('file:') && u !== `file://${register}`))].map((u) => u.replace(`file://${ROOT}/`, ''));
  t.same(ours, ['dist/src/cli.js'], 'files loaded: cli.js, nothing else (no other module of pigeon, no package)');
  t.same(
    urls.filter((u) => /^builtin:(child_process|internal\/child_process|dgram|os)$/.test(u)),
    [],
    'node:child_process (only serve spawns, handoff-file.ts) and what it brings are not loaded',
  );
});

t.test('the pigeon command (dist/src/cli.cjs) hands off as CommonJS: no ES module loader, no node:net, no other file of pigeon, stdin read without a stream', async (t) => {
  // on Node 20 an ES module entry costs every pipe(8) process ≈ 7 ms of CPU (src/launcher.ts),
  // node:net ≈ 3-4 ms more (the native module's connect instead); package.json's bin and
  // scripts/link-pigeon.sh make this file the command
  const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { bin: Record<string, string> };
  t.equal(pkg.bin['pigeon'], 'dist/src/cli.cjs', 'package.json: the pigeon command is dist/src/cli.cjs');
  const NATIVE = join(ROOT, 'build', 'Release', 'pigeon_spawn.node');
  t.ok(existsSync(NATIVE), 'the native module is built (npm install / npm run build; needs g++ and make)');
  const h = await servedHandoff(t);
  // a CommonJS preload writes, at exit, every node built-in the process loaded, every file
  // require() loaded (an import() would bring node's ES module loader, listed among the built-ins)
  // and whether the native module is mapped (cli.cjs loads it with process.dlopen, not require)
  const { rec, loaded } = recordFile(t, 'loaded.json');
  const preload = join(rec, 'preload.cjs');
  writeFileSync(
    preload,
    `process.on('exit', () => { const fs = require('fs'); fs.writeFileSync(${JSON.stringify(loaded)}, JSON.stringify({ builtins: process.moduleLoadList, files: Object.keys(require.cache), native: fs.readFileSync('/proc/self/maps', 'utf8').includes(${JSON.stringify(NATIVE)}) })); });\n`,
  );
  const record = (): { builtins: string[]; files: string[]; native: boolean } => JSON.parse(readFileSync(loaded, 'utf8')) as { builtins: string[]; files: string[]; native: boolean };
  deliverOnce(t, h, ['-r', preload], PIGEON, 'the pigeon command');
  const box = join(maildirOf(h.inst, 'alice@example.test'), 'new');
  t.match(readFileSync(join(box, files(box)[0] ?? ''), 'utf8'), /Subject: the pigeon command/, 'the message itself');
  const small = record();
  t.ok(small.builtins.includes('NativeModule fs'), 'the record has the built-ins');
  t.same(small.files.filter((f) => f !== preload), [PIGEON], 'files required: cli.cjs, nothing else');
  t.ok(small.native, 'and the native module loaded (process.dlopen: no module resolution)');
  t.same(
    small.builtins.filter((m) => /^NativeModule (internal\/modules\/esm\/loader|module|net|child_process|internal\/child_process|internal\/fs\/streams)$/.test(m)),
    [],
    'no ES module loader (nor node:module), no node:net, no node:child_process, no stream over stdin',
  );

  // more than one 64 KiB frame: on through a net.Socket on the same connection, bytes intact
  const big = `${msg({ subject: 'three frames' })}${'0123456789abcdef'.repeat(12 * 1024)}the end\n`;
  const r = spawnSync('setpriv', as(MAIL_UID, MAIL_GID, [process.execPath, '-r', preload, PIGEON, '-c', h.inst, 'deliver', '-f', 'bob@remote.test', '--', 'alice@example.test']), {
    input: big,
    encoding: 'utf8',
    timeout: 120_000,
  });
  t.equal(r.status, 0, `exit 0: ${r.stdout}${r.stderr}`);
  t.equal((h.log().match(new RegExp(`pigeon\\[${h.pid}\\]: deliver\\(alice@example\\.test\\): delivered`, 'g')) ?? []).length, 2, 'serve delivered it too');
  const stored = files(box).map((f) => readFileSync(join(box, f), 'utf8')).find((m) => m.includes('Subject: three frames')) ?? '';
  t.ok(stored.endsWith(big.slice(big.indexOf('\n\n'))), 'the body, byte for byte');
  t.ok(record().builtins.includes('NativeModule net'), 'node:net loaded for it');

  // without the native module's connect (PIGEON_DELIVER_NATIVE=0): node:net from the start, the same answer
  const r3 = spawnSync('setpriv', as(MAIL_UID, MAIL_GID, ['PIGEON_DELIVER_NATIVE=0', process.execPath, '-r', preload, PIGEON, '-c', h.inst, 'deliver', '-f', 'bob@remote.test', '--', 'nobody@example.test']), {
    input: msg({ subject: 'unknown' }),
    encoding: 'utf8',
    timeout: 120_000,
  });
  t.equal(r3.status, 67, `an unknown user: 67 (${r3.stdout})`);
  t.equal(r3.stdout, '5.1.1 <nobody@example.test>: user unknown\n', 'the one status line');
  t.match(h.log(), new RegExp(`pigeon\\[${h.pid}\\]: deliver\\(nobody@example\\.test\\): rejected`), 'answered by serve');
  t.ok(record().builtins.includes('NativeModule net'), 'through node:net');
  t.notOk(record().native, 'the native module not loaded');
});

t.test('stdin in non-blocking mode: the hand-off reads on as a stream from where the synchronous reads stopped', async (t) => {
  // pipe(8) gives a blocking pipe, read with readSync; a descriptor in O_NONBLOCK mode answers
  // EAGAIN when empty, and the rest of the message must then come through process.stdin
  need('/usr/bin/python3', 'python3');
  const h = await servedHandoff(t);
  const { inst, pid } = h;
  const nonblock = 'import fcntl, os, sys; fcntl.fcntl(0, fcntl.F_SETFL, fcntl.fcntl(0, fcntl.F_GETFL) | os.O_NONBLOCK); os.execvp(sys.argv[1], sys.argv[1:])';
  const c = spawn('python3', ['-c', nonblock, 'setpriv', ...as(MAIL_UID, MAIL_GID, [process.execPath, PIGEON, '-c', inst, 'deliver', '-f', 'bob@remote.test', '--', 'alice@example.test'])], { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  c.stdout.on('data', (d: Buffer) => (out += d.toString()));
  c.stderr.on('data', (d: Buffer) => (out += d.toString()));
  const exited = new Promise<number | null>((res) => c.on('close', (code) => res(code)));
  const head = msg({ subject: 'in two parts' }).replace(/hello\n$/, '');
  const tail = 'the second part, written once deliver waits for it on a stream\n';
  c.stdin.write(head);
  // the event: deliver's epoll set holds its stdin (fd 0), i.e. it read what was there, met
  // EAGAIN, and now waits on process.stdin for the rest
  const watchesStdin = (): boolean => {
    try {
      for (const fd of readdirSync(`/proc/${c.pid}/fdinfo`)) {
        if (/^tfd:\s+0\s/m.test(readFileSync(`/proc/${c.pid}/fdinfo/${fd}`, 'utf8'))) return true;
      }
    } catch {
      /* not started yet, or gone */
    }
    return false;
  };
  await waitFor('deliver waiting for the rest of stdin on a stream', () => watchesStdin() || c.exitCode !== null);
  t.equal(c.exitCode, null, `deliver still running, waiting for the rest: ${out}`);
  c.stdin.end(tail);
  t.equal(await exited, 0, `exit 0: ${out}`);
  t.match(h.log(), new RegExp(`pigeon\\[${pid}\\]: deliver\\(alice@example\\.test\\): delivered`), 'serve delivered it');
  const box = join(maildirOf(inst, 'alice@example.test'), 'new');
  t.equal(files(box).length, 1, 'one copy');
  const stored = readFileSync(join(box, files(box)[0] ?? ''), 'utf8');
  t.ok(stored.endsWith(`\n\n${tail}`), 'both parts, in order, nothing twice');
  t.equal(stored.split('Subject: in two parts').length, 2, 'the head once');
});
