/**
 * NAME        src/proxy/pop3-framer — POP3 command framing (lines), no I/O
 * DESCRIPTION `feed(bytes)`, then `next(max)` until it returns null, like the IMAP framer
 *             (src/proxy/imap-framer.ts). A command is one line; its CRLF (or a bare LF) is not
 *             part of it. Bytes stay Buffers. `max` counts the whole line with its CRLF
 *             (POP3_MAX_LINE for commands, SASL_MAX_LINE for a SASL response); a line that is,
 *             or can only become, longer is `too-long` (the session answers and closes).
 *             `rest()` hands over whatever the client pipelined after the last command
 *             (discarded at STLS, replayed to the backend after login). The lines themselves
 *             come from the one line reader, src/lines.ts.
 */
import { LineBuffer } from '../lines.js';
import { POP3_MAX_LINE } from '../limits.js';

export type Pop3Frame = { readonly kind: 'line'; readonly line: Buffer } | { readonly kind: 'too-long' };

export class Pop3Framer {
  private readonly lines = new LineBuffer();

  feed(chunk: Buffer): void {
    this.lines.push(chunk);
  }

  /** The next command line, `too-long`, or null until a whole line is there. */
  next(max = POP3_MAX_LINE): Pop3Frame | null {
    const r = this.lines.line(max);
    if (r === null) return null;
    return r.kind === 'line' ? { kind: 'line', line: r.line } : { kind: 'too-long' };
  }

  /** Bytes received but not yet framed (pipelined input); clears the framer. */
  rest(): Buffer {
    return this.lines.rest();
  }
}
