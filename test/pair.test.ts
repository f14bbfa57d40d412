// Issue 15 (peer link login): a session received over the peer link gives its Dovecot one end of a
// local socket pair (src/peer/pair.ts). With the native module the pair is socketpair(2): no
// listener, no connect/accept round trip, no token; without it (not built) a connection to an
// abstract UNIX socket of the process's own. Both ways: bytes both ways, the far end works as a
// child's stdin and stdout, and only the listener way leaves a `pigeon-pair-PID` socket behind.
// The native pair's ends have the larger send buffer (PAIR_SNDBUF) a bulk RETR or FETCH needs.
import t from 'tap';
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import type { Socket } from 'node:net';
import { socketPair, sessionPair, spareNear, type Pair } from '../src/peer/pair.js';
import { waitFor } from './helpers/delivery-env.js';
import { nativeModule } from '../src/native.js';
import { PAIR_SNDBUF } from '../src/limits.js';

/** The descriptor under a net.Socket made from one (what the native module is given). */
const fdOf = (s: Socket): number => (s as unknown as { _handle: { fd: number } })._handle.fd;

/** The next `n` bytes `s` gives (it is resumed for them, paused again after). */
function read(s: Socket, n: number): Promise<string> {
  return new Promise((resolve, reject) => {
    let got = '';
    const onData = (d: Buffer): void => {
      got += d.toString('latin1');
      if (got.length >= n) {
        s.off('data', onData);
        s.off('error', reject);
        s.pause();
        resolve(got);
      }
    };
    s.on('data', onData);
    s.once('error', reject);
    s.resume();
  });
}

/** Whether this process listens on a pair socket in the abstract namespace. */
function pairListener(): boolean {
  return readFileSync('/proc/net/unix', 'utf8').includes(`@pigeon-pair-${process.pid}-`);
}

for (const via of ['native', 'listener'] as const) {
  t.test(`a pair (${via}): both ends connected, the far end a child's stdin and stdout`, async (t) => {
    const p: Pair = await socketPair(via);
    t.teardown(() => {
      p.near.destroy();
      p.far.destroy();
    });
    t.ok(p.near.isPaused() && p.far.isPaused(), 'both ends paused: the relay resumes near, far is never read here');
    p.near.write('to far\n');
    t.equal(await read(p.far, 7), 'to far\n', 'near → far');
    p.far.write('to near\n');
    t.equal(await read(p.near, 8), 'to near\n', 'far → near');
    // (the native way runs first: no listener can be left over from the other one)
    if (via === 'native') t.notOk(pairListener(), 'socketpair(2): no listening socket made for it');
    else t.ok(pairListener(), 'without the native module: the abstract listener');

    // as the spawner gives it to Dovecot: the far end as stdin and stdout of a child (cat echoes)
    const child = spawn('cat', [], { stdio: [p.far, p.far, 'inherit'] });
    const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
    p.far.destroy(); // the child holds its copies
    p.near.write('through cat\n');
    t.equal(await read(p.near, 12), 'through cat\n', 'what near sends comes back through the child');
    p.near.end();
    t.equal(await exited, 0, 'the child saw the end of its input and exited');
  });
}

t.test('a received session\'s pair: the spare made after the previous session, then a new spare; it works as a fresh one', async (t) => {
  const first = await sessionPair();
  t.teardown(() => {
    first.near.destroy();
    first.far.destroy();
  });
  // the event: the spare made after the first call (setImmediate, off the first session's path)
  await waitFor('a spare pair after the first session\'s', () => spareNear() !== null, 30_000);
  const ready = spareNear();
  const second = await sessionPair();
  t.teardown(() => {
    second.near.destroy();
    second.far.destroy();
  });
  t.equal(second.near, ready, 'the second session got the spare');
  t.not(second.near, first.near, 'another pair than the first');
  t.ok(second.near.isPaused() && second.far.isPaused(), 'both ends paused, as a fresh pair');
  second.near.write('to far\n');
  t.equal(await read(second.far, 7), 'to far\n', 'near → far');
  second.far.write('to near\n');
  t.equal(await read(second.near, 8), 'to near\n', 'far → near');
  await waitFor('the next spare', () => spareNear() !== null && spareNear() !== ready, 30_000);
  t.pass('taking the spare made the next one');
});

t.test('a native pair: each end sends through a buffer of PAIR_SNDBUF (the kernel keeps twice it, within net.core.wmem_max)', async (t) => {
  const n = nativeModule();
  if (typeof n === 'string') {
    t.fail(`the native module: ${n}`);
    return;
  }
  const p = await socketPair('native');
  t.teardown(() => {
    p.near.destroy();
    p.far.destroy();
  });
  const max = Number(readFileSync('/proc/sys/net/core/wmem_max', 'utf8').trim());
  const want = 2 * Math.min(PAIR_SNDBUF, max);
  t.equal(n.sendBufferSize(fdOf(p.far)), want, `the backend's end (it writes a RETR or FETCH): ${want} bytes`);
  t.equal(n.sendBufferSize(fdOf(p.near)), want, `the relay's end: ${want} bytes`);
  const [a, b] = n.socketPair(0);
  t.ok(n.sendBufferSize(a) < want, 'a pair asked for no size keeps the smaller default');
  n.close(a);
  n.close(b);
});
