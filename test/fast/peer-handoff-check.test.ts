// Fast tier: the peer link's hand-off is checked by hand on the login path (src/peer/protocol.ts
// fastHandOff) and by zod otherwise. The hand check must take every well-formed hand-off (or it
// saves nothing) and must never take one that zod refuses: here thousands of mutations of real
// hand-offs (keys dropped, added, retyped, strings at and past their limits, nested values) are
// put to both.
import t from 'tap';
import { fastHandOff, handOffSchema, newNonce, PEER_PROTOCOL, type HandOff } from '../../src/peer/protocol.js';

const base = (kind: HandOff['kind']): Record<string, unknown> => ({
  proto: PEER_PROTOCOL,
  kind,
  from: 'mx1',
  to: 'mx2',
  user: {
    id: 7,
    address: 'alice@example.org',
    domain: 'example.org',
    domainId: 1,
    state: 'active',
    home: 'mx2',
    allocation: { format: 'maildir', path: '/var/mail/pigeon/example.org/alice', node: 'mx2' },
    version: 3,
    created: '2026-12-06T07:00:00.000Z',
    movingTo: null,
  },
  config: {
    'imap.backend': { value: 'dovecot', from: 'default' },
    'mailstore.quota': { value: 1048576, from: 'domain' },
    'forward.to': { value: ['a@b.c', 'd@e.f'], from: 'user' },
    'x.nested': { value: { a: [1, { b: null }], c: true }, from: 'global' },
  },
  client: kind === 'deliver' || kind.startsWith('move') ? null : { rip: '192.0.2.1', rport: 50000, lip: '127.0.0.2', lport: 143, tls: false },
  session: 'AbCdEf123',
  tag: kind === 'imap' ? 'a1' : null,
  hops: 1,
  nonce: newNonce(),
  ts: 1_780_000_000_000,
  deliver: kind === 'deliver' ? { rcpt: 'alice@example.org', sender: 'bob@example.com', detail: null, original: null, mailbox: null, size: 4096 } : null,
  ...(kind.startsWith('move') ? { move: { from: 'mx1', to: 'mx2', pass: 1, source: { format: 'maildir', path: '/var/mail/pigeon/example.org/alice' } } } : {}),
});

const KINDS: HandOff['kind'][] = ['imap', 'pop3', 'deliver', 'move-out', 'move-in'];

t.test('well-formed hand-offs: the hand check takes them, with what zod gives', async (t) => {
  for (const k of KINDS) {
    const h = base(k);
    const fast = fastHandOff(structuredClone(h));
    const z = handOffSchema.safeParse(structuredClone(h));
    t.ok(z.success, `${k}: zod takes it`);
    t.not(fast, null, `${k}: the hand check takes it`);
    t.same(fast, z.success ? z.data : null, `${k}: the same hand-off`);
  }
});

/** Every path to a value in `o` (objects and arrays), as key lists. */
function paths(o: unknown, at: string[] = []): string[][] {
  if (typeof o !== 'object' || o === null) return [at];
  const out: string[][] = [at];
  for (const k of Object.keys(o)) out.push(...paths((o as Record<string, unknown>)[k], [...at, k]));
  return out;
}

const REPLACEMENTS: unknown[] = [
  undefined, // the key removed
  null,
  true,
  0,
  -1,
  1.5,
  2 ** 53,
  65536,
  '',
  'x',
  'x'.repeat(3),
  'x'.repeat(63),
  'x'.repeat(64),
  'x'.repeat(126),
  'x'.repeat(127),
  'x'.repeat(128),
  'x'.repeat(129),
  'x'.repeat(320),
  'x'.repeat(321),
  'x'.repeat(4097),
  [],
  {},
  ['x'],
  { value: 1, from: 'user' },
  'maildir',
  'mbox',
  'disabled',
  'pop3',
  'user',
  2,
];

t.test('mutated hand-offs: whatever the hand check takes, zod takes too, as the same hand-off', async (t) => {
  let taken = 0;
  let refused = 0;
  let checked = 0;
  for (const k of KINDS) {
    const h = base(k);
    for (const p of paths(h)) {
      if (p.length === 0) continue;
      for (const r of REPLACEMENTS) {
        const m = structuredClone(h);
        let parent = m as Record<string, unknown>;
        for (const key of p.slice(0, -1)) parent = parent[key] as Record<string, unknown>;
        const last = p[p.length - 1] as string;
        if (r === undefined) delete parent[last];
        else parent[last] = structuredClone(r);
        // and an extra key next to it
        const extra = structuredClone(m);
        let ep = extra as Record<string, unknown>;
        for (const key of p.slice(0, -1)) ep = ep[key] as Record<string, unknown>;
        if (!Array.isArray(ep)) ep['unexpected'] = 1;
        for (const x of [m, extra]) {
          checked++;
          const fast = fastHandOff(structuredClone(x));
          const z = handOffSchema.safeParse(structuredClone(x));
          if (fast === null) {
            refused++;
            continue;
          }
          taken++;
          if (!z.success) {
            t.fail(`the hand check took what zod refuses: ${k} ${p.join('.')} = ${JSON.stringify(r)}: ${z.error.issues[0]?.message ?? ''}`);
            return;
          }
          if (JSON.stringify(fast) !== JSON.stringify(z.data)) {
            t.fail(`the hand check gave another hand-off than zod: ${k} ${p.join('.')} = ${JSON.stringify(r)}`);
            return;
          }
        }
      }
    }
  }
  t.ok(checked > 3000, `${checked} mutations checked`);
  t.ok(taken > 100 && refused > 1000, `both kinds met (${taken} taken, ${refused} refused by the hand check)`);
  // the same number of times zod and the hand check agree is not required: where the hand check
  // refuses and zod takes, zod's answer is used (a __proto__ key, an unsafe integer)
  t.pass('no mutation taken by the hand check alone');
});

t.test('what the hand check leaves to zod still gets zod\'s answer', async (t) => {
  const h = base('imap');
  (h['config'] as Record<string, unknown>)['__proto__x'] = { value: 1, from: 'user' };
  t.not(fastHandOff(structuredClone(h)), null, 'an ordinary odd key: taken');
  const deep = base('imap');
  let v: unknown = 1;
  for (let i = 0; i < 80; i++) v = [v];
  (deep['config'] as Record<string, unknown>)['deep'] = { value: v, from: 'user' };
  t.equal(fastHandOff(structuredClone(deep)), null, 'a value nested deeper than 64: left to zod');
  t.ok(handOffSchema.safeParse(deep).success, 'which takes it');
  const missingMove = base('imap');
  const f = fastHandOff(structuredClone(missingMove));
  t.equal(f?.move, null, 'move missing: null, as zod\'s default');
});
