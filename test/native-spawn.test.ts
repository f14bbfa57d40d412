// Issue 15: the spawner starts backends with native/pigeon_spawn.c (vfork) instead of Node's
// child_process (libuv's fork of the whole spawner). The child must get exactly what
// child_process.spawn(file, args, { stdio: [socket, socket, 2], cwd, uid, gid, env }) gives it:
// the same credentials (supplementary groups dropped), directory, environment (nothing of ours),
// signal dispositions and mask (Node ignores SIGPIPE: a backend must not inherit that), descriptors
// (stdin/stdout the socket, blocking; stderr ours; nothing else of ours), and the same errors.
// In a real `pigeon serve`: test/spawner.test.ts.
import t from 'tap';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { connect, createServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

const ROOT = resolve(import.meta.dirname, '..');
const MODULE = join(ROOT, 'build', 'Release', 'pigeon_spawn.node');

interface NativeSpawn {
  spawn(paths: string[], argv: string[], env: string[], cwd: string, uid: number, gid: number, fd: number): number;
  reap(): number[];
}

t.ok(existsSync(MODULE), `${MODULE} is built (npm install runs scripts/build-native.mjs; needs g++, make, python3)`);
const native = createRequire(import.meta.url)(MODULE) as NativeSpawn;

/** a connected pair: [ours, theirs] */
async function pair(): Promise<[Socket, Socket]> {
  return new Promise((res, rej) => {
    const srv = createServer((theirs) => {
      srv.close();
      res([ours, theirs]);
    });
    let ours: Socket;
    srv.listen(0, '127.0.0.1', () => {
      const a = srv.address();
      ours = connect(typeof a === 'object' && a ? a.port : 0, '127.0.0.1');
      ours.on('error', rej);
    });
  });
}

const readAll = (s: Socket): Promise<string> =>
  new Promise((res) => {
    const parts: Buffer[] = [];
    s.on('data', (d: Buffer) => parts.push(d));
    s.on('close', () => res(Buffer.concat(parts).toString('utf8')));
  });

/** what the child sees of itself, written to its stdout (the socket); $1 names the run */
const REPORT = [
  // the names of its environment (a value may hold newlines: tap's do), then the two values given
  'id -u; id -g; id -G; pwd; awk "BEGIN { for (k in ENVIRON) print \\"env \\" k }" | sort; echo "ONLY=$ONLY PATH=$PATH"',
  // grep's own: what the shell was given (the shell's own mask changes while it starts grep)
  'grep -E "^Sig(Ign|Blk)" /proc/self/status',
  // its descriptors (the shell's own 10 and up aside) and whether stdin is blocking (O_NONBLOCK: 04000)
  'for f in /proc/$$/fd/*; do n=${f##*/}; [ "$n" -ge 10 ] || echo "fd $n $(readlink $f | sed "s/[0-9][0-9]*/N/g")"; done',
  'fl=$(sed -n "s/^flags:[[:space:]]*//p" /proc/$$/fdinfo/0); echo "stdin nonblock $(( (0$fl >> 11) & 1 ))"',
  'echo "to stderr $1" >&2',
].join('; ');

/** tap's process-info hook adds its own variables to what child_process.spawn passes: not ours */
const tapless = (s: string): string => s.replace(/^env (NODE_OPTIONS|_TAPJS_\w+)\n/gm, '');

async function runBoth(uid: number, gid: number): Promise<{ node: string; native: string }> {
  const out: Record<string, string> = {};
  for (const mode of ['node', 'native'] as const) {
    const [ours, theirs] = await pair();
    const got = readAll(ours);
    const env = { PATH: '/usr/bin:/bin', ONLY: 'this' };
    const cwd = tmpdir();
    if (mode === 'node') {
      const c = spawn('/bin/sh', ['-c', REPORT, 'sh', mode], { stdio: [theirs, theirs, 2], env, cwd, uid, gid });
      await new Promise((r) => c.once('exit', r));
    } else {
      const fd = (theirs as Socket & { _handle: { fd: number } })._handle.fd;
      native.spawn(['/bin/sh'], ['/bin/sh', '-c', REPORT, 'sh', mode], Object.entries(env).map(([k, v]) => `${k}=${v}`), cwd, uid, gid, fd);
    }
    theirs.destroy();
    out[mode] = await got;
  }
  return { node: out['node'] ?? '', native: out['native'] ?? '' };
}

t.test('the child gets what child_process.spawn gives it: credentials, directory, environment, signals, descriptors', async (t) => {
  const root = process.getuid?.() === 0;
  const { node, native: nat } = await runBoth(root ? 8 : -1, root ? 8 : -1);
  t.equal(nat, tapless(node), 'the same report from both starts');
  t.match(nat, /^stdin nonblock 0$/m, 'stdin is blocking');
  t.match(nat, /^SigIgn:\t0+$/m, 'no signal ignored (Node ignores SIGPIPE)');
  t.match(nat, /^SigBlk:\t0+$/m, 'no signal blocked');
  t.match(nat, /^fd 0 socket:\[N\]\nfd 1 socket:\[N\]\nfd 2 /m, 'stdin and stdout the socket, then stderr');
  t.match(nat, /^env ONLY\nenv PATH\nenv PWD\nONLY=this PATH=\/usr\/bin:\/bin$/m, 'the environment given, and nothing of ours (PWD is the shell’s)');
  if (root) t.match(nat, /^8\n8\n8\n/, 'uid 8, gid 8, no supplementary group of ours');
});

t.test('errors: as child_process words them, and the failed child is reaped', async (t) => {
  // listening before anything starts: a SIGCHLD with no listener is lost
  let exited: () => void = () => undefined;
  const onChld = (): void => exited();
  process.on('SIGCHLD', onChld);
  t.teardown(() => void process.off('SIGCHLD', onChld));
  const [ours, theirs] = await pair();
  const fd = (theirs as Socket & { _handle: { fd: number } })._handle.fd;
  t.throws(() => native.spawn(['/nonexistent/imap'], ['imap'], [], '/', -1, -1, fd), { code: 'ENOENT' }, 'a missing program');
  t.throws(() => native.spawn(['/etc/passwd'], ['x'], [], '/', -1, -1, fd), { code: 'EACCES' }, 'not executable');
  t.throws(() => native.spawn(['/bin/true'], ['true'], [], '/nonexistent-dir', -1, -1, fd), { code: 'ENOENT' }, 'a missing directory');
  t.throws(() => native.spawn(['/bin/true'], ['true'], ['A=\u0000'], '/', -1, -1, fd), { code: 'EINVAL' }, 'a NUL byte in the environment');
  t.throws(() => native.spawn(['/bin/true'], ['true'], [], '/', -1, -1, 1), { code: 'EINVAL' }, 'stdio is not a descriptor to give');
  // the execvp-style search: ENOENT candidates are passed over
  const pid = native.spawn(['/nonexistent/true', '/bin/true'], ['true'], [], '/', -1, -1, fd);
  t.ok(pid > 0, 'the next candidate ran');
  theirs.destroy();
  // signal listeners do not keep the event loop alive (nor does `ours`, once the child has exited
  // and closed the other end): a listening server does, until the exit is seen
  const keep = createServer().listen(0, '127.0.0.1');
  t.teardown(() => void keep.close());
  // its exit, reaped (the failed ones were reaped already; the first test's native child may come too)
  let got: number[] = [];
  for (;;) {
    const r = native.reap();
    const i = r.findIndex((v, k) => k % 3 === 0 && v === pid);
    if (i >= 0) {
      got = r.slice(i, i + 3);
      break;
    }
    // a signal between reap() and here is not lost: the listener is there, and the event comes after this turn
    await new Promise<void>((r) => (exited = r));
  }
  ours.destroy();
  t.same(got, [pid, 0, 0], 'pid, exit code 0, no signal');
});
