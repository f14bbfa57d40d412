/**
 * NAME        src/peer/protocol — the hand-off message of the peer link (pigeon-peer/1)
 * DESCRIPTION A link is one mutual-TLS 1.3 connection between two registered nodes carrying one
 *             session. The sending node writes one line:
 *                 {"body": "<JSON of the HandOff>", "mac": "<hex>"}\n
 *             mac = HMAC-SHA256(key = TLS exporter (label EXPORTER-pigeon-peer-handoff, context =
 *             the nonce, 32 bytes), data = body). The exporter is unique to this TLS session, so a
 *             hand-off recorded from one link fails on any other, and any altered byte fails the
 *             mac. The receiver also rejects a nonce seen before, a timestamp outside ±60 s, a hop
 *             count past HOP_LIMIT, and a hand-off not addressed to it or not sent by the node the
 *             certificate names. It answers one line, {"ok":true} or {"ok":false,"code","text"};
 *             after ok, IMAP/POP3 bytes flow both ways unframed; a delivery sends `size` message
 *             bytes and gets one more line {"dsn","text"}.
 *             The hand-off carries the user's identity, allocation and resolved configuration:
 *             never a password, hash or key (`wireUser` drops the password field).
 */
import { AppError } from '../errors.js';
import { readLine as readStreamLine } from '../lines.js';
import { z } from 'zod';
import { cryptoModule } from '../builtins.js';
import type { TLSSocket } from 'node:tls';
import type { Duplex, Readable } from 'node:stream';
import type { UserRecord } from '../store.js';
import type { Effective } from '../resolve.js';
import type { Json } from '../settings.js';
import { isPlainObject } from '../plain-object.js';

export const PEER_PROTOCOL = 'pigeon-peer/1';
export const HOP_LIMIT = 7;
export const HANDOFF_MAX_BYTES = 256 * 1024;
export const NONCE_LIFE_MS = 30_000;
export const CLOCK_SKEW_MS = 60_000;
const EXPORTER_LABEL = 'EXPORTER-pigeon-peer-handoff';

const json: z.ZodType<Json> = z.lazy(() => z.union([z.null(), z.boolean(), z.number(), z.string(), z.array(json), z.record(z.string(), json)]));

const allocation = z.strictObject({ format: z.enum(['maildir', 'mbox']), path: z.string().min(1).max(4096), node: z.string().max(63).optional() });

const wireUserSchema = z.strictObject({
  id: z.number().int(),
  address: z.string().min(3).max(320),
  domain: z.string().min(1).max(255),
  domainId: z.number().int(),
  state: z.enum(['active', 'disabled']),
  home: z.string().max(63).nullable(),
  allocation: allocation.nullable(),
  version: z.number().int(),
  created: z.string().max(64),
  movingTo: z.string().max(63).nullable(),
});

const clientSchema = z.strictObject({
  rip: z.string().max(64),
  rport: z.number().int().min(0).max(65535),
  lip: z.string().max(64),
  lport: z.number().int().min(0).max(65535),
  tls: z.boolean(),
});

const deliverSchema = z.strictObject({
  rcpt: z.string().min(3).max(320),
  sender: z.string().max(320),
  detail: z.string().max(320).nullable(),
  original: z.string().max(320).nullable(),
  mailbox: z.string().max(1024).nullable(),
  size: z.number().int().min(0).max(2 ** 40),
});

const moveSchema = z.strictObject({
  from: z.string().min(1).max(63),
  to: z.string().min(1).max(63),
  pass: z.union([z.literal(1), z.literal(2)]),
  source: allocation,
});

export const handOffSchema = z.strictObject({
  proto: z.literal(PEER_PROTOCOL),
  kind: z.enum(['imap', 'pop3', 'deliver', 'move-out', 'move-in']),
  from: z.string().min(1).max(63),
  to: z.string().min(1).max(63),
  user: wireUserSchema,
  config: z.record(z.string().max(128), z.strictObject({ value: json, from: z.enum(['default', 'global', 'domain', 'user']) })),
  client: clientSchema.nullable(),
  session: z.string().min(1).max(64),
  tag: z.string().max(126).nullable(),
  hops: z.number().int(),
  nonce: z.string().regex(/^[A-Za-z0-9+/]{43}=$/, '256-bit base64 nonce'),
  ts: z.number().int(),
  deliver: deliverSchema.nullable(),
  move: moveSchema.nullable().default(null),
});

export type HandOff = z.output<typeof handOffSchema>;
export type WireUser = HandOff['user'];
export type HandOffKind = HandOff['kind'];
export type MoveSpec = NonNullable<HandOff['move']>;

