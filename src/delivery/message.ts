/**
 * NAME        src/delivery/message — spool one incoming message, header section apart
 * DESCRIPTION `spool(input)` reads the message once: CRLF becomes LF (the on-disk form Maildir
 *             and mbox readers expect; a bare CR stays), the header section is kept in memory
 *             (at most HEAD_MAX bytes) and parsed into fields, the body is kept in memory up to
 *             MEMORY_MAX and then spilled to an unlinked temporary file, so a 100 MB message never
 *             sits whole in memory. Every delivery module then reads the body as often as it needs.
 *             A message with no header section (first line not a header), a header section that
 *             ends without a blank line, NUL bytes and 8-bit data are all kept byte for byte; a
 *             leading mbox "From " postmark is dropped (as dovecot-lda does).
 *             Past `limit` bytes the rest is read and discarded and `oversized` is set.
 * SECURITY    Header values are only compared, never executed or put in file names.
 */
import { open, unlink, type FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { cryptoModule } from '../builtins.js';

export const HEAD_MAX = 256 * 1024;
export const MEMORY_MAX = 1024 * 1024;
const CHUNK = 256 * 1024;

export interface HeaderField {
  /** lower-case field name */
  readonly name: string;
  /** unfolded value, decoded as latin1 (compare only) */
  readonly value: string;
}

const STRICT_UTF8 = new TextDecoder('utf-8', { fatal: true });

/**
 * A header value as text: values are kept as latin1 strings (one character per byte, for
 * comparisons); a value that goes anywhere (an envelope address, a header of a reply) must be
 * its bytes decoded as UTF-8. null when they are not UTF-8.
 */
export function headerText(value: string): string | null {
  try {
    return STRICT_UTF8.decode(Buffer.from(value, 'latin1'));
  } catch {
    return null;
  }
}

export interface Spooled {
  /** header lines as received (LF line ends), without the separating blank line */
  readonly head: Buffer;
  /** head without Return-Path fields (the delivery writes the envelope's own) */
  readonly headNoReturnPath: Buffer;
  readonly fields: readonly HeaderField[];
  readonly bodySize: number;
  /** LF count of the body, for the CRLF size (Maildir W=) */
  readonly bodyLines: number;
  /** bytes read from the input, after CRLF → LF */
  readonly size: number;
  readonly oversized: boolean;
  /**
   * The body bytes, from the start, as often as needed. With `reuse` one buffer is recycled:
   * the consumer must be done with a chunk (written it) before asking for the next one.
   */
  body(reuse?: boolean): AsyncIterable<Buffer>;
  /** all values of a header field (lower-case name) */
  get(name: string): string[];
  close(): Promise<void>;
}

const isHeaderLine = (l: Buffer): boolean => {
  // field-name = 1*(%d33-57 / %d59-126) ":"
  let i = 0;
  for (; i < l.length; i++) {
    const c = l[i] ?? 0;
    if (c === 0x3a) return i > 0;
    if (c < 33 || c > 126) return false;
  }
  return false;
};

function countLf(b: Buffer): number {
  let n = 0;
  let i = b.indexOf(10);
  while (i >= 0) {
    n++;
    i = b.indexOf(10, i + 1);
  }
  return n;
}

/** CRLF → LF across chunk boundaries (a CR at the end of a chunk waits for the next one). */
class CrlfToLf {
  private cr = false;
  push(chunk: Buffer): Buffer {
    let b = chunk;
    if (this.cr) {
      b = Buffer.concat([Buffer.from([13]), b]);
      this.cr = false;
    }
    if (b.length > 0 && b[b.length - 1] === 13) {
      this.cr = true;
      b = b.subarray(0, b.length - 1);
    }
    let i = b.indexOf('\r\n');
    if (i < 0) return b;
    const parts: Buffer[] = [];
    let from = 0;
    while (i >= 0) {
      parts.push(b.subarray(from, i));
      from = i + 1; // keep the LF
      i = b.indexOf('\r\n', from);
    }
    parts.push(b.subarray(from));
    return Buffer.concat(parts);
  }
  end(): Buffer {
    const r = this.cr ? Buffer.from([13]) : Buffer.alloc(0);
    this.cr = false;
    return r;
  }
}

interface SplitHead {
  head: Buffer;
  rest: Buffer;
}

/** Split a candidate header block into real header lines and the body start. */
function splitHead(buf: Buffer, complete: boolean): SplitHead {
  let pos = 0;
  // mbox postmark
  if (buf.subarray(0, 5).toString('latin1') === 'From ') {
    const nl = buf.indexOf(10);
    if (nl >= 0) pos = nl + 1;
  }
  const start = pos;
  let first = true;
  for (;;) {
    const nl = buf.indexOf(10, pos);
    if (nl < 0) {
      // last line without LF: at EOF it may still be a header line
      if (!complete || pos >= buf.length) break;
      const line = buf.subarray(pos);
      if ((first && isHeaderLine(line)) || (!first && (line[0] === 32 || line[0] === 9 || isHeaderLine(line)))) {
        return { head: Buffer.concat([buf.subarray(start), Buffer.from('\n')]), rest: Buffer.alloc(0) };
      }
      break;
    }
    const line = buf.subarray(pos, nl);
    if (line.length === 0) {
      // the blank separator line: consumed
      return { head: buf.subarray(start, pos), rest: buf.subarray(nl + 1) };
    }
    const ok = first ? isHeaderLine(line) : line[0] === 32 || line[0] === 9 || isHeaderLine(line);
    if (!ok) break;
    first = false;
    pos = nl + 1;
  }
  // header section ended without a blank line (or there is none): the rest is body
  return { head: buf.subarray(start, pos), rest: buf.subarray(pos) };
}

function parseFields(head: Buffer): HeaderField[] {
  const out: HeaderField[] = [];
  const text = head.toString('latin1');
  for (const raw of text.split(/\n(?![ \t])/)) {
    if (raw === '') continue;
    const c = raw.indexOf(':');
    if (c <= 0) continue;
    out.push({ name: raw.slice(0, c).toLowerCase(), value: raw.slice(c + 1).replace(/\n[ \t]/g, ' ').trim() });
  }
  return out;
}

function dropFields(head: Buffer, name: string): Buffer {
  const text = head.toString('latin1');
  const re = new RegExp(`^${name}:`, 'i');
  const lines = text.split(/(?<=\n)(?![ \t])/);
  const kept = lines.filter((l) => !re.test(l));
  return kept.length === lines.length ? head : Buffer.from(kept.join(''), 'latin1');
}

export interface SpoolOptions {
  /** discard the body past this many bytes (0 = no limit) and set `oversized` */
  readonly limit?: number;
  readonly memoryMax?: number;
  readonly dir?: string;
}

/** Read `input` to its end and keep it for delivery. */
export async function spool(input: AsyncIterable<Buffer | string>, opts: SpoolOptions = {}): Promise<Spooled> {
  const limit = opts.limit ?? 0;
  const memoryMax = opts.memoryMax ?? MEMORY_MAX;
  const conv = new CrlfToLf();
  let headBuf: Buffer[] = [];
  let headLen = 0;
  let inHead = true;
  let head = Buffer.alloc(0);
  const mem: Buffer[] = [];
  let memLen = 0;
  let file: FileHandle | null = null;
  let fileLen = 0;
  let bodySize = 0;
  let bodyLines = 0;
  let size = 0;
  let oversized = false;

  const addBody = async (b: Buffer): Promise<void> => {
    if (b.length === 0 || oversized) return;
    bodySize += b.length;
    bodyLines += countLf(b);
    if (file === null && memLen + b.length <= memoryMax) {
      mem.push(Buffer.from(b)); // own the bytes: input chunks may be reused
      memLen += b.length;
      return;
    }
    if (file === null) {
      const p = join(opts.dir ?? tmpdir(), `pigeon-spool-${process.pid}-${cryptoModule().randomBytes(6).toString('hex')}`);
      file = await open(p, 'wx+', 0o600);
      await unlink(p); // nothing left behind, whatever happens next
      for (const m of mem) {
        await file.write(m, 0, m.length, fileLen);
        fileLen += m.length;
      }
      mem.length = 0;
      memLen = 0;
    }
    await file.write(b, 0, b.length, fileLen);
    fileLen += b.length;
  };

  const endHead = async (complete: boolean): Promise<void> => {
    const all = Buffer.concat(headBuf);
    headBuf = [];
    const s = splitHead(all, complete);
    head = Buffer.from(s.head);
    inHead = false;
    await addBody(s.rest);
  };

  const feed = async (b: Buffer): Promise<void> => {
    if (b.length === 0) return;
    size += b.length;
    if (limit > 0 && size > limit && !oversized) {
      oversized = true;
      if (inHead) {
        headBuf = [];
        inHead = false;
      }
      return;
    }
    if (oversized) return;
    if (!inHead) {
      await addBody(b);
      return;
    }
    headBuf.push(b);
    headLen += b.length;
    // look for the end of the header section in the new bytes (and the byte before them)
    const look = Buffer.concat(headBuf);
    headBuf = [look];
    if (look[0] === 10 || look.indexOf('\n\n') >= 0 || headLen > HEAD_MAX) await endHead(false);
  };

  for await (const chunk of input) {
    await feed(conv.push(typeof chunk === 'string' ? Buffer.from(chunk, 'latin1') : chunk));
  }
  await feed(conv.end());
  if (inHead) await endHead(true);

  const fields = parseFields(head);
  const headNoReturnPath = dropFields(head, 'return-path');
  const fh = file as FileHandle | null;
  const total = fileLen;
  return {
    head,
    headNoReturnPath,
    fields,
    bodySize: oversized ? 0 : bodySize,
    bodyLines: oversized ? 0 : bodyLines,
    size,
    oversized,
    get: (name) => fields.filter((f) => f.name === name).map((f) => f.value),
    body: (reuse) => bodyIterator(mem, fh, total, reuse === true),
    close: async () => {
      if (fh) await fh.close().catch(() => undefined);
    },
  };
}

async function* bodyIterator(mem: readonly Buffer[], fh: FileHandle | null, total: number, reuse: boolean): AsyncIterable<Buffer> {
  if (fh === null) {
    yield* mem;
    return;
  }
  let pos = 0;
  const shared = reuse ? Buffer.allocUnsafeSlow(CHUNK) : null;
  while (pos < total) {
    const buf = shared ?? Buffer.allocUnsafe(Math.min(CHUNK, total - pos));
    const { bytesRead } = await fh.read(buf, 0, Math.min(buf.length, total - pos), pos);
    if (bytesRead <= 0) throw new Error('spool file shrank while reading');
    pos += bytesRead;
    yield buf.subarray(0, bytesRead);
  }
}

/** The trace fields Postfix pipe(8) prepends (R: Return-Path, O: X-Original-To, D: Delivered-To). */
const PIPE_TRACE = new Set(['return-path', 'x-original-to', 'delivered-to']);

/**
 * How many fields at the top of the header section are pipe(8)'s own trace block: only trace
 * fields, directly followed by the topmost Received: (Postfix always adds one before the queue).
 * Those were added by this very delivery (flags=D...), so they are not a sign of a loop.
 */
export function pipeTraceFields(fields: readonly HeaderField[]): number {
  let n = 0;
  while (n < fields.length && PIPE_TRACE.has(fields[n]?.name ?? '')) n++;
  return n > 0 && fields[n]?.name === 'received' ? n : 0;
}

/** The Delivered-To addresses that count for loop detection (lower case, without <>). */
export function loopDeliveredTo(m: Pick<Spooled, 'fields'>): string[] {
  return m.fields
    .slice(pipeTraceFields(m.fields))
    .filter((f) => f.name === 'delivered-to')
    .map((f) => f.value.replace(/^<|>$/g, '').trim().toLowerCase());
}

/** True when pipe(8)'s block at the top already says `Delivered-To: rcpt` (flag D): ours would repeat it. */
export function hasPipeDeliveredTo(m: Pick<Spooled, 'fields'>, rcpt: string): boolean {
  return m.fields
    .slice(0, pipeTraceFields(m.fields))
    .some((f) => f.name === 'delivered-to' && f.value.replace(/^<|>$/g, '').trim().toLowerCase() === rcpt.toLowerCase());
}

/** Quote an address for a trace header: `<>` for the null sender. */
export function angle(addr: string): string {
  return `<${addr.replace(/[\r\n<>]/g, '')}>`;
}

/**
 * The lines a delivery prepends: Return-Path and (unless pipe(8) already wrote it) Delivered-To.
 * Addresses are text (an SMTPUTF8 sender from -f, MAIL FROM or a UTF-8 Return-Path): written as
 * UTF-8, the bytes they came as (latin1 would turn ü into one byte and drop anything above U+00FF).
 */
export function traceHeaders(sender: string, rcpt: string, deliveredTo = true): Buffer {
  const dt = deliveredTo ? `Delivered-To: ${rcpt.replace(/[\r\n]/g, '')}\n` : '';
  return Buffer.from(`Return-Path: ${angle(sender)}\n${dt}`, 'utf8');
}

/** The bytes of the message as delivered: trace + head + blank line + body. */
export function deliveredParts(m: Spooled, trace: Buffer): { prefix: Buffer; size: number; lines: number } {
  const prefix = Buffer.concat([trace, m.headNoReturnPath, Buffer.from('\n')]);
  return { prefix, size: prefix.length + m.bodySize, lines: countLf(prefix) + m.bodyLines };
}
