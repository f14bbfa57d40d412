// The relay's pump (src/proxy/splice.ts) between real sockets: a TLS link on one side (as the
// peer link), a plain TCP client on the other (as the client that reached node A).
// What a user checks: every byte arrives, in order, both ways; a reader that stops reading holds
// the relay back instead of filling its memory, and gets everything once it reads again; and what
// the TLS side decrypts in one turn (one chunk per TLS record) reaches the client in one write,
// not one write per record (strace of a peer-link RETR showed four write(2) calls per 64 KiB read).
// The links a node dials read into buffers the relay reuses (src/proxy/own-reads.ts): the same
// checks run over such a link, and its buffers are reused while the client keeps up.
import t, { type Test } from 'tap';
import { createHash, randomBytes } from 'node:crypto';
import { createServer, connect, type Server, type Socket, type TcpSocketConnectOpts } from 'node:net';
import { createServer as tlsServer, connect as tlsConnect, type ConnectionOptions, type TLSSocket } from 'node:tls';
import { once } from 'node:events';
import { PassThrough, Writable } from 'node:stream';
import { createCa, issueHostCert } from '../certs/ca.js';
import { splice } from '../src/proxy/splice.js';
import { ownReads, BULK, type OnRead, type OwnReader } from '../src/proxy/own-reads.js';

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

interface Rig {
  /** the far end of the TLS link (it plays the backend node) */
  readonly far: TLSSocket;
  /** the client's own socket (it plays the mail client) */
  readonly client: Socket;
  /** the relay's two sockets */
  readonly link: TLSSocket;
  readonly accepted: Socket;
  readonly ends: { clientEnded: Promise<void>; backendEnded: Promise<void> };
  readonly counts: { readonly bytesIn: number; readonly bytesOut: number };
  /** the link's reader when it reads into the relay's buffers */
  readonly reader: OwnReader | null;
}

/**
 * A connected pair on loopback: `near` dialed by `dial` (reading into `reader`'s buffers when
 * given), `far` accepted by `srv`; both closed at the test's end.
 */
async function loopbackPair<S extends Socket>(t: Test, srv: Server, accepted: string, ready: string, reader: OwnReader | null, dial: (port: number, onread: { onread?: OnRead }) => S): Promise<{ near: S; far: S }> {
  srv.listen(0, '127.0.0.1');
  await once(srv, 'listening');
  const farP = once(srv, accepted) as Promise<[S]>;
  const near = dial((srv.address() as { port: number }).port, reader ? { onread: reader.onread } : {});
  reader?.attach(near);
  await once(near, ready);
  const [far] = await farP;
  t.teardown(() => {
    far.destroy();
    near.destroy();
    srv.close();
  });
  return { near, far };
}

/** A connected TLS pair (a link: `near` is the dialing node's end). */
async function tlsPair(t: Test, reader: OwnReader | null = null): Promise<{ near: TLSSocket; far: TLSSocket }> {
  const ca = await createCa('splice-test');
  const host = await issueHostCert(ca, 'link.test', ['127.0.0.1']);
  const srv = tlsServer({ key: host.keyPem, cert: host.certPem });
  return loopbackPair(t, srv, 'secureConnection', 'secureConnect', reader, (port, onread) => {
    const opts: ConnectionOptions & { onread?: OnRead } = { host: '127.0.0.1', port, ca: ca.certPem, servername: 'link.test', ...onread };
    return tlsConnect(opts);
  });
}

/** A connected TCP pair. */
function tcpPair(t: Test, reader: OwnReader | null = null): Promise<{ near: Socket; far: Socket }> {
  return loopbackPair(t, createServer(), 'connection', 'connect', reader, (port, onread) => {
    const opts: TcpSocketConnectOpts & { onread?: OnRead } = { host: '127.0.0.1', port, ...onread };
    return connect(opts);
  });
}

/**
 * `own`: the link reads into the relay's buffers, as the links src/peer/link.ts dials; `early`:
 * the backend sends these bytes first, and the link has read them before the relay takes it
 */
async function rig(t: Test, own = false, early: Buffer | null = null): Promise<Rig> {
  const reader = own ? ownReads() : null;
  const { near: link, far } = await tlsPair(t, reader);
  const { near: client, far: accepted } = await tcpPair(t);
  accepted.pause(); // as the proxy's client socket is when the login hands it over

  let clientEnded!: () => void;
  let backendEnded!: () => void;
  const ends = {
    clientEnded: new Promise<void>((r) => (clientEnded = r)),
    backendEnded: new Promise<void>((r) => (backendEnded = r)),
  };
  if (early !== null) {
    far.write(early);
    const readable = (): void => undefined;
    link.on('readable', readable);
    while (link.readableLength < early.length) await once(link, 'readable');
    link.off('readable', readable);
  }
  const counts = splice({ client: { input: accepted, output: accepted }, backend: { input: link, output: link } }, { clientEnded: () => clientEnded(), backendEnded: () => backendEnded() });
  return { far, client, link, accepted, ends, counts, reader };
}