export interface Reply {
  readonly ok: boolean;
  readonly code?: string;
  readonly text?: string;
}

/** The user as it may cross the network: everything but the password. */
export function wireUser(u: UserRecord): WireUser {
  return {
    id: u.id,
    address: u.address,
    domain: u.domain,
    domainId: u.domainId,
    state: u.state,
    home: u.home,
    allocation: u.allocation ? { format: u.allocation.format, path: u.allocation.path, ...(u.allocation.node !== undefined ? { node: u.allocation.node } : {}) } : null,
    version: u.version,
    created: u.created,
    movingTo: u.movingTo,
  };
}

export function fromWireUser(w: WireUser): UserRecord {
  const a = w.allocation;
  return { ...w, password: null, allocation: a === null ? null : { format: a.format, path: a.path, ...(a.node !== undefined ? { node: a.node } : {}) } };
}

export function wireConfig(e: Effective): HandOff['config'] {
  const out: HandOff['config'] = {};
  for (const [k, v] of Object.entries(e)) out[k] = { value: v.value, from: v.from };
  return out;
}

export function fromWireConfig(c: HandOff['config']): Effective {
  const out: Effective = {};
  for (const [k, v] of Object.entries(c)) out[k] = { value: v.value, from: v.from, ignored: [] };
  return out;
}

export function newNonce(): string {
  return cryptoModule().randomBytes(32).toString('base64');
}

function macKey(sock: TLSSocket, nonce: string): Buffer {
  return sock.exportKeyingMaterial(32, EXPORTER_LABEL, Buffer.from(nonce, 'base64'));
}

/** The line the sending node writes: body + mac bound to this TLS session. */
export function sealHandOff(sock: TLSSocket, h: HandOff): Buffer {
  const body = JSON.stringify(h);
  const mac = cryptoModule().createHmac('sha256', macKey(sock, h.nonce)).update(body).digest('hex');
  return Buffer.from(`${JSON.stringify({ body, mac })}\n`);
}

// --- the hand-off's shape, checked by hand on the login path ---------------------------------
// A received login waits for this check on the home node. zod's safeParse of a hand-off costs
// ≈ 200 µs there (p50 over 300 logins through the link: its generic machinery, called once per
// login, never stays hot), a third of what the home node spends between the hand-off and the
// backend's start. `fastHandOff` checks the same schema directly; it may refuse more than
// handOffSchema (then zod decides, and gives its error text), never less:
// test/fast/peer-handoff-check.test.ts holds it to that with mutated hand-offs.

