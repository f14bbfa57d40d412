/**
 * NAME        src/log — one line per event, in the text mail admins already grep
 * DESCRIPTION Lines look like Dovecot's: `2026-12-03T10:00:00.000Z pigeon[123]: imap-login: Login:
 *             user=<a@b>, method=PLAIN, rip=1.2.3.4, lip=5.6.7.8, session=<x>`. Destination is
 *             stderr (daemon, CLI) or an append-only file (`log.file`; inetd and Postfix modes,
 *             where stderr is the client socket). Client data only ever goes into fields, which
 *             are sanitised (no CR/LF/control characters); the message and prefix are made one
 *             line too (an OpenSSL error text ends in a newline), so a record is always one line.
 * SECURITY    Never logs a password, hash or key: callers pass no such field, and fields named
 *             pass/password/secret are replaced by "<hidden>".
 */
import { appendFileSync, existsSync } from 'node:fs';
import { spawn, type ChildProcess } from 'node:child_process';

export type Level = 'debug' | 'info' | 'warn' | 'error';
const ORDER: Record<Level, number> = { debug: 0, info: 1, warn: 2, error: 3 };

export interface Logger {
  log(level: Level, prefix: string, msg: string, fields?: Record<string, string | number | boolean | null | undefined>): void;
}

export function clean(s: string): string {
  return s.replace(/[\x00-\x1f\x7f]/g, '?').slice(0, 512);
}

/** A message on one line: line breaks and tabs become spaces, other control characters '?'. */
export function oneLine(s: string): string {
  return s
    .replace(/[\r\n\t]+/g, ' ')
    .replace(/[\x00-\x1f\x7f]/g, '?')
    .trim();
}

export function formatFields(fields: Record<string, string | number | boolean | null | undefined>): string {
  const parts: string[] = [];
  for (const [k, v] of Object.entries(fields)) {
    if (v === undefined || v === null || v === false || (v === '' && k !== 'user')) continue;
    if (/pass|secret|key/i.test(k)) {
      parts.push(`${k}=<hidden>`);
      continue;
    }
    if (v === true) parts.push(k);
    else if (k === 'user' || k === 'session') parts.push(`${k}=<${clean(String(v))}>`);
    else parts.push(`${k}=${clean(String(v))}`);
  }
  return parts.join(', ');
}

export function createLogger(opts: { level: Level; file?: string | null; sink?: (line: string) => void }): Logger {
  const min = ORDER[opts.level];
  const write =
    opts.sink ??
    (opts.file
      ? (line: string) => {
          try {
            appendFileSync(opts.file ?? '', line);
          } catch {
            /* a log file we cannot write must not kill a session */
          }
        }
      : (line: string) => {
          process.stderr.write(line);
        });
  return {
    log(level, prefix, msg, fields) {
      if (ORDER[level] < min) return;
      const f = fields ? formatFields(fields) : '';
      const lvl = level === 'info' ? '' : `${level === 'warn' ? 'Warning' : level === 'error' ? 'Error' : 'Debug'}: `;
      const m = oneLine(msg);
      write(`${new Date().toISOString()} pigeon[${process.pid}]: ${oneLine(prefix)}: ${lvl}${m}${f ? `${m.endsWith(':') ? ' ' : ': '}${f}` : ''}\n`);
    },
  };
}

/**
 * Syslog (facility mail, tag pigeon) through the system's logger(1), for inetd and Postfix modes
 * where stderr is the client's socket. One logger process per pigeon process; it never keeps
 * pigeon alive. Returns null when logger(1) is not installed.
 */
export function syslogSink(): ((line: string) => void) | null {
  const bin = ['/usr/bin/logger', '/bin/logger'].find((p) => existsSync(p));
  if (!bin) return null;
  let child: ChildProcess | null = null;
  return (line: string) => {
    if (!child) {
      child = spawn(bin, ['-t', 'pigeon', '--id', String(process.pid), '-p', 'mail.info'], { stdio: ['pipe', 'ignore', 'ignore'], detached: false });
      child.on('error', () => {});
      child.stdin?.on('error', () => {});
      child.unref();
      (child.stdin as unknown as { unref?: () => void } | null)?.unref?.();
    }
    // logger adds its own timestamp and tag
    child.stdin?.write(line.replace(/^\S+ pigeon\[\d+\]: /, ''));
  };
}
