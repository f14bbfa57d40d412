/**
 * NAME        src/proxy/imap-framer — IMAP command framing (lines and literals), no I/O
 * DESCRIPTION `feed(bytes)`, then `next()` until it returns null. A command is its line segments
 *             with the literal bytes between them. A synchronising literal `{n}` yields a
 *             `continue` frame first, carrying the command so far: the session either
 *             `accept()`s it (and answers `+ OK`) or `refuse()`s it (a tagged answer instead, and
 *             the client sends no literal); LITERAL+ `{n+}` does not ask. Bytes stay Buffers; a
 *             literal's size counts bytes. `nextLine()` reads one raw line (a SASL response: no
 *             literal or list syntax). `rest()` hands over whatever the client pipelined after
 *             the last command (discarded after STARTTLS, replayed to the backend after login).
 * DIAGNOSTICS `error` frames, terminal: line-too-long (the line limit counts every octet of a
 *             command, CRLFs and literals included), literal-too-large, nesting-too-deep (`(`
 *             outside quoted strings, counted as bytes arrive, so an endless `((((` is cut at
 *             the first one too many, not at the line limit).
 */
import { IMAP_MAX_LINE, IMAP_MAX_NONSYNC_LITERAL, IMAP_MAX_NESTING, IMAP_MAX_TAG } from '../limits.js';

export type FrameError = 'line-too-long' | 'literal-too-large' | 'nesting-too-deep';

export type Frame =
  | { readonly kind: 'command'; readonly parts: readonly Buffer[] } // text, literal, text, literal, text...
  | { readonly kind: 'continue'; readonly parts: readonly Buffer[] } // the command up to its synchronising literal
  | { readonly kind: 'error'; readonly code: FrameError; readonly text: string };

export type LineFrame = { readonly kind: 'line'; readonly line: Buffer } | { readonly kind: 'error'; readonly code: 'line-too-long'; readonly text: string };

const LITERAL_AT_END = /\{(\d{1,10})(\+)?\}$/;
const LF = 0x0a;
const CR = 0x0d;

export class ImapFramer {
  private buf: Buffer = Buffer.alloc(0);
  private parts: Buffer[] = [];
  /** octets of the current command so far: its lines with their CRLFs, and its literals */
  private total = 0;
  private literal: { size: number } | null = null;
  /** a synchronising literal was announced: the session must accept() or refuse() it */
  private asking: { size: number } | null = null;
  private failed = false;
  // the `(` scanner: how far into the current line it has looked, and its state there
  private scanned = 0;
  private depth = 0;
  private inQuote = false;
  private escaped = false;
  private readonly maxLine: number;
  private readonly maxNonSync: number;
  private readonly maxDepth: number;
  constructor(maxLine = IMAP_MAX_LINE, maxNonSync = IMAP_MAX_NONSYNC_LITERAL, maxDepth = IMAP_MAX_NESTING) {
    this.maxLine = maxLine;
    this.maxNonSync = maxNonSync;
    this.maxDepth = maxDepth;
  }

  feed(chunk: Buffer): void {
    this.buf = this.buf.length === 0 ? chunk : Buffer.concat([this.buf, chunk]);
  }

  /** Bytes received but not yet framed (pipelined input); clears the framer. */
  rest(): Buffer {
    const r = this.buf;
    this.buf = Buffer.alloc(0);
    this.resetCommand();
    return r;
  }

  get buffered(): number {
    return this.buf.length;
  }

  private resetCommand(): void {
    this.parts = [];
    this.total = 0;
    this.literal = null;
    this.asking = null;
    this.scanned = 0;
    this.depth = 0;
    this.inQuote = false;
    this.escaped = false;
  }

  /** The synchronising literal announced by the last `continue` frame will be read. */
  accept(): void {
    if (!this.asking) return;
    this.literal = this.asking;
    this.asking = null;
  }

  /** Refuse the announced literal: the command is dropped (the client sends no literal after a tagged answer). */
  refuse(): void {
    if (this.asking) this.resetCommand();
  }

  /** Look at the bytes of the current line from `scanned` on: `(` depth outside quoted strings. */
  private scan(end: number): boolean {
    const b = this.buf;
    for (let i = this.scanned; i < end; i++) {
      const c = b[i];
      if (this.inQuote) {
        if (this.escaped) this.escaped = false;
        else if (c === 0x5c) this.escaped = true;
        else if (c === 0x22) this.inQuote = false;
      } else if (c === 0x22) this.inQuote = true;
      else if (c === 0x28) {
        if (++this.depth > this.maxDepth) return false;
      } else if (c === 0x29 && this.depth > 0) this.depth--;
    }
    this.scanned = end;
    return true;
  }