type Obj = Record<string, unknown>;
/** exactly these keys (optional ones may be missing), none named __proto__ (zod decides those) */
function keysAre(o: Obj, required: readonly string[], optional: readonly string[] = []): boolean {
  let n = 0;
  for (const k of Object.keys(o)) {
    if (required.includes(k)) n++;
    else if (!optional.includes(k)) return false;
  }
  return n === required.length;
}
const str = (v: unknown, min: number, max: number): boolean => typeof v === 'string' && v.length >= min && v.length <= max;
const int = (v: unknown): boolean => typeof v === 'number' && Number.isSafeInteger(v);
const oneOf = (v: unknown, values: readonly string[]): boolean => typeof v === 'string' && values.includes(v);
function isJsonValue(v: unknown, depth = 0): boolean {
  if (v === null || typeof v === 'boolean' || typeof v === 'string') return true;
  if (typeof v === 'number') return Number.isFinite(v);
  if (depth > 64) return false;
  if (Array.isArray(v)) {
    // every index, holes included (every() would skip a hole, which zod refuses)
    for (let i = 0; i < v.length; i++) if (!isJsonValue(v[i], depth + 1)) return false;
    return true;
  }
  if (!isPlainObject(v)) return false;
  for (const k of Object.keys(v)) if (k === '__proto__' || !isJsonValue(v[k], depth + 1)) return false;
  return true;
}
function isAllocation(v: unknown): boolean {
  return isPlainObject(v) && keysAre(v, ['format', 'path'], ['node']) && oneOf(v['format'], ['maildir', 'mbox']) && str(v['path'], 1, 4096) && (v['node'] === undefined || str(v['node'], 0, 63));
}
const USER_KEYS = ['id', 'address', 'domain', 'domainId', 'state', 'home', 'allocation', 'version', 'created', 'movingTo'];
function isWireUser(v: unknown): boolean {
  return (
    isPlainObject(v) &&
    keysAre(v, USER_KEYS) &&
    int(v['id']) &&
    str(v['address'], 3, 320) &&
    str(v['domain'], 1, 255) &&
    int(v['domainId']) &&
    oneOf(v['state'], ['active', 'disabled']) &&
    (v['home'] === null || str(v['home'], 0, 63)) &&
    (v['allocation'] === null || isAllocation(v['allocation'])) &&
    int(v['version']) &&
    str(v['created'], 0, 64) &&
    (v['movingTo'] === null || str(v['movingTo'], 0, 63))
  );
}
function isWireConfig(v: unknown): boolean {
  if (!isPlainObject(v)) return false;
  for (const k of Object.keys(v)) {
    const e = v[k];
    if (k === '__proto__' || k.length > 128 || !isPlainObject(e) || !keysAre(e, ['value', 'from']) || !oneOf(e['from'], ['default', 'global', 'domain', 'user']) || !isJsonValue(e['value'])) return false;
  }
  return true;
}
const port = (v: unknown): boolean => int(v) && (v as number) >= 0 && (v as number) <= 65535;
function isClient(v: unknown): boolean {
  return isPlainObject(v) && keysAre(v, ['rip', 'rport', 'lip', 'lport', 'tls']) && str(v['rip'], 0, 64) && port(v['rport']) && str(v['lip'], 0, 64) && port(v['lport']) && typeof v['tls'] === 'boolean';
}
const nullableStr = (v: unknown, max: number): boolean => v === null || str(v, 0, max);
function isDeliver(v: unknown): boolean {
  return (
    isPlainObject(v) &&
    keysAre(v, ['rcpt', 'sender', 'detail', 'original', 'mailbox', 'size']) &&
    str(v['rcpt'], 3, 320) &&
    str(v['sender'], 0, 320) &&
    nullableStr(v['detail'], 320) &&
    nullableStr(v['original'], 320) &&
    nullableStr(v['mailbox'], 1024) &&
    int(v['size']) &&
    (v['size'] as number) >= 0 &&
    (v['size'] as number) <= 2 ** 40
  );
}
function isMove(v: unknown): boolean {
  return isPlainObject(v) && keysAre(v, ['from', 'to', 'pass', 'source']) && str(v['from'], 1, 63) && str(v['to'], 1, 63) && (v['pass'] === 1 || v['pass'] === 2) && isAllocation(v['source']);
}
const HANDOFF_KEYS = ['proto', 'kind', 'from', 'to', 'user', 'config', 'client', 'session', 'tag', 'hops', 'nonce', 'ts', 'deliver'];

/** `inner` as a HandOff when it passes handOffSchema's checks (checked here by hand); null: let zod decide. */
export function fastHandOff(inner: unknown): HandOff | null {
  if (!isPlainObject(inner) || !keysAre(inner, HANDOFF_KEYS, ['move'])) return null;
  const ok =
    inner['proto'] === PEER_PROTOCOL &&
    oneOf(inner['kind'], ['imap', 'pop3', 'deliver', 'move-out', 'move-in']) &&
    str(inner['from'], 1, 63) &&
    str(inner['to'], 1, 63) &&
    isWireUser(inner['user']) &&
    isWireConfig(inner['config']) &&
    (inner['client'] === null || isClient(inner['client'])) &&
    str(inner['session'], 1, 64) &&
    nullableStr(inner['tag'], 126) &&
    int(inner['hops']) &&
    typeof inner['nonce'] === 'string' &&
    /^[A-Za-z0-9+/]{43}=$/.test(inner['nonce']) &&
    int(inner['ts']) &&
    (inner['deliver'] === null || isDeliver(inner['deliver'])) &&
    (inner['move'] === undefined || inner['move'] === null || isMove(inner['move']));
  if (!ok) return null;
  // zod's default for a missing move
  return (inner['move'] === undefined ? { ...inner, move: null } : inner) as HandOff;
}

export type Opened = { ok: true; handOff: HandOff } | { ok: false; code: string; text: string };

