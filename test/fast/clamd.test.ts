// The clamd INSTREAM client's parsing and framing, on a real socket with a scripted server for
// the protocol details the real clamd (test/antivirus.test.ts) cannot be made to vary: the
// answer split into single bytes, a signature name with control bytes, an endless answer, the
// chunk framing of what we send.
import t from 'tap';
import net from 'node:net';
import { connectOptionsOf, parseAnswer, clamdScan, ANSWER_MAX } from '../../src/delivery/clamd.js';

t.test('addresses: a socket path or HOST:PORT', async (t) => {
  t.same(connectOptionsOf('/run/clamav/clamd.ctl'), { path: '/run/clamav/clamd.ctl' });
  t.same(connectOptionsOf('127.0.0.1:3310'), { host: '127.0.0.1', port: 3310 });
  t.same(connectOptionsOf('[::1]:3310'), { host: '::1', port: 3310 });
  t.same(connectOptionsOf('clamav.example.org:3310'), { host: 'clamav.example.org', port: 3310 });
  for (const bad of ['clamd.ctl', '127.0.0.1', '127.0.0.1:0', 'h:99999', 'a b:1']) t.equal(connectOptionsOf(bad), null, bad);
});

t.test('answers', async (t) => {
  t.same(parseAnswer('stream: OK'), { kind: 'clean' });
  t.same(parseAnswer('stream: Eicar-Test-Signature FOUND'), { kind: 'infected', name: 'Eicar-Test-Signature' });
  t.same(parseAnswer('stream: Bad\x01Name\r FOUND'), { kind: 'infected', name: 'Bad_Name_' }, 'control bytes never reach a header');
  t.match(parseAnswer('INSTREAM size limit exceeded. ERROR'), { kind: 'error', reason: /size limit exceeded\. ERROR/ });
  t.match(parseAnswer('stream: FOUND'), { kind: 'error' }, 'FOUND without a name is no verdict');
  t.match(parseAnswer('PONG'), { kind: 'error', reason: /garbage/ });
  t.match(parseAnswer('stream: OK trailing'), { kind: 'error', reason: /garbage/ });
});

async function scripted(onConn: (s: net.Socket, got: () => Buffer) => void): Promise<{ address: string; close: () => Promise<void> }> {
  const srv = net.createServer((s) => {
    let got = Buffer.alloc(0);
    s.on('data', (d: Buffer) => (got = Buffer.concat([got, d])));
    s.on('error', () => undefined);
    onConn(s, () => got);
  });
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', () => r()));
  const port = (srv.address() as net.AddressInfo).port;
  return { address: `127.0.0.1:${port}`, close: () => new Promise<void>((r) => srv.close(() => r())) };
}

async function* chunks(...parts: string[]): AsyncIterable<Buffer> {
  for (const p of parts) yield Buffer.from(p, 'latin1');
}

t.test('framing: zINSTREAM, length-prefixed chunks, a zero length; an answer split into bytes', async (t) => {
  let sent: Buffer = Buffer.alloc(0);
  const s = await scripted((sock, got) => {
    sock.on('data', () => {
      const g = got();
      // the end: the last four bytes are a zero length
      if (g.length >= 14 && g.subarray(g.length - 4).equals(Buffer.alloc(4))) {
        sent = g;
        const answer = 'stream: Split-Sig FOUND\0';
        let i = 0;
        const next = (): void => {
          if (i < answer.length) sock.write(answer[i++] ?? '', () => setImmediate(next));
        };
        next();
      }
    });
  });
  t.teardown(s.close);
  const r = await clamdScan({ address: s.address, timeoutMs: 10_000 }, chunks('head\n\n', 'body'));
  t.same(r, { kind: 'infected', name: 'Split-Sig' });
  const expect = Buffer.concat([Buffer.from('zINSTREAM\0'), Buffer.from([0, 0, 0, 6]), Buffer.from('head\n\n'), Buffer.from([0, 0, 0, 4]), Buffer.from('body'), Buffer.alloc(4)]);
  t.same(sent, expect, 'the bytes on the wire');
});

t.test('an answer that never ends is an error, not a hang', async (t) => {
  const s = await scripted((sock) => {
    sock.once('data', () => sock.write('x'.repeat(ANSWER_MAX + 10)));
  });
  t.teardown(s.close);
  t.match(await clamdScan({ address: s.address, timeoutMs: 10_000 }, chunks('m')), { kind: 'error', reason: /without ending its line/ });
});

t.test('a bad address is an error naming it as such', async (t) => {
  t.match(await clamdScan({ address: 'nonsense', timeoutMs: 1000 }, chunks('m')), { kind: 'error', reason: /neither a socket path nor HOST:PORT/ });
});

t.test('a clamd that goes away while we send: "closed the connection before answering", whatever the socket error', async (t) => {
  const s = await scripted((sock) => {
    sock.once('data', () => sock.destroy());
  });
  t.teardown(s.close);
  async function* big(): AsyncIterable<Buffer> {
    for (let i = 0; i < 64; i++) yield Buffer.alloc(256 * 1024, 0x61);
  }
  for (let i = 0; i < 5; i++) {
    t.match(await clamdScan({ address: s.address, timeoutMs: 10_000 }, big()), { kind: 'error', reason: /^closed the connection before answering/ }, `try ${i + 1}`);
  }
});