  next(): Frame | null {
    if (this.failed || this.asking) return null;
    for (;;) {
      if (this.literal) {
        const need = this.literal.size;
        if (this.buf.length < need) return null;
        this.parts.push(this.buf.subarray(0, need));
        this.buf = this.buf.subarray(need);
        this.literal = null;
        this.scanned = 0;
        continue;
      }
      const nl = this.buf.indexOf(LF);
      const end = nl < 0 ? this.buf.length : nl;
      if (!this.scan(end)) return this.fail('nesting-too-deep', 'Too deep nesting of lists before login');
      if (nl < 0) {
        // even a bare LF would not fit any more
        if (this.total + this.buf.length >= this.maxLine) return this.fail('line-too-long', 'Too long command line');
        return null;
      }
      this.total += nl + 1;
      if (this.total > this.maxLine) return this.fail('line-too-long', 'Too long command line');
      let line = this.buf.subarray(0, nl);
      this.buf = this.buf.subarray(nl + 1);
      this.scanned = 0;
      if (line.length > 0 && line[line.length - 1] === CR) line = line.subarray(0, line.length - 1);
      this.parts.push(line);
      const m = this.inQuote ? null : LITERAL_AT_END.exec(line.subarray(Math.max(0, line.length - 14)).toString('latin1'));
      this.inQuote = false; // a quoted string never spans lines: the parser reports it
      this.escaped = false;
      if (m && m[1] !== undefined) {
        const size = Number(m[1]);
        const nonSync = m[2] === '+';
        if (nonSync && size > this.maxNonSync) return this.fail('literal-too-large', `Literal too large (non-synchronizing literals are limited to ${this.maxNonSync} bytes)`);
        // at least a line end must follow the literal
        if (this.total + size + 1 > this.maxLine) return this.fail('literal-too-large', 'Literal too large');
        this.total += size;
        if (!nonSync) {
          this.asking = { size };
          return { kind: 'continue', parts: [...this.parts] };
        }
        this.literal = { size };
        continue;
      }
      const parts = this.parts;
      this.resetCommand();
      return { kind: 'command', parts };
    }
  }

  /**
   * One raw line (without its CRLF), for a SASL response; null until it is complete. A line of
   * more than `max` octets, CRLF included, is an error (terminal).
   */
  nextLine(max: number): LineFrame | null {
    if (this.failed) return null;
    this.resetCommand();
    const nl = this.buf.indexOf(LF);
    if (nl < 0) {
      if (this.buf.length >= max) return this.failLine();
      return null;
    }
    if (nl + 1 > max) return this.failLine();
    let line = this.buf.subarray(0, nl);
    this.buf = this.buf.subarray(nl + 1);
    if (line.length > 0 && line[line.length - 1] === CR) line = line.subarray(0, line.length - 1);
    return { kind: 'line', line };
  }

  private failLine(): LineFrame {
    this.failed = true;
    return { kind: 'error', code: 'line-too-long', text: 'Too long authentication response' };
  }

  private fail(code: FrameError, text: string): Frame {
    this.failed = true;
    return { kind: 'error', code, text };
  }
}

// ---- parsing a framed command into tag, name and arguments ------------------------------

export type Arg =
  | { readonly type: 'atom'; readonly value: string }
  | { readonly type: 'string'; readonly value: Buffer }
  | { readonly type: 'nil' }
  | { readonly type: 'list'; readonly items: readonly Arg[] };

export interface Command {
  readonly tag: string;
  readonly name: string; // upper-cased
  readonly args: readonly Arg[];
}

export class ParseError extends Error {
  readonly tag: string | null;
  constructor(message: string, tag: string | null) {
    super(message);
    this.tag = tag;
  }
}