function collect(s: Socket): Promise<Buffer> {
  const parts: Buffer[] = [];
  s.on('data', (c: Buffer) => parts.push(c));
  return new Promise((res) => s.once('end', () => res(Buffer.concat(parts))));
}

for (const own of [false, true])
t.test(`both ways, every byte in order; the ends are passed on${own ? ' (the link reads into the relay\'s buffers)' : ''}`, async (t) => {
  const r = await rig(t, own);
  const down = randomBytes(5 * 1024 * 1024 + 17);
  const up = randomBytes(2 * 1024 * 1024 + 5);
  const gotDown = collect(r.client);
  const gotUp = collect(r.far);
  // odd write sizes, small and large, as a backend and a client make them
  for (let i = 0, n = 1; i < down.length; i += n, n = (n * 7 + 13) % 200_000) r.far.write(down.subarray(i, i + n));
  for (let i = 0, n = 3; i < up.length; i += n, n = (n * 5 + 11) % 90_000) r.client.write(up.subarray(i, i + n));
  r.client.end();
  // as a backend does: it answers, sees the client's end, then leaves
  const u = await gotUp;
  r.far.end();
  const d = await gotDown;
  t.equal(d.length, down.length, 'the client got every byte the backend sent');
  t.equal(sha(d), sha(down), 'in order');
  t.equal(u.length, up.length, 'the backend got every byte the client sent');
  t.equal(sha(u), sha(up), 'in order');
  await Promise.all([r.ends.clientEnded, r.ends.backendEnded]);
  t.equal(r.counts.bytesOut, down.length, 'bytes out counted');
  t.equal(r.counts.bytesIn, up.length, 'bytes in counted');
});

t.test('what the TLS side gives in one turn goes to the client in one write', async (t) => {
  const r = await rig(t);
  // count the writes the relay makes on the client's socket: one _writev per batch, one _write per single chunk
  let writes = 0;
  let chunks = 0;
  const s = r.accepted as Socket & { _write: (...a: unknown[]) => void; _writev: (...a: unknown[]) => void };
  const w1 = s._write.bind(s);
  const wv = s._writev.bind(s);
  s._write = (...a: unknown[]): void => {
    writes++;
    chunks++;
    w1(...a);
  };
  s._writev = (...a: unknown[]): void => {
    writes++;
    chunks += (a[0] as unknown[]).length;
    wv(...a);
  };
  const body = randomBytes(8 * 1024 * 1024);
  const got = collect(r.client);
  // large writes: 16 KiB records, several per read on the relay's side
  for (let i = 0; i < body.length; i += 256 * 1024) r.far.write(body.subarray(i, i + 256 * 1024));
  r.far.end();
  const d = await got;
  t.equal(sha(d), sha(body), 'every byte, in order');
  t.ok(chunks >= body.length / 16384, `the link gave at least one chunk per TLS record (${chunks})`);
  t.ok(writes * 2 <= chunks, `the client's socket got ${writes} writes for ${chunks} chunks: batched, not one write per record`);
});

for (const own of [false, true])
t.test(`a client that stops reading holds the relay back; reading again, it gets everything${own ? ' (the link reads into the relay\'s buffers)' : ''}`, async (t) => {
  const r = await rig(t, own);
  r.client.pause();
  const body = randomBytes(48 * 1024 * 1024);
  let written = 0;
  const feed = (): void => {
    while (written < body.length) {
      const ok = r.far.write(body.subarray(written, written + 64 * 1024));
      written += 64 * 1024;
      if (!ok) {
        r.far.once('drain', feed);
        return;
      }
    }
    r.far.end();
  };
  const paused = once(r.link, 'pause');
  feed();
  // the client's kernel buffers fill, then the relay's queue: the relay stops reading the link
  await paused;
  t.ok(written < body.length, `the relay paused the link before the backend had sent everything (${written} of ${body.length} bytes written)`);
  t.ok(r.accepted.writableLength <= 512 * 1024, `the relay queues little for the slow client (${r.accepted.writableLength} bytes)`);
  const got = collect(r.client);
  r.client.resume();
  const d = await got;
  t.equal(d.length, body.length, 'then every byte arrives');
  t.equal(sha(d), sha(body), 'in order');
});

