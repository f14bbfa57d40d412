// Fast tier: the PROXY header framer and parser (src/proxy/proxy-header.ts). Headers are framed
// the same whether they arrive whole or split at any byte; what HAProxy sends in the cases the
// HAProxy test cannot make (IPv6, LOCAL health checks, UNKNOWN) names the right addresses.
import t from 'tap';
import { frameProxyHeader, parseProxyHeader } from '../../src/proxy/proxy-header.js';

const v2 = (cmd: number, fam: number, addr: Buffer): Buffer => {
  const head = Buffer.from('0d0a0d0a000d0a515549540a', 'hex');
  const len = Buffer.alloc(2);
  len.writeUInt16BE(addr.length);
  return Buffer.concat([head, Buffer.from([0x20 | cmd, fam]), len, addr]);
};
const port = (n: number): Buffer => {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(n);
  return b;
};
const v6 = (text: string): Buffer => {
  // 2001:db8::7 style, enough for the cases below
  const [a = '', b = ''] = text.split('::');
  const left = a === '' ? [] : a.split(':');
  const right = b === '' ? [] : b.split(':');
  const groups = [...left, ...Array<string>(8 - left.length - right.length).fill('0'), ...right];
  return Buffer.concat(groups.map((g) => port(parseInt(g, 16))));
};

const CASES: { name: string; bytes: Buffer; version: 1 | 2; peer: { rip: string; rport: number; lip: string; lport: number } | null }[] = [
  { name: 'v1 TCP4', bytes: Buffer.from('PROXY TCP4 192.0.2.7 192.0.2.1 51234 143\r\n'), version: 1, peer: { rip: '192.0.2.7', rport: 51234, lip: '192.0.2.1', lport: 143 } },
  { name: 'v1 TCP6', bytes: Buffer.from('PROXY TCP6 2001:db8::7 2001:db8::1 51234 993\r\n'), version: 1, peer: { rip: '2001:db8::7', rport: 51234, lip: '2001:db8::1', lport: 993 } },
  { name: 'v1 UNKNOWN', bytes: Buffer.from('PROXY UNKNOWN\r\n'), version: 1, peer: null },
  {
    name: 'v2 PROXY TCP4',
    bytes: v2(1, 0x11, Buffer.concat([Buffer.from([192, 0, 2, 7]), Buffer.from([192, 0, 2, 1]), port(51234), port(143)])),
    version: 2,
    peer: { rip: '192.0.2.7', rport: 51234, lip: '192.0.2.1', lport: 143 },
  },
  {
    name: 'v2 PROXY TCP6, IPv4-mapped source',
    bytes: v2(1, 0x21, Buffer.concat([v6('::ffff:c000:207'), v6('2001:db8::1'), port(40000), port(110)])),
    version: 2,
    peer: { rip: '192.0.2.7', rport: 40000, lip: '2001:db8::1', lport: 110 },
  },
  { name: 'v2 LOCAL (health check)', bytes: v2(0, 0x00, Buffer.alloc(0)), version: 2, peer: null },
];

t.test('headers frame the same whole, split at every byte, and byte by byte', async (t) => {
  for (const c of CASES) {
    const after = Buffer.from('a1 CAPABILITY\r\n');
    const all = Buffer.concat([c.bytes, after]);
    for (let i = 0; i <= c.bytes.length; i++) {
      const f = frameProxyHeader(all.subarray(0, i));
      const want = i < c.bytes.length ? 'more' : 'header';
      if (f.kind !== want) t.fail(`${c.name}: after ${i} bytes: ${f.kind}, expected ${want}`);
    }
    const f = frameProxyHeader(all);
    t.same(f, { kind: 'header', version: c.version, length: c.bytes.length }, `${c.name}: framed, the bytes after it left alone`);
    t.same(parseProxyHeader(c.bytes, c.version), { ok: true, peer: c.peer }, `${c.name}: ${c.peer ? `client ${c.peer.rip}` : 'the connection keeps its own addresses'}`);
  }
});

t.test('bad headers are refused, never waited for', async (t) => {
  t.match(frameProxyHeader(Buffer.from('a1 LOGIN x y\r\n')), { kind: 'bad', why: 'no PROXY header' }, 'IMAP instead of a header');
  t.match(frameProxyHeader(Buffer.from('\x16\x03\x01\x02\x00')), { kind: 'bad' }, 'a TLS ClientHello instead of a header');
  t.match(frameProxyHeader(Buffer.from(`PROXY TCP4 ${'9'.repeat(120)}`)), { kind: 'bad', why: /longer than 107/ }, 'a v1 line without its end within 107 bytes');
  const big = v2(1, 0x11, Buffer.alloc(1500));
  t.match(frameProxyHeader(big.subarray(0, 16)), { kind: 'bad', why: /at most 1500/ }, 'a v2 length over 1500 bytes, known from its first 16');
  for (const [what, line] of [
    ['an address that is none', 'PROXY TCP4 300.0.0.1 192.0.2.1 1 2\r\n'],
    ['IPv6 in TCP4', 'PROXY TCP4 2001:db8::1 192.0.2.1 1 2\r\n'],
    ['a port out of range', 'PROXY TCP4 192.0.2.7 192.0.2.1 70000 143\r\n'],
    ['a missing field', 'PROXY TCP4 192.0.2.7 192.0.2.1 143\r\n'],
  ] as const) {
    const b = Buffer.from(line);
    const f = frameProxyHeader(b);
    t.equal(f.kind, 'header', `${what}: framed as one line`);
    t.match(parseProxyHeader(b, 1), { ok: false, why: /malformed v1 header/ }, `${what}: refused`);
  }
  const v3 = v2(1, 0x11, Buffer.alloc(12));
  v3[12] = 0x31;
  t.match(parseProxyHeader(v3, 2), { ok: false, why: 'unknown PROXY header version' }, 'a v2 signature with version 3');
  t.match(parseProxyHeader(v2(1, 0x11, Buffer.alloc(4)), 2), { ok: false, why: /malformed v2 header/ }, 'a v2 TCP4 header too short for its addresses');
});