const ATOM = /^[^\x00-\x20\x7f(){%*"\\\]]+/;
const TAG = /^[^\x00-\x20\x7f(){%*"\\+]+$/;

/** Parse framed parts. Grammar of the pre-auth commands only: atoms, quoted, literals, NIL, one list level. */
export function parseCommand(parts: readonly Buffer[]): Command {
  let seg = 0;
  let text = (parts[0] ?? Buffer.alloc(0)).toString('latin1');
  let pos = 0;
  const first = /^(\S+) ?(\S*)/.exec(text);
  const tag = first?.[1] ?? '';
  if (!first || !TAG.test(tag) || tag.length > IMAP_MAX_TAG) throw new ParseError('Invalid tag', null);
  const name = (first[2] ?? '').toUpperCase();
  if (!/^[A-Z]+$/.test(name)) throw new ParseError('Invalid command', tag);
  pos = first[0].length;
  if (text.includes('\0')) throw new ParseError('NUL byte in command', tag);
  const args: Arg[] = [];
  let depth = 0;
  let list: Arg[] = args;
  const stack: Arg[][] = [];
  const err = (m: string): never => {
    throw new ParseError(m, tag);
  };
  if (pos < text.length) {
    if (text[pos] !== ' ') err('Expected a space');
    pos++;
  }
  while (pos < text.length || seg < parts.length - 1) {
    if (pos >= text.length) err('Unexpected end of command');
    const c = text[pos];
    if (c === '(') {
      if (depth >= 1) err('Nested lists are not allowed before login');
      const items: Arg[] = [];
      list.push({ type: 'list', items });
      stack.push(list);
      list = items;
      depth++;
      pos++;
      continue;
    }
    if (c === ')') {
      if (depth === 0) err('Unexpected )');
      list = stack.pop() ?? args;
      depth--;
      pos++;
    } else if (c === '"') {
      let out = '';
      pos++;
      for (;;) {
        if (pos >= text.length) err('Unterminated quoted string');
        const ch = text[pos] ?? '';
        if (ch === '\\') {
          const nx = text[pos + 1] ?? '';
          if (nx !== '"' && nx !== '\\') err('Invalid escape in quoted string');
          out += nx;
          pos += 2;
        } else if (ch === '"') {
          pos++;
          break;
        } else {
          out += ch;
          pos++;
        }
      }
      list.push({ type: 'string', value: Buffer.from(out, 'latin1') });
    } else if (c === '{') {
      const m = /^\{(\d+)\+?\}$/.exec(text.slice(pos));
      if (!m || seg + 1 >= parts.length) err('Invalid literal');
      const lit = parts[seg + 1] ?? Buffer.alloc(0);
      list.push({ type: 'string', value: lit });
      seg += 2;
      text = (parts[seg] ?? Buffer.alloc(0)).toString('latin1');
      if (text.includes('\0')) err('NUL byte in command');
      pos = 0;
    } else {
      const m = ATOM.exec(text.slice(pos));
      if (!m) err(`Unexpected character ${JSON.stringify(c)}`);
      const v = m?.[0] ?? '';
      list.push(v.toUpperCase() === 'NIL' ? { type: 'nil' } : { type: 'atom', value: v });
      pos += v.length;
    }
    if (pos < text.length) {
      const ch = text[pos];
      if (ch === ' ') pos++;
      else if (ch !== ')') err('Expected a space');
      if (ch === ' ' && pos >= text.length && seg >= parts.length - 1) err('Trailing space');
    }
  }
  if (depth !== 0) err('Unterminated list');
  return { tag, name, args };
}

/** The bytes of an argument (atom, quoted string or literal) exactly as the client sent them, or null. */
export function argBytes(a: Arg | undefined): Buffer | null {
  if (!a) return null;
  if (a.type === 'atom') return Buffer.from(a.value, 'latin1');
  if (a.type === 'string') return a.value;
  return null;
}

/** An ASCII argument (a mechanism name, base64) as text, or null. Not for user data: see argBytes. */
export function argAscii(a: Arg | undefined): string | null {
  const b = argBytes(a);
  if (b === null || b.some((c) => c > 0x7e)) return null;
  return b.toString('latin1');
}

/** Tag and command name of a command's first line, when both are well formed (for a `continue` decision). */
export function peekCommand(first: Buffer | undefined): { tag: string; name: string } | null {
  const m = /^(\S+) ([A-Za-z]+)(?: |$)/.exec((first ?? Buffer.alloc(0)).toString('latin1'));
  if (!m || m[1] === undefined || m[2] === undefined || !TAG.test(m[1]) || m[1].length > IMAP_MAX_TAG) return null;
  return { tag: m[1], name: m[2].toUpperCase() };
}