/** Check a received line's framing, mac (against this TLS session) and schema. */
export function openHandOff(sock: TLSSocket, line: Buffer): Opened {
  let outer: unknown;
  try {
    outer = JSON.parse(line.toString('utf8'));
  } catch {
    return { ok: false, code: 'malformed', text: 'hand-off is not JSON' };
  }
  if (typeof outer !== 'object' || outer === null || !('body' in outer) || !('mac' in outer) || typeof outer.body !== 'string' || typeof outer.mac !== 'string') {
    return { ok: false, code: 'malformed', text: 'hand-off needs body and mac' };
  }
  let inner: unknown;
  try {
    inner = JSON.parse(outer.body);
  } catch {
    return { ok: false, code: 'malformed', text: 'hand-off body is not JSON' };
  }
  const nonce = typeof inner === 'object' && inner !== null && 'nonce' in inner && typeof inner.nonce === 'string' ? inner.nonce : '';
  if (!/^[A-Za-z0-9+/]{43}=$/.test(nonce)) return { ok: false, code: 'malformed', text: 'hand-off nonce missing or not 256 bits' };
  const want = cryptoModule().createHmac('sha256', macKey(sock, nonce)).update(outer.body).digest();
  const got = /^[0-9a-f]{64}$/.test(outer.mac) ? Buffer.from(outer.mac, 'hex') : Buffer.alloc(32);
  if (!cryptoModule().timingSafeEqual(want, got)) return { ok: false, code: 'bad-mac', text: 'hand-off mac does not match this TLS session (replayed or altered)' };
  const fast = fastHandOff(inner);
  if (fast !== null) return { ok: true, handOff: fast };
  const r = handOffSchema.safeParse(inner);
  if (!r.success) return { ok: false, code: 'malformed', text: `hand-off invalid: ${r.error.issues.slice(0, 3).map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}` };
  return { ok: true, handOff: r.data };
}

/** Nonces seen in the last NONCE_LIFE_MS + skew: a nonce is accepted once. */
export class NonceCache {
  private seen = new Map<string, number>();

  /** true when new (and remembers it); false when seen before */
  admit(nonce: string, now = Date.now()): boolean {
    if (this.seen.size > 10_000) for (const [n, t] of this.seen) if (now - t > NONCE_LIFE_MS + CLOCK_SKEW_MS) this.seen.delete(n);
    const t = this.seen.get(nonce);
    if (t !== undefined && now - t <= NONCE_LIFE_MS + CLOCK_SKEW_MS) return false;
    this.seen.set(nonce, now);
    return true;
  }
}

/**
 * Read one LF-terminated line of at most `max` bytes within `timeoutMs` (the one line reader,
 * src/lines.ts); bytes after it are put back (unshift) for whoever reads next. Rejects on EOF,
 * overlong line or timeout; a link closed before a single byte rejects with PEER_UNUSED (an unused
 * link: a spare dropped by its node, not a fault), after some with PEER_CLOSED.
 */
export function readLine(s: Duplex, max: number, timeoutMs: number): Promise<Buffer> {
  return readStreamLine(s, {
    max: max + 1, // the line and its LF
    timeoutMs,
    fail: {
      tooLong: () => new Error(`line longer than ${max} bytes`),
      timeout: () => new Error(`no complete line within ${timeoutMs / 1000}s`),
      closed: (empty) => new AppError(empty ? 'PEER_UNUSED' : 'PEER_CLOSED', 'connection closed'),
    },
  });
}

export function replyLine(r: Reply | Record<string, Json>): Buffer {
  return Buffer.from(`${JSON.stringify(r)}\n`);
}

/** Write with backpressure; rejects if the link closes first. */
export function writeAll(sock: Duplex, b: Buffer): Promise<void> {
  return new Promise((resolve, reject) => {
    if (sock.destroyed) return reject(new Error('link closed'));
    if (sock.write(b)) return resolve();
    const onDrain = (): void => {
      sock.off('close', onClose);
      resolve();
    };
    const onClose = (): void => {
      sock.off('drain', onDrain);
      reject(new Error('link closed while sending'));
    };
    sock.once('drain', onDrain);
    sock.once('close', onClose);
  });
}

/** The next chunk of an async iterator, or a rejection after `ms` without one. */
export async function nextWithin(it: AsyncIterator<Buffer>, ms: number, what: string): Promise<IteratorResult<Buffer>> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      it.next(),
      new Promise<never>((_, rej) => {
        timer = setTimeout(() => rej(new Error(what)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Exactly `n` bytes from `sock` (read through `it`, the socket's one async iterator), as chunks;
 * bytes past them are put back for the next reader. Fails on EOF or `stallMs` without data.
 */
export async function* exactBytes(it: AsyncIterator<Buffer>, sock: Readable, n: number, stallMs: number): AsyncIterable<Buffer> {
  let left = n;
  while (left > 0) {
    const next = await nextWithin(it, stallMs, `stalled with ${left} bytes to go`);
    if (next.done) throw new Error(`link closed with ${left} bytes to go`);
    const c = next.value;
    if (c.length <= left) {
      left -= c.length;
      yield c;
    } else {
      yield c.subarray(0, left);
      sock.unshift(c.subarray(left));
      left = 0;
    }
  }
}
