/**
 * NAME        src/proxy/imap-framer — IMAP command framing (lines and literals), no I/O
 * DESCRIPTION `feed(bytes)`, then `next()` until it returns null. A command is its line segments
 *             with the literal bytes between them. A synchronising literal `{n}` yields a
 *             `continue` frame first (the session answers `+ OK`); LITERAL+ `{n+}` does not.
 *             Bytes stay Buffers; a literal's size counts bytes. `rest()` hands over whatever the
 *             client pipelined after the last command (discarded after STARTTLS, replayed to the
 *             backend after login).
 * DIAGNOSTICS `error` frames: line-too-long, literal-too-large, bad-literal — terminal.
 */
import { IMAP_MAX_LINE, IMAP_MAX_NONSYNC_LITERAL } from '../limits.js';

export type Frame =
  | { readonly kind: 'command'; readonly parts: readonly Buffer[] } // text, literal, text, literal, text...
  | { readonly kind: 'continue' }
  | { readonly kind: 'error'; readonly code: 'line-too-long' | 'literal-too-large'; readonly text: string };

const LITERAL_AT_END = /\{(\d{1,10})(\+)?\}$/;

export class ImapFramer {
  private buf: Buffer = Buffer.alloc(0);
  private parts: Buffer[] = [];
  private total = 0;
  private literal: { size: number } | null = null;
  private failed = false;
  private readonly maxLine: number;
  private readonly maxNonSync: number;
  constructor(maxLine = IMAP_MAX_LINE, maxNonSync = IMAP_MAX_NONSYNC_LITERAL) {
    this.maxLine = maxLine;
    this.maxNonSync = maxNonSync;
  }

  feed(chunk: Buffer): void {
    this.buf = this.buf.length === 0 ? chunk : Buffer.concat([this.buf, chunk]);
  }

  /** Bytes received but not yet framed (pipelined input); clears the framer. */
  rest(): Buffer {
    const r = this.buf;
    this.buf = Buffer.alloc(0);
    this.parts = [];
    this.total = 0;
    this.literal = null;
    return r;
  }

  get buffered(): number {
    return this.buf.length;
  }

  next(): Frame | null {
    if (this.failed) return null;
    for (;;) {
      if (this.literal) {
        const need = this.literal.size;
        if (this.buf.length < need) return null;
        this.parts.push(this.buf.subarray(0, need));
        this.buf = this.buf.subarray(need);
        this.literal = null;
        continue;
      }
      const nl = this.buf.indexOf(0x0a);
      if (nl < 0) {
        if (this.total + this.buf.length > this.maxLine) return this.fail('line-too-long', 'Too long command line');
        return null;
      }
      let line = this.buf.subarray(0, nl);
      this.buf = this.buf.subarray(nl + 1);
      if (line.length > 0 && line[line.length - 1] === 0x0d) line = line.subarray(0, line.length - 1);
      this.total += line.length;
      if (this.total > this.maxLine) return this.fail('line-too-long', 'Too long command line');
      this.parts.push(line);
      const m = LITERAL_AT_END.exec(line.subarray(Math.max(0, line.length - 14)).toString('latin1'));
      if (m && m[1] !== undefined) {
        const size = Number(m[1]);
        const nonSync = m[2] === '+';
        if (nonSync && size > this.maxNonSync) return this.fail('literal-too-large', `Literal too large (non-synchronizing literals are limited to ${this.maxNonSync} bytes)`);
        if (this.total + size > this.maxLine) return this.fail('literal-too-large', 'Literal too large');
        this.total += size;
        this.literal = { size };
        if (!nonSync) return { kind: 'continue' };
        continue;
      }
      const parts = this.parts;
      this.parts = [];
      this.total = 0;
      return { kind: 'command', parts };
    }
  }

  private fail(code: 'line-too-long' | 'literal-too-large', text: string): Frame {
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
  if (!first || !TAG.test(tag) || tag.length > 126) throw new ParseError('Invalid tag', null);
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

/** The text value of an argument (atom, string) or null. */
export function argString(a: Arg | undefined): string | null {
  if (!a) return null;
  if (a.type === 'atom') return a.value;
  if (a.type === 'string') return a.value.toString('utf8');
  return null;
}
