/**
 * NAME        src/anvil/protocol — the node state service's wire format
 * DESCRIPTION Newline-delimited JSON on a unix stream socket. A client sends requests
 *             `{"id":N,"op":"…",…}` and gets one reply per request, `{"id":N,"result":{…}}` or
 *             `{"id":N,"error":"…"}`, in any order. The service may also send events to a
 *             client: `{"ev":"end","conn":"…","reason":"evicted"}` asks the owner to close that
 *             connection; reason `evicted` (a connection limit) or `kicked` (`pigeon kick`).
 *             Requests (version 1):
 *               hello        {pid, role}                   → {pid, version}
 *               conn.open    {conn, ip, proto, trusted, max_per_ip, max_total}
 *                                                          → {admitted, evicted} | {admitted:false, why}
 *               conn.restore {record}                      → {}
 *               conn.login   {conn, user, session, max_userip} → {ok} | {ok:false, why, count?}
 *               conn.logout  {conn}   conn.held {conn, held}   conn.close {conn}   → {}
 *               penalty.get  {key} → {count, age_ms}   penalty.fail {key} → {count}   penalty.clear {key} → {}
 *               conn.backend {conn, backend}                → {}   (the session runs there)
 *               list         {user?}                       → {pid, conns: [record…], counts}
 *               kick         {user, ip?}                   → {kicked: [record…]}
 *             Records are plain objects (owner pid, conn, ip, proto, state, held, user, session,
 *             backend, since). `list` and `kick` first drop the records of processes that are
 *             gone (a worker killed while its link was still open).
 * SECURITY    A line longer than ANVIL_MAX_LINE or one that does not parse ends the connection.
 *             Who may connect is decided by the socket's directory and mode (src/anvil/run-dir.ts).
 */
import { LineBuffer } from '../lines.js';
import { z } from 'zod';
import { isPlainObject } from '../plain-object.js';

export const PROTOCOL_VERSION = 1;

const str = z.string().max(1024);
const count = z.number().int().min(0).max(100_000_000);

export const recordSchema = z.object({
  conn: str,
  ip: str,
  proto: str,
  trusted: z.boolean(),
  state: z.enum(['preauth', 'session']),
  held: z.boolean(),
  user: str.nullable(),
  session: str.nullable(),
  /** absent from a client of an older version: no backend known */
  backend: str.nullable().default(null),
  since: z.number(),
});
export type WireRecord = z.output<typeof recordSchema>;

export const requestSchema = z.discriminatedUnion('op', [
  z.object({ id: count, op: z.literal('hello'), pid: count, role: str }),
  z.object({ id: count, op: z.literal('conn.open'), conn: str, ip: str, proto: str, trusted: z.boolean(), max_per_ip: count, max_total: count }),
  z.object({ id: count, op: z.literal('conn.restore'), record: recordSchema }),
  z.object({ id: count, op: z.literal('conn.login'), conn: str, user: str, session: str, max_userip: count }),
  z.object({ id: count, op: z.literal('conn.logout'), conn: str }),
  z.object({ id: count, op: z.literal('conn.held'), conn: str, held: z.boolean() }),
  z.object({ id: count, op: z.literal('conn.close'), conn: str }),
  z.object({ id: count, op: z.literal('penalty.get'), key: str }),
  z.object({ id: count, op: z.literal('penalty.fail'), key: str }),
  z.object({ id: count, op: z.literal('penalty.clear'), key: str }),
  z.object({ id: count, op: z.literal('conn.backend'), conn: str, backend: str }),
  z.object({ id: count, op: z.literal('list'), user: str.optional() }),
  z.object({ id: count, op: z.literal('kick'), user: str, ip: str.optional() }),
]);
export type Request = z.output<typeof requestSchema>;
export type Op = Request['op'];
/** a request as a client writes it (the client adds the id) */
export type RequestBody = Request extends infer R ? (R extends { id: number } ? Omit<R, 'id'> : never) : never;

export interface ListedRecord extends WireRecord {
  pid: number;
}

export interface Results {
  hello: { pid: number; version: number };
  'conn.open': { admitted: true; evicted: number } | { admitted: false; why: string };
  'conn.restore': Record<string, never>;
  'conn.login': { ok: true } | { ok: false; why: 'userip'; count: number } | { ok: false; why: 'gone' };
  'conn.logout': Record<string, never>;
  'conn.held': Record<string, never>;
  'conn.close': Record<string, never>;
  'penalty.get': { count: number; age_ms: number };
  'penalty.fail': { count: number };
  'penalty.clear': Record<string, never>;
  'conn.backend': Record<string, never>;
  list: { pid: number; conns: ListedRecord[]; counts: { preauth: number; sessions: number; held: number; penalties: number } };
  kick: { kicked: ListedRecord[] };
}

