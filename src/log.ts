/**
 * NAME        src/log — one line per event, in the text mail admins already grep
 * DESCRIPTION Lines look like Dovecot's: `2026-12-03T10:00:00.000Z pigeon[123]: imap-login: Login:
 *             user=<a@b>, method=PLAIN, rip=1.2.3.4, lip=5.6.7.8, session=<x>`. Destination is
 *             stderr (daemon, CLI) or an append-only file (`log.file`); in inetd and Postfix
 *             modes, where stderr is the client socket, without log.file: syslog when its socket
 *             (log.syslog_socket) exists, else log.fallback_file, which says why in its first line.
 *             Syslog lines go to facility mail with the line's own priority: error → err,
 *             warn → warning, info → info, debug → debug (SYSLOG_SEVERITY).
 *             Client data only ever goes into fields, which are sanitised (no CR/LF/control
 *             characters); the message and prefix are made one line too (an OpenSSL error text
 *             ends in a newline), so a record is always one line.
 * SECURITY    Never logs a password, hash or key: callers pass no such field, and fields named
 *             pass/password/secret are replaced by "<hidden>".
 */
import { appendFileSync, existsSync, statSync, openSync, writeSync, constants } from 'node:fs';
import type { ChildProcess } from 'node:child_process';
import { childProcess } from './builtins.js';

export type Level = 'debug' | 'info' | 'warn' | 'error';
const ORDER: Record<Level, number> = { debug: 0, info: 1, warn: 2, error: 3 };

export interface Logger {
  log(level: Level, prefix: string, msg: string, fields?: Record<string, string | number | boolean | null | undefined>): void;
}

export function clean(s: string): string {
  return s.replace(/[\x00-\x1f\x7f]/g, '?').slice(0, 512);
}

/** syslog(3) severities of our levels; the facility is always mail (2) */
export const SYSLOG_SEVERITY: Record<Level, number> = { error: 3, warn: 4, info: 6, debug: 7 };
const SYSLOG_MAIL = 2;

/** Where the lines of a logger go: one whole line (ending in a newline) and its level. */
export type LogSink = (line: string, level: Level) => void;

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
    // `<` and `>` frame these fields: inside they would end the field early for a log reader
    else if (k === 'user' || k === 'session') parts.push(`${k}=<${clean(String(v)).replace(/[<>]/g, '?')}>`);
    else parts.push(`${k}=${clean(String(v))}`);
  }
  return parts.join(', ');
}

export function createLogger(opts: { level: Level; file?: string | null; sink?: LogSink }): Logger {
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
      write(`${new Date().toISOString()} pigeon[${process.pid}]: ${oneLine(prefix)}: ${lvl}${m}${f ? `${m.endsWith(':') ? ' ' : ': '}${f}` : ''}\n`, level);
    },
  };
}

/**
 * Why syslog cannot take our lines through `socket`, or null when it can: the socket must exist
 * and be a socket (logger(1) drops lines without a word when it is missing), and logger(1) must
 * be installed.
 */
export function syslogUnavailable(socket: string): string | null {
  let st;
  try {
    st = statSync(socket);
  } catch (e) {
    return `no syslog socket at ${socket} (${(e as NodeJS.ErrnoException).code ?? 'error'})`;
  }
  if (!st.isSocket()) return `${socket} is not a socket`;
  if (!LOGGER.some((p) => existsSync(p))) return 'logger(1) is not installed (Debian bsdutils)';
  return null;
}

const LOGGER = ['/usr/bin/logger', '/bin/logger'];

/**
 * Syslog (facility mail, tag pigeon) through the system's logger(1), writing to `socket`, for
 * inetd and Postfix modes where stderr is the client's socket. Each line carries its own
 * priority (`<PRI>` prefix read by `logger --prio-prefix`): mail.err, mail.warning, mail.info,
 * mail.debug. One logger process per pigeon process; it never keeps pigeon alive. Returns null
 * when syslog is unavailable (see syslogUnavailable): then use syslogOrFileSink.
 */
export function syslogSink(socket = '/dev/log'): LogSink | null {
  const bin = LOGGER.find((p) => existsSync(p));
  if (!bin || syslogUnavailable(socket) !== null) return null;
  let child: ChildProcess | null = null;
  return (line, level) => {
    if (!child) {
      child = childProcess().spawn(bin, ['-t', 'pigeon', `--id=${process.pid}`, '--prio-prefix', '-p', 'mail.info', '-u', socket], { stdio: ['pipe', 'ignore', 'ignore'], detached: false });
      child.on('error', () => {});
      child.stdin?.on('error', () => {});
      child.unref();
      (child.stdin as unknown as { unref?: () => void } | null)?.unref?.();
    }
    // logger adds its own timestamp and tag; the priority prefix is read and removed by logger
    child.stdin?.write(`<${SYSLOG_MAIL * 8 + SYSLOG_SEVERITY[level]}>${line.replace(/^\S+ pigeon\[\d+\]: /, '')}`);
  };
}

/**
 * Append lines to `file` (opened once: no symlink followed, mode 0640). The process that creates
 * the file writes `notice` into it first: said once per file, not once per session (under inetd
 * every connection is a process). A file that cannot be opened drops the lines, as a full disk
 * would: a session never fails for its log.
 */
export function fileSink(file: string, notice: string | null = null): LogSink {
  let fd: number | null = null;
  let failed = false;
  const open = (): number | null => {
    if (fd !== null || failed) return fd;
    const flags = constants.O_WRONLY | constants.O_APPEND | constants.O_NOFOLLOW;
    try {
      fd = openSync(file, flags | constants.O_CREAT | constants.O_EXCL, 0o640);
      if (notice !== null) writeSync(fd, `${new Date().toISOString()} pigeon[${process.pid}]: log: ${notice}\n`);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') failed = true;
      else {
        try {
          fd = openSync(file, flags);
        } catch {
          failed = true;
        }
      }
    }
    return fd;
  };
  return (line: string) => {
    const f = open();
    if (f === null) return;
    try {
      writeSync(f, line);
    } catch {
      /* a log file we cannot write must not kill a session */
    }
  };
}

/**
 * Where the one-session modes (inetd, Postfix spawn) log without log.file: syslog through
 * `socket`, else `fallback` — log lines never vanish because a machine (a container, a chroot)
 * has no syslog daemon. The fallback file starts with one line saying why.
 */
export function syslogOrFileSink(socket: string, fallback: string): LogSink {
  const why = syslogUnavailable(socket);
  const sink = why === null ? syslogSink(socket) : null;
  return sink ?? fileSink(fallback, `${why ?? 'syslog unavailable'}: logging to ${fallback} instead (log.fallback_file; set log.file, or log.syslog_socket)`);
}
