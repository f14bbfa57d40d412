// The relay's pump (src/proxy/splice.ts) between real sockets: a TLS link on one side (as the
// peer link), a plain TCP client on the other (as the client that reached node A).
// What a user checks: every byte arrives, in order, both ways; a reader that stops reading holds
// the relay back instead of filling its memory, and gets everything once it reads again; and what
// the TLS side decrypts in one turn (one chunk per TLS record) reaches the client in one write,
// not one write per record (strace of a peer-link RETR showed four write(2) calls per 64 KiB read).
import t, { type Test } from 'tap';
import { createHash, randomBytes } from 'node:crypto';
import { createServer, connect, type Socket } from 'node:net';
import { createServer as tlsServer, connect as tlsConnect, type TLSSocket } from 'node:tls';
import { once } from 'node:events';
import { createCa, issueHostCert } from '../certs/ca.js';
import { splice } from '../src/proxy/splice.js';

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
}

async function rig(t: Test): Promise<Rig> {
  const ca = await createCa('splice-test');
  const host = await issueHostCert(ca, 'link.test', ['127.0.0.1']);
  const tlsSrv = tlsServer({ key: host.keyPem, cert: host.certPem });
  tlsSrv.listen(0, '127.0.0.1');
  await once(tlsSrv, 'listening');
  const farP = once(tlsSrv, 'secureConnection') as Promise<[TLSSocket]>;
  const tlsPort = (tlsSrv.address() as { port: number }).port;
  const link = tlsConnect({ host: '127.0.0.1', port: tlsPort, ca: ca.certPem, servername: 'link.test' });
  await once(link, 'secureConnect');
  const [far] = await farP;

  const plain = createServer();
  plain.listen(0, '127.0.0.1');
  await once(plain, 'listening');
  const acceptedP = once(plain, 'connection') as Promise<[Socket]>;
  const client = connect((plain.address() as { port: number }).port, '127.0.0.1');
  await once(client, 'connect');
  const [accepted] = await acceptedP;
  accepted.pause(); // as the proxy's client socket is when the login hands it over

  let clientEnded!: () => void;
  let backendEnded!: () => void;
  const ends = {
    clientEnded: new Promise<void>((r) => (clientEnded = r)),
    backendEnded: new Promise<void>((r) => (backendEnded = r)),
  };
  const counts = splice({ client: { input: accepted, output: accepted }, backend: { input: link, output: link } }, { clientEnded: () => clientEnded(), backendEnded: () => backendEnded() });
  t.teardown(() => {
    for (const s of [far, client, link, accepted]) s.destroy();
    tlsSrv.close();
    plain.close();
  });
  return { far, client, link, accepted, ends, counts };
}

function collect(s: Socket): Promise<Buffer> {
  const parts: Buffer[] = [];
  s.on('data', (c: Buffer) => parts.push(c));
  return new Promise((res) => s.once('end', () => res(Buffer.concat(parts))));
}

t.test('both ways, every byte in order; the ends are passed on', async (t) => {
  const r = await rig(t);
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

t.test('a client that stops reading holds the relay back; reading again, it gets everything', async (t) => {
  const r = await rig(t);
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
