/**
 * NAME        src/peer/pair — a connected pair of local stream sockets, for a session relayed to a local backend
 * SYNOPSIS    const { near, far } = await sessionPair();   // far: the backend's stdin/stdout; near: relayed
 * DESCRIPTION A session whose client connection cannot be given to the backend itself (a TLS client:
 *             the proxy holds the TLS state; a session received over the peer link) still has its
 *             Dovecot started like a local plain-TCP login's: handed off, through the worker's
 *             spawner process (src/proxy/spawner.ts), so the worker never forks (libuv's fork of the
 *             whole worker blocked its event loop ≈ 3-5 ms per login). The spawner needs a socket to
 *             give the backend as stdin/stdout: the backend gets `far`, one end of a local pair,
 *             and the relay joins the client (or the link) with `near` (src/proxy/router.ts).
 *             The pair is socketpair(2) from the spawner's native module (native/pigeon_spawn.c):
 *             no listener, no connect and accept, no token. Without that module (not built):
 *             Node has no socketpair(2), so each process listens once, on first use, on a UNIX socket
 *             in Linux's abstract namespace (no file: nothing to clean up after a crash, no path
 *             anyone could change) under a random name. A pair is a connection to it that first
 *             sends a 16-byte random token the process made for that pair; the accepted end that
 *             presents it is `near`. A connection with an unknown token, or none within
 *             PAIR_TIMEOUT_MS, is closed; at most PAIR_MAX_UNCLAIMED such connections wait at once.
 *             `far` is never read by this process (the backend reads it).
 *             With the native module each end's send buffer is PAIR_SNDBUF (Linux keeps twice that, within
 *             net.core.wmem_max), as a TCP socket's grows by itself: Dovecot's pop3 or imap writes a
 *             large RETR or FETCH into `far` while the relay is still sending what it read before,
 *             instead of stopping at the default 208 KiB and waiting for it. A 20 MiB POP3 RETR
 *             through the peer link (bench-cluster --only pop3, ten alternations): 224-295 →
 *             264-354 MiB/s. Memory is taken only for bytes in flight, as on TCP.
 * DIAGNOSTICS A pair that cannot be made rejects (the caller falls back to relaying through pipes).
 * SECURITY    Any local process may connect to the abstract name, but only a connection that
 *             presents a token of this process (128 random bits, never sent anywhere else)
 *             becomes a pair; others are closed unread past their first 16 bytes. Bytes are
 *             passed as they are.
 */
import { createServer, connect, Socket, type Server, type SocketConstructorOpts } from 'node:net';
import { ownReads, type OnRead } from '../proxy/own-reads.js';
import { randomBytes } from 'node:crypto';
import { nativeModule } from '../native.js';
import { PAIR_SNDBUF } from '../limits.js';
import { closeSync } from 'node:fs';

const TOKEN_BYTES = 16;
/** a pair is made within this, else it fails (a connect that never completes) */
export const PAIR_TIMEOUT_MS = 5000;
/** connections that have not presented a token yet, at most (more are closed at once) */
export const PAIR_MAX_UNCLAIMED = 64;

export interface Pair {
  /** this process's end: relayed to the client or the link */
  readonly near: Socket;
  /** the backend's end (its stdin and stdout), never read here */
  readonly far: Socket;
}

interface PairListener {
  readonly path: string;
  readonly server: Server;
  /** token (hex) → the waiting socketPair() call */
  readonly waiting: Map<string, (near: Socket) => void>;
}

let listening: Promise<PairListener> | null = null;
const ignore = (): void => undefined;

function listener(): Promise<PairListener> {
  listening ??= new Promise<PairListener>((resolve, reject) => {
    const path = `\0pigeon-pair-${process.pid}-${randomBytes(12).toString('hex')}`;
    const waiting = new Map<string, (near: Socket) => void>();
    const server = createServer((s) => accepted(s, waiting));
    server.once('error', (e) => {
      listening = null;
      reject(e);
    });
    server.listen(path, () => {
      server.unref(); // it never keeps the process alive
      resolve({ path, server, waiting });
    });
  });
  return listening;
}

/** accepted connections that have not presented a token yet */
let unclaimed = 0;

