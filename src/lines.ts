/**
 * NAME        src/lines — the one line reader: LF-terminated lines out of a byte stream
 * SYNOPSIS    const b = new LineBuffer(); b.push(chunk); for (let r; (r = b.line(max)); ) ...
 *             const r = new StreamLines(child.stdout, { timeoutMs, fail }); await r.line(); r.close();
 * DESCRIPTION `LineBuffer` is I/O-free: bytes go in with push(), complete lines come out of
 *             line(max), in order, as Buffers (bytes stay bytes). `max` counts the whole line
 *             with its LF; a line that is, or can only become, longer is `too-long` (the caller
 *             decides whether that is terminal); rest() hands out what is left (pipelined
 *             input). Used by the POP3 framer, both ends of the node state service (its
 *             LineReader) and backend stderr.
 *             `StreamLines` reads lines from a Readable the same way, with one deadline for all
 *             of them; close() stops reading and puts the bytes after the last line read back in
 *             front of the stream (unshift), so the next reader (a relay, a body reader) loses
 *             nothing. Used by the backends' first lines and, through readLine, every line of the
 *             peer link (hand-offs, answers, `user move`).
 */
import type { Readable } from 'node:stream';

const EMPTY = Buffer.alloc(0);

export type LineResult =
  /** `line`: without its LF (and a CR before it); `raw`: as received, LF included */
  { readonly kind: 'line'; readonly line: Buffer; readonly raw: Buffer } | { readonly kind: 'too-long' };

export class LineBuffer {
  private buf: Buffer = EMPTY;

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.buf = this.buf.length === 0 ? chunk : Buffer.concat([this.buf, chunk]);
  }

  /** The next complete line of at most `max` bytes (LF included), `too-long`, or null until one is complete. */
  line(max = Number.POSITIVE_INFINITY): LineResult | null {
    const nl = this.buf.indexOf(0x0a);
    if (nl < 0) return this.buf.length >= max ? { kind: 'too-long' } : null; // even a bare LF would not fit
    if (nl + 1 > max) return { kind: 'too-long' };
    const raw = this.buf.subarray(0, nl + 1);
    this.buf = this.buf.subarray(nl + 1);
    const end = nl > 0 && raw[nl - 1] === 0x0d ? nl - 1 : nl;
    return { kind: 'line', line: raw.subarray(0, end), raw };
  }

  /** Everything buffered, handed out and forgotten. */
  rest(): Buffer {
    const r = this.buf;
    this.buf = EMPTY;
    return r;
  }
}

/** How a StreamLines reader fails: the caller's own errors, with its own words. */
export interface LineFailures {
  tooLong(max: number): Error;
  timeout(ms: number): Error;
  /** the stream ended; `empty`: before a single byte arrived (an unused connection) */
  closed(empty: boolean): Error;
}

export class StreamLines {
  private readonly lines = new LineBuffer();
  private readonly stream: Readable;
  private readonly max: number;
  private readonly fails: LineFailures;
  private readonly timer: NodeJS.Timeout;
  private failure: Error | null = null;
  private waiter: (() => void) | null = null;
  private received = 0;
  private closed = false;
  private readonly onData = (c: Buffer): void => {
    this.received += c.length;
    this.lines.push(c);
    this.wake();
  };
  private readonly onEnd = (): void => this.fail(this.fails.closed(this.received === 0));
  private readonly onError = (e: Error): void => this.fail(e);

  /**
   * `endFails: false`: the end of the stream is not a failure by itself (a child's stdout: its
   * exit, reported with fail(), says why it ended).
   */
  constructor(stream: Readable, opts: { readonly max: number; readonly timeoutMs: number; readonly fail: LineFailures; readonly endFails?: boolean }) {
    this.stream = stream;
    this.max = opts.max;
    this.fails = opts.fail;
    this.timer = setTimeout(() => this.fail(this.fails.timeout(opts.timeoutMs)), opts.timeoutMs);
    stream.on('data', this.onData);
    if (opts.endFails !== false) {
      stream.once('end', this.onEnd);
      stream.once('close', this.onEnd);
    }
    stream.once('error', this.onError);
    // a stream that closed before this reader came will not say so again: no wait for the deadline
    if (opts.endFails !== false && (stream.destroyed || stream.readableEnded)) this.onEnd();
    stream.resume();
  }

  /** Fail the reader from outside (the child exited, the link broke): pending and later line() calls reject. */
  fail(e: Error): void {
    this.failure ??= e;
    this.wake();
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }

  /** The next line (see LineBuffer.line); rejects with the caller's error on overlong, deadline, end or fail(). */
  async line(): Promise<Extract<LineResult, { kind: 'line' }>> {
    for (;;) {
      const r = this.lines.line(this.max);
      if (r?.kind === 'line') return r;
      if (r?.kind === 'too-long') throw this.fails.tooLong(this.max);
      if (this.failure) throw this.failure;
      await new Promise<void>((resolve) => {
        this.waiter = resolve;
      });
    }
  }

  /** Stop reading: the stream is paused, and the bytes after the last line read go back in front of it. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.timer);
    this.stream.off('data', this.onData);
    this.stream.off('end', this.onEnd);
    this.stream.off('close', this.onEnd);
    this.stream.off('error', this.onError);
    this.stream.pause();
    const rest = this.lines.rest();
    if (rest.length > 0) this.stream.unshift(rest);
  }
}

/** One line from `stream` (rejecting as `fail` says), the rest left unread for the next reader. */
export async function readLine(stream: Readable, opts: { readonly max: number; readonly timeoutMs: number; readonly fail: LineFailures }): Promise<Buffer> {
  const r = new StreamLines(stream, opts);
  try {
    return (await r.line()).line;
  } finally {
    r.close();
  }
}
