// Golden transcripts (test/transcripts/*.txt) for the I/O-free framers, and the split-everywhere
// driver of the fast tier. A transcript holds what the client sends and what the framer must make
// of it:
//   # a comment
//   > "a1 LOGIN {5}\r\n"          client bytes: a JSON string, one character per byte (latin1)
//   < continue ["a1 LOGIN {5}"]   a frame: its kind and its parts (JSON strings, latin1), or
//   < error line-too-long         its code (an error is the framer's last frame)
// The framer must give the same frames however the bytes arrive: in one piece, split at every
// byte, and one byte at a time.
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';

export const TRANSCRIPTS = join(import.meta.dirname, '..', 'transcripts');

export interface Transcript {
  readonly name: string;
  readonly input: Buffer;
  readonly frames: readonly string[];
}

export function transcripts(prefix: string): Transcript[] {
  return readdirSync(TRANSCRIPTS)
    .filter((f) => f.startsWith(prefix) && f.endsWith('.txt'))
    .sort()
    .map((f) => {
      const chunks: Buffer[] = [];
      const frames: string[] = [];
      for (const l of readFileSync(join(TRANSCRIPTS, f), 'utf8').split('\n')) {
        if (l.startsWith('> ')) chunks.push(Buffer.from(JSON.parse(l.slice(2)) as string, 'latin1'));
        else if (l.startsWith('< ')) frames.push(l.slice(2));
        else if (l.trim() !== '' && !l.startsWith('#')) throw new Error(`${f}: not a transcript line: ${l}`);
      }
      return { name: f, input: Buffer.concat(chunks), frames };
    });
}

/** A frame as a transcript writes it. */
export function render(kind: string, parts?: readonly Buffer[], code?: string): string {
  if (code !== undefined) return `${kind} ${code}`;
  return `${kind} ${JSON.stringify((parts ?? []).map((p) => p.toString('latin1')))}`;
}

/** Every way of cutting `input` the fast tier tries: whole, split at each byte, byte by byte. */
export function* deliveries(input: Buffer): Generator<{ how: string; chunks: Buffer[] }> {
  yield { how: 'in one piece', chunks: [input] };
  for (let k = 1; k < input.length; k++) yield { how: `split at byte ${k}`, chunks: [input.subarray(0, k), input.subarray(k)] };
  yield { how: 'one byte at a time', chunks: [...input].map((b) => Buffer.from([b])) };
}