t.test('a link that reads into the relay\'s buffers reuses them while the client keeps up', async (t) => {
  // bytes the link read before the relay took it (a backend's first answer) come first, as they were
  const early = Buffer.from('* OK [CAPABILITY IMAP4rev1] ready\r\n');
  const r = await rig(t, true, early);
  const reader = r.reader as OwnReader;
  const body = randomBytes(16 * 1024 * 1024);
  const got = collect(r.client);
  for (let i = 0; i < body.length; i += 256 * 1024) r.far.write(body.subarray(i, i + 256 * 1024));
  r.far.end();
  const d = await got;
  t.equal(sha(d), sha(Buffer.concat([early, body])), 'every byte, in order');
  const reads = Math.ceil(body.length / 16384);
  t.ok(reader.buffers * 4 < reads, `${reader.buffers} buffers of its own for at least ${reads} reads (one per TLS record): reused, not one per read`);
  t.ok(BULK <= 16384, 'a full TLS record is bulk');
});

/** A connected socket that reads into the relay's buffers and its far end: a TLS link (node A's) or a plain socket (node B's pair to its backend). */
async function ownSource(t: Test, kind: 'tls' | 'plain'): Promise<{ src: Socket; far: Socket; reader: OwnReader }> {
  const reader = ownReads();
  const { near, far } = kind === 'tls' ? await tlsPair(t, reader) : await tcpPair(t, reader);
  return { src: near, far, reader };
}

t.test('before the relay takes it, a link that reads into the relay\'s buffers reads as any socket', async (t) => {
  // its own socket, not spliced: the hand-off's answer and the pool's watchers read it this way
  const { src: link, far } = await ownSource(t, 'tls');
  const body = randomBytes(3 * 1024 * 1024 + 7);
  const chunks: Buffer[] = [];
  link.on('data', (c: Buffer) => chunks.push(c));
  // paused half way: nothing more comes until resumed, and what came stays intact (own copies)
  far.write(body.subarray(0, 1024 * 1024));
  await new Promise<void>((res) => {
    const check = (): void => {
      if (chunks.reduce((n, c) => n + c.length, 0) >= 1024 * 1024) res();
      else link.once('data', check);
    };
    check();
  });
  link.pause();
  far.end(body.subarray(1024 * 1024));
  await once(far, 'finish');
  t.equal(link.isPaused(), true, 'paused as any socket');
  link.resume();
  await once(link, 'end');
  const d = Buffer.concat(chunks);
  t.equal(sha(d), sha(body), 'every byte in order, no chunk overwritten by a later read');
});

for (const kind of ['tls', 'plain'] as const)
t.test(`a buffer a slow destination still holds is never read into again (${kind === 'tls' ? 'a TLS link' : 'a plain socket'})`, async (t) => {
  const { src, far } = await ownSource(t, kind);
  // a destination that takes each chunk now and reads its bytes later, as the kernel does with
  // the rest of a partial write (libuv keeps a pointer to it), and has room for much (no pause)
  const got: Buffer[] = [];
  const held = new Writable({
    highWaterMark: 64 * 1024 * 1024,
    write(chunk: Buffer, _enc, done) {
      // the bytes are read only once the write completes, a turn later
      setImmediate(() => {
        got.push(Buffer.from(chunk));
        done();
      });
    },
  });
  const finished = once(held, 'finish');
  const quiet = new PassThrough();
  splice({ client: { input: quiet, output: held }, backend: { input: src, output: src } }, { clientEnded: () => undefined, backendEnded: () => undefined });
  const body = randomBytes(8 * 1024 * 1024);
  // write sizes as Dovecot's pop3 (4 KiB) and imap make them, short and long
  for (let i = 0, n = 4096; i < body.length; i += n, n = n === 4096 ? 200_000 : n === 200_000 ? 777 : 4096) far.write(body.subarray(i, i + n));
  far.end();
  await finished;
  t.equal(sha(Buffer.concat(got)), sha(body), 'every byte as sent: no chunk was overwritten while the destination held it');
  quiet.end();
});

t.test('a plain socket that reads into the relay\'s buffers, to a TLS destination whose reader stops: every byte intact', async (t) => {
  // node B's path: Dovecot's socket pair → the peer link; the relay reuses a buffer once node:tls
  // has encrypted what it was given, also while the link has encrypted bytes still queued
  const { src, far } = await ownSource(t, 'plain');
  const { near: link, far: nodeA } = await tlsPair(t);
  nodeA.pause();
  const quiet = new PassThrough();
  splice({ client: { input: quiet, output: link }, backend: { input: src, output: src } }, { clientEnded: () => undefined, backendEnded: () => undefined });
  const body = randomBytes(24 * 1024 * 1024);
  let written = 0;
  const feed = (): void => {
    while (written < body.length) {
      const n = written % 3 === 0 ? 4096 : 61_000;
      const ok = far.write(body.subarray(written, written + n));
      written += n;
      if (!ok) {
        far.once('drain', feed);
        return;
      }
    }
    far.end();
  };
  const paused = once(src, 'pause');
  feed();
  await paused; // the link's reader holds the relay back
  const got = collect(nodeA);
  nodeA.resume();
  const d = await got;
  t.equal(d.length, body.length, 'every byte arrives');
  t.equal(sha(d), sha(body), 'in order, none overwritten');
  quiet.end();
});
