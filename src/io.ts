/** Small helpers for CLI input/output: one stdin line, JSON printing. */
import { readFileSync } from 'node:fs';
import { AppError } from './errors.js';

/** Read one line from stdin (the trailing CR/LF stripped), as --password-stdin promises. */
export function readStdinLine(what: string): string {
  let data: string;
  try {
    data = readFileSync(0, 'utf8');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'EAGAIN') throw new AppError('USAGE', `${what}: stdin is not ready; pipe the ${what} in (e.g. printf '%s\\n' "$PW" | pigeon ...)`);
    throw new AppError('USAGE', `${what}: cannot read stdin (${code ?? 'error'})`);
  }
  const nl = data.indexOf('\n');
  const line = (nl < 0 ? data : data.slice(0, nl)).replace(/\r$/, '');
  if (line === '') throw new AppError('USAGE', `${what}: empty input on stdin`);
  if (/[\0\r]/.test(line)) throw new AppError('INVALID_VALUE', `${what}: may not contain CR or NUL`);
  return line;
}

export function printJson(v: unknown): void {
  process.stdout.write(`${JSON.stringify(v, null, 2)}\n`);
}
