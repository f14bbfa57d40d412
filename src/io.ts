/**
 * NAME        src/io — small helpers for CLI input/output: one stdin line, JSON printing
 * DESCRIPTION `readStdinBytes` reads the one line `--password-stdin` and `auth test` promise, as
 *             bytes (a password goes to the hash exactly as typed, whatever its encoding);
 *             `readStdinLine` is the same line as text, refused when it is not valid UTF-8
 *             (never decoded with replacement characters).
 * DIAGNOSTICS USAGE for an empty or unreadable stdin, INVALID_VALUE for CR or NUL in the line.
 */
import { readFileSync } from 'node:fs';
import { AppError } from './errors.js';

const STRICT_UTF8 = new TextDecoder('utf-8', { fatal: true });

/** Read one line from stdin as bytes (the trailing LF or CRLF stripped), as --password-stdin promises. */
export function readStdinBytes(what: string): Buffer {
  let data: Buffer;
  try {
    data = readFileSync(0);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'EAGAIN') throw new AppError('USAGE', `${what}: stdin is not ready; pipe the ${what} in (e.g. printf '%s\\n' "$PW" | pigeon ...)`);
    throw new AppError('USAGE', `${what}: cannot read stdin (${code ?? 'error'})`);
  }
  const nl = data.indexOf(0x0a);
  let line = nl < 0 ? data : data.subarray(0, nl);
  if (line.length > 0 && line[line.length - 1] === 0x0d) line = line.subarray(0, line.length - 1);
  if (line.length === 0) throw new AppError('USAGE', `${what}: empty input on stdin`);
  if (line.includes(0x00) || line.includes(0x0d)) throw new AppError('INVALID_VALUE', `${what}: may not contain CR or NUL`);
  return line;
}

/** One stdin line as text; refused unless it is valid UTF-8. */
export function readStdinLine(what: string): string {
  const line = readStdinBytes(what);
  try {
    return STRICT_UTF8.decode(line);
  } catch {
    throw new AppError('INVALID_VALUE', `${what}: not valid UTF-8`);
  }
}

export function printJson(v: unknown): void {
  process.stdout.write(`${JSON.stringify(v, null, 2)}\n`);
}