/** An accepted connection: its first 16 bytes name the pair it belongs to. */
function accepted(s: Socket, waiting: Map<string, (near: Socket) => void>): void {
  s.on('error', ignore);
  if (unclaimed >= PAIR_MAX_UNCLAIMED) {
    s.destroy();
    return;
  }
  unclaimed++;
  let claimed = false;
  s.once('close', () => {
    if (!claimed) unclaimed--;
  });
  const timer = setTimeout(() => s.destroy(), PAIR_TIMEOUT_MS);
  timer.unref();
  let got: Buffer = Buffer.alloc(0);
  const onData = (c: Buffer): void => {
    got = got.length === 0 ? c : Buffer.concat([got, c]);
    if (got.length < TOKEN_BYTES) return;
    s.off('data', onData);
    s.pause();
    clearTimeout(timer);
    claimed = true;
    unclaimed--;
    const claim = waiting.get(got.subarray(0, TOKEN_BYTES).toString('hex'));
    if (!claim) {
      s.destroy();
      return;
    }
    // the backend's first bytes, when they came with the token
    if (got.length > TOKEN_BYTES) s.unshift(got.subarray(TOKEN_BYTES));
    claim(s);
  };
  s.on('data', onData);
}

/** Both ends as Node sockets, paused (the caller's relay resumes `near`; `far` is never read here). */
function fromFds(near: number, far: number): Pair {
  // `near` carries the backend's answers, a large FETCH or RETR among them: its reads land in a
  // buffer the relay reuses (src/proxy/own-reads.ts)
  const reads = ownReads();
  const options: SocketConstructorOpts & { readonly onread: OnRead } = { fd: near, readable: true, writable: true, onread: reads.onread };
  const a = new Socket(options);
  reads.attach(a);
  const b = new Socket({ fd: far, readable: true, writable: true });
  a.pause();
  b.pause();
  b.on('error', ignore);
  return { near: a, far: b };
}

/**
 * A connected pair of local sockets; rejects within PAIR_TIMEOUT_MS when it cannot be made.
 * `via` (tests): 'listener' makes it the way a process without the native module does.
 */
export async function socketPair(via: 'native' | 'listener' = 'native'): Promise<Pair> {
  const n = via === 'native' ? nativeModule() : null;
  if (n !== null && typeof n !== 'string') {
    const [near, far] = n.socketPair(PAIR_SNDBUF);
    try {
      return fromFds(near, far);
    } catch (e) {
      for (const fd of [near, far]) closeSync(fd);
      throw e;
    }
  }
  const l = await listener();
  const token = randomBytes(TOKEN_BYTES);
  const key = token.toString('hex');
  return new Promise<Pair>((resolve, reject) => {
    const far = connect(l.path);
    far.pause(); // never read here: the backend reads it
    far.on('error', ignore);
    const fail = (why: string): void => {
      if (!l.waiting.delete(key)) return;
      clearTimeout(timer);
      far.destroy();
      reject(new Error(`local socket pair: ${why}`));
    };
    const timer = setTimeout(() => fail(`not connected within ${PAIR_TIMEOUT_MS / 1000}s`), PAIR_TIMEOUT_MS);
    timer.unref();
    l.waiting.set(key, (near) => {
      l.waiting.delete(key);
      clearTimeout(timer);
      far.off('close', onClose);
      resolve({ near, far });
    });
    const onClose = (): void => fail('closed while connecting');
    far.once('close', onClose);
    far.write(token);
  });
}

let spare: Pair | null = null;
let refilling = false;

/**
 * The pair for a session (a TLS login, a received one): the spare made after the previous one when there is one,
 * else a new one; then a new spare is made once the caller has gone on (setImmediate: after the
 * backend's start was sent to the spawner). A socketpair(2) and its two net.Sockets cost ≈ 150 µs
 * (p50, one every few milliseconds), on the path between the hand-off and the backend's start:
 * the next login does not wait for them. The spare holds two descriptors and keeps nothing
 * alive (unref'd until taken).
 */
export async function sessionPair(): Promise<Pair> {
  const p = spare;
  spare = null;
  refill();
  if (p !== null && !p.near.destroyed && !p.far.destroyed) {
    p.near.ref();
    p.far.ref();
    return p;
  }
  return socketPair();
}

/** The spare pair's near end, when one is ready (tests). */
export function spareNear(): Socket | null {
  return spare?.near ?? null;
}

function refill(): void {
  if (refilling) return;
  refilling = true;
  setImmediate(() => {
    socketPair().then(
      (p) => {
        refilling = false;
        if (spare !== null) {
          p.near.destroy();
          p.far.destroy();
          return;
        }
        p.near.unref();
        p.far.unref();
        spare = p;
      },
      () => {
        refilling = false; // none now: the next session makes its own
      },
    );
  });
}