export const replySchema = z.union([
  z.object({ id: count, result: z.record(z.string(), z.unknown()) }),
  z.object({ id: count, error: z.string() }),
  z.object({ ev: z.literal('end'), conn: str, reason: str }),
]);
export type Reply = z.output<typeof replySchema>;

// ---- the hot path
// A login sends the service four to six requests and reads as many replies, each parse on the
// critical path of the login. zod's parse of one is ≈ 1.6 µs in a warm loop and the hand check
// below 0.6 (reply) / 1.2 µs (request, JSON.parse included); in a CPU profile of a serve worker
// under logins zod's parse of the replies stood out far more (≈ 0.09 ms per login, with cold
// caches between logins). The requests and the reply form that carry a login are therefore
// checked by hand; anything the hand check does not
// accept goes to the schemas above, which decide (and word the error). The hand check accepts
// only what the schemas accept and returns what they return (test/anvil.test.ts compares them).

type FieldKind = 'str' | 'count' | 'bool';

const FAST_REQUESTS = new Map<string, readonly (readonly [string, FieldKind])[]>([
  ['conn.open', [['conn', 'str'], ['ip', 'str'], ['proto', 'str'], ['trusted', 'bool'], ['max_per_ip', 'count'], ['max_total', 'count']]],
  ['conn.login', [['conn', 'str'], ['user', 'str'], ['session', 'str'], ['max_userip', 'count']]],
  ['conn.logout', [['conn', 'str']]],
  ['conn.held', [['conn', 'str'], ['held', 'bool']]],
  ['conn.close', [['conn', 'str']]],
  ['penalty.get', [['key', 'str']]],
  ['penalty.fail', [['key', 'str']]],
  ['penalty.clear', [['key', 'str']]],
  ['conn.backend', [['conn', 'str'], ['backend', 'str']]],
]);

function isCount(x: unknown): x is number {
  return typeof x === 'number' && Number.isInteger(x) && x >= 0 && x <= 100_000_000;
}

function fits(kind: FieldKind, x: unknown): boolean {
  if (kind === 'str') return typeof x === 'string' && x.length <= 1024;
  if (kind === 'count') return isCount(x);
  return typeof x === 'boolean';
}

/** A request as requestSchema.parse gives it; throws what it throws. */
export function parseRequest(v: unknown): Request {
  if (isPlainObject(v) && typeof v['op'] === 'string' && isCount(v['id'])) {
    const fields = FAST_REQUESTS.get(v['op']);
    if (fields) {
      const out: Record<string, unknown> = { id: v['id'], op: v['op'] };
      let ok = true;
      for (const [k, kind] of fields) {
        const x = v[k];
        if (!fits(kind, x)) {
          ok = false;
          break;
        }
        out[k] = x;
      }
      if (ok) return out as Request;
    }
  }
  return requestSchema.parse(v);
}

/** A reply as replySchema.parse gives it; throws what it throws. */
export function parseReply(v: unknown): Reply {
  if (isPlainObject(v) && isCount(v['id']) && isPlainObject(v['result'])) return { id: v['id'], result: v['result'] };
  return replySchema.parse(v);
}

/** Splits a byte stream into lines (the one line reader, src/lines.ts); refuses a line longer than `max` bytes. */
export class LineReader {
  private readonly lines = new LineBuffer();
  private readonly max: number;
  constructor(max: number) {
    this.max = max;
  }

  /** Lines completed by `chunk`; throws when a line exceeds the limit. */
  push(chunk: Buffer): string[] {
    this.lines.push(chunk);
    const out: string[] = [];
    for (let r = this.lines.line(this.max + 1); r !== null; r = this.lines.line(this.max + 1)) {
      if (r.kind === 'too-long') throw new Error(`line longer than ${this.max} bytes`);
      out.push(r.line.toString('utf8'));
    }
    return out;
  }
}

/**
 * Read `stream`'s lines through a LineReader of `max` bytes: `lines` gets the lines each chunk
 * completes; `tooLong` gets the error's message when a line exceeds the limit (that chunk's lines
 * are dropped; the caller ends the connection).
 */
export function readLines(stream: { on(event: 'data', f: (chunk: Buffer) => void): unknown }, max: number, lines: (ls: string[]) => void, tooLong: (message: string) => void): void {
  const reader = new LineReader(max);
  stream.on('data', (chunk: Buffer) => {
    let ls: string[];
    try {
      ls = reader.push(chunk);
    } catch (e) {
      tooLong((e as Error).message);
      return;
    }
    lines(ls);
  });
}

export function encode(msg: object): string {
  return `${JSON.stringify(msg)}\n`;
}
