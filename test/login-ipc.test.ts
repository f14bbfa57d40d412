// What one login asks of the node state service (issue 15: login latency). Every request is a
// round trip to another process on the login's path, so the requests of a login are counted
// here: a one-shot session (`pigeon imap --forker stdio`) talks to a real node state service
// (src/anvil/main.ts) through a relay at its run_dir/anvil.sock that records each request's op.
// The last case runs `pigeon serve` on the same relay: its greeting does not wait for the
// connection's admission, its first command does.
import t from 'tap';
import { spawn, execFileSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { makeInstance, serve, CLI, ROOT } from './helpers/instance.js';
import { useBackend } from './helpers/backends.js';
import { Wire } from './helpers/wire.js';

const inst = makeInstance(t, { listen: ['imap=127.0.0.1:0'], users: { 'alice@example.test': 'secret' } });
if (!useBackend(t, inst, 'dovecot')) process.exit(1);
const relayDir = join(inst.dir, 'run-relay');
const serviceDir = join(inst.dir, 'run-service');
mkdirSync(relayDir, { mode: 0o700 });
mkdirSync(serviceDir, { mode: 0o700 });
writeFileSync(join(inst.dir, 'conf.d', '60-run.yaml'), `run_dir: ${relayDir}\n`);

// the real service, on its own run directory; `ready` on fd 3 when it serves
const service = spawn(process.execPath, [join(ROOT, 'dist', 'src', 'anvil', 'main.js'), serviceDir, '--idle-ms', '600000'], { stdio: ['ignore', 'ignore', 'pipe', 'pipe'] });
t.teardown(() => {
  service.kill('SIGTERM');
});
const ready = await new Promise<string>((resolve) => {
  let text = '';
  service.stdio[3]?.on('data', (d: Buffer) => {
    text += d.toString('utf8');
    if (text.includes('\n')) resolve(text.trim());
  });
  service.once('exit', (code) => resolve(`exited ${code}`));
});
if (ready !== 'ready') throw new Error(`node state service: ${ready}`);

/** every request op that went through the relay, in order */
const ops: string[] = [];
/** while set, a penalty.get (and every request after it) waits for it before going on to the service */
let gate: Promise<void> | null = null;
/** while set, a conn.open waits for it before going on to the service, and only it: the requests after it go on */
let aside: Promise<void> | null = null;
/** told of each request op as it arrives at the relay (before any gate) */
let onOp: ((op: string) => void) | null = null;
const relay: Server = createServer((client: Socket) => {
  const upstream = connect(join(serviceDir, 'anvil.sock'));
  let line = '';
  let queue = Promise.resolve();
  client.on('data', (d: Buffer) => {
    line += d.toString('utf8');
    for (let i = line.indexOf('\n'); i >= 0; i = line.indexOf('\n')) {
      const request = line.slice(0, i + 1);
      line = line.slice(i + 1);
      const op = String((JSON.parse(request) as { op?: unknown }).op);
      const held = op === 'penalty.get' ? gate : null;
      const later = op === 'conn.open' ? aside : null;
      ops.push(op);
      onOp?.(op);
      if (later) {
        void later.then(() => upstream.write(request));
        continue;
      }
      queue = queue.then(async () => {
        if (held) await held;
        upstream.write(request);
      });
    }
  });
  upstream.pipe(client);
  client.on('error', () => upstream.destroy());
  upstream.on('error', () => client.destroy());
});
await new Promise<void>((resolve) => relay.listen(join(relayDir, 'anvil.sock'), resolve));
t.teardown(() => relay.close());

/** One stdio session with `input`; its stdout, and the ops it sent. */
async function session(input: string): Promise<{ out: string; ops: string[] }> {
  const from = ops.length;
  const p = spawn(process.execPath, [CLI, '-c', inst.dir, 'imap', '--forker', 'stdio'], { stdio: ['pipe', 'pipe', 'ignore'] });
  let out = '';
  p.stdout.on('data', (d: Buffer) => (out += d.toString('utf8')));
  p.stdin.end(input);
  await new Promise((resolve) => p.once('close', resolve));
  return { out, ops: ops.slice(from) };
}
const count = (list: string[], op: string): number => list.filter((o) => o === op).length;

t.test('a login from an address with no failures asks for its penalty once and clears nothing', async (t) => {
  const s = await session('a LOGIN alice@example.test secret\r\nb LOGOUT\r\n');
  t.match(s.out, /a OK \[CAPABILITY[\s\S]*b OK/, 'logged in and out');
  t.equal(count(s.ops, 'penalty.get'), 1, `one penalty lookup (requests: ${s.ops.join(' ')})`);
  t.equal(count(s.ops, 'penalty.clear'), 0, 'no clear: there was nothing to clear (one round trip less per login)');
  t.equal(count(s.ops, 'conn.login'), 1, 'one user+IP slot taken');
});

t.test('a login after failures from the address still clears them', async (t) => {
  const s = await session('a1 LOGIN alice@example.test wrong\r\na2 LOGIN alice@example.test secret\r\na3 LOGOUT\r\n');
  t.match(s.out, /a1 NO \[AUTHENTICATIONFAILED\][\s\S]*a2 OK \[CAPABILITY/, 'refused, then logged in');
  t.equal(count(s.ops, 'penalty.fail'), 1, 'the failure counted');
  t.equal(count(s.ops, 'penalty.clear'), 1, 'the success cleared it');
  const again = await session('a LOGIN alice@example.test secret\r\nb LOGOUT\r\n');
  t.equal(count(again.ops, 'penalty.clear'), 0, 'the next login finds the address clean');
});

t.test('the password is checked while the penalty lookup is in flight: the lookup is off the login path', async (t) => {
  // carol's hash is read from a passwd-file that is a FIFO: the session opening it to check her
  // password is an event the test sees (its open for writing returns). The relay holds the
  // session's penalty lookup until then. A session that waits for the lookup before checking
  // the password never opens the FIFO, its lookup times out (ANVIL_REQUEST_MS) and it carries on
  // with per-process state, which it logs.
  const fifo = join(inst.dir, 'users.fifo');
  execFileSync('mkfifo', ['-m', '0600', fifo]);
  const hash = inst.run(['pw', '-s', 'SSHA256'], 'c4rol\n').stdout.trim();
  writeFileSync(join(inst.dir, 'conf.d', '70-auth.yaml'), `auth:\n  chain: [passwd-file]\n  passwd_file: ${fifo}\n`);
  t.teardown(() => writeFileSync(join(inst.dir, 'conf.d', '70-auth.yaml'), ''));
  let release = (): void => undefined;
  gate = new Promise<void>((resolve) => (release = resolve));
  const logBefore = readFileSync(join(inst.dir, 'pigeon.log'), 'utf8').length;
  const from = ops.length;
  const login = session('a LOGIN carol@example.test c4rol\r\nb LOGOUT\r\n');
  const writer = await open(fifo, 'w'); // returns once the session opened the file to check the password
  // The session wrote its lookup before it opened the file; in this process the relay may read
  // it a moment after the open returned (two events of one loop, in either order under load).
  // Its password is not written yet: a session that sends the lookup only after the check would
  // send none until it ends (the check then fails on its own deadline).
  const lookupPending = await new Promise<boolean>((resolve) => {
    if (ops.slice(from).includes('penalty.get')) return resolve(true);
    onOp = (op) => {
      if (op !== 'penalty.get') return;
      onOp = null;
      resolve(true);
    };
    void login.then(() => {
      onOp = null;
      resolve(false);
    });
  });
  release();
  gate = null;
  await writer.writeFile(`carol@example.test:${hash}::::::\n`);
  await writer.close();
  const s = await login;
  t.ok(lookupPending, 'the penalty lookup was sent (and held) before the password check started');
  t.match(s.out, /a OK \[CAPABILITY/, 'logged in');
  t.equal(count(s.ops, 'penalty.get'), 1, 'one penalty lookup');
  const log = readFileSync(join(inst.dir, 'pigeon.log'), 'utf8').slice(logBefore);
  t.notMatch(log, /per process until it is back/, 'the lookup was answered by the node state service (no timeout, no per-process fallback)');
});

t.test('the user+IP slot is asked for while the penalty lookup is in flight: one round trip on the login path', async (t) => {
  // The relay holds the session's penalty lookup (and what follows it) until the session has
  // also asked for its user+IP slot (conn.login), or has ended. A session that waits for the
  // lookup's answer before asking for the slot never asks while it is held: its lookup times out
  // (ANVIL_REQUEST_MS), it goes on with per-process state and ends.
  let release = (): void => undefined;
  gate = new Promise<void>((resolve) => (release = resolve));
  let sawSlot = (_: boolean): void => undefined;
  const asked = new Promise<boolean>((resolve) => (sawSlot = resolve));
  onOp = (op) => {
    if (op === 'conn.login') sawSlot(true);
  };
  const login = session('a LOGIN alice@example.test secret\r\nb LOGOUT\r\n');
  void login.then(() => sawSlot(false));
  const whileHeld = await asked;
  onOp = null;
  release();
  gate = null;
  const s = await login;
  t.ok(whileHeld, `conn.login was sent while penalty.get was still unanswered (requests: ${s.ops.join(' ')})`);
  t.match(s.out, /a OK \[CAPABILITY[\s\S]*b OK/, 'logged in and out');
  t.equal(count(s.ops, 'conn.login'), 1, 'one user+IP slot taken');
  t.equal(count(s.ops, 'conn.logout'), 0, 'and not given back');
});

t.test('a wrong password asks for no user+IP slot', async (t) => {
  const s = await session('a LOGIN alice@example.test wrong\r\nb LOGOUT\r\n');
  t.match(s.out, /a NO \[AUTHENTICATIONFAILED\]/, 'refused');
  t.equal(count(s.ops, 'conn.login'), 0, 'no slot asked for');
});

t.test('pigeon serve greets a plain IMAP client at once and reads none of its commands before the node admitted it', async (t) => {
  // serve finds the relay serving run_dir/anvil.sock and uses it (a node state service already
  // runs there). The relay holds the first connection's conn.open; a second connection, whose
  // admission goes through, is the barrier: the first one's LOGIN was on the wire before the
  // second connected, so a worker that read it would have asked for its penalty by the time the
  // second's NOOP is answered.
  const srv = await serve(t, inst, 1);
  const port = srv.ports['imap'] ?? 0;
  let release = (): void => undefined;
  let heldOne = (): void => undefined;
  const held = new Promise<void>((resolve) => (heldOne = resolve));
  aside = new Promise<void>((resolve) => (release = resolve));
  onOp = (op) => {
    if (op !== 'conn.open') return;
    // only this first connection's admission is held
    onOp = null;
    aside = null;
    heldOne();
  };
  t.teardown(() => {
    release();
    aside = null;
    onOp = null;
  });
  const from = ops.length;
  const first = await Wire.open(port);
  t.teardown(() => first.close());
  t.match(await first.until(/\r\n/), /^\* OK \[CAPABILITY /, 'greeted while its admission is still held');
  await held;
  first.write('a LOGIN alice@example.test secret\r\n');
  const second = await Wire.open(port);
  t.teardown(() => second.close());
  await second.until(/\r\n/);
  second.write('n1 NOOP\r\n');
  t.match(await second.until(/n1 .*\r\n/), /n1 OK/, 'a second connection is admitted and served meanwhile');
  t.equal(count(ops.slice(from), 'penalty.get'), 0, `the first one's LOGIN was not read while its admission was held (requests: ${ops.slice(from).join(' ')})`);
  release();
  t.match(await first.until(/a .*\r\n/), /^a OK \[CAPABILITY [^\]]*\] Logged in/, 'admitted: its LOGIN is answered');
  t.equal(count(ops.slice(from), 'penalty.get'), 1, 'one penalty lookup, after the admission');
  first.write('b LOGOUT\r\n');
  await first.until(/b OK.*\r\n/);
  second.write('n2 LOGOUT\r\n');
  await second.until(/n2 OK.*\r\n/);
  await srv.stop();
});
