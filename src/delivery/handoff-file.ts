/**
 * NAME        src/delivery/handoff-file — where `pigeon deliver` finds a running `pigeon serve`
 * SYNOPSIS    DIR/deliver-handoff.json
 *             {"v":1,"pid":1234,"config":"/etc/pigeon/pigeon.yaml","socket":"/etc/pigeon/run/deliver.sock"}
 * DESCRIPTION `pigeon serve` (the process that owns run_dir) writes this file into the instance
 *             directory when it opens its hand-off socket (RUN_DIR/deliver.sock,
 *             src/delivery/handoff-server.ts) and removes it when it exits cleanly. `pigeon
 *             deliver` reads it before it loads anything else: the file sits beside pigeon.yaml,
 *             so the serve it names runs the same instance by construction (deliver also checks
 *             that serve read the very configuration file its own -c names: another YAML file in
 *             the same directory is another instance). A stale file (serve killed) names a socket nobody listens on: the connect is refused and deliver
 *             delivers in its own process. Node built-ins only (plus src/instance-path.ts):
 *             `pigeon deliver` runs this module for every message (inlined into dist/src/cli.js
 *             and dist/src/cli.cjs by scripts/bundle-deliver.mjs). Serve's side, writing and
 *             removing the file, is src/delivery/handoff-file-write.ts.
 * SECURITY    Written as a new file (O_EXCL, O_NOFOLLOW), then renamed over the old one, so a
 *             link planted in the instance directory is never written through; and written by
 *             root only into an instance directory that root alone may change: when the
 *             directory belongs to another user or its group or others may write it (the pipe(8)
 *             set-up lets the mail user write it, for SQLite's WAL), `writeHandoffAs` writes it
 *             in a short-lived child process running as that user (`mail_user` for a
 *             root-owned, group-writable directory). Trusted by
 *             deliver only when it is a regular file owned by root or by deliver's own user that
 *             no one else may write, and the socket it names only when that is a socket owned
 *             by root or by deliver's own user; anything else means: deliver in this process.
 */
import { closeSync, constants, fstatSync, lstatSync, openSync, readSync } from 'node:fs';
import { dirname, isAbsolute, join } from 'node:path';
import { configFileOf } from '../instance-path.js';

export const HANDOFF_FILE = 'deliver-handoff.json';
export const HANDOFF_SOCKET = 'deliver.sock';
/** a unix socket path has at most 107 bytes (sun_path) */
export const MAX_SOCKET_PATH = 107;
export const MAX_FILE = 4096;

/** The configuration file `-c` names (see src/instance-path.ts); it may not exist. */
export function configOf(c: string | undefined): string {
  return configFileOf(c);
}

export function euid(): number {
  return process.geteuid?.() ?? 0;
}

/**
 * The socket a running serve of configuration file `config` offers, or null (no file, a file
 * or a socket that fails the checks in SECURITY above, a serve of another configuration file).
 * Never throws.
 */
export function readHandoff(config: string): string | null {
  let fd: number;
  try {
    fd = openSync(join(dirname(config), HANDOFF_FILE), constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
  } catch {
    return null;
  }
  try {
    const st = fstatSync(fd);
    const me = euid();
    if (!st.isFile() || (st.uid !== 0 && st.uid !== me) || (st.mode & 0o022) !== 0 || st.size > MAX_FILE) return null;
    const buf = Buffer.alloc(st.size);
    if (readSync(fd, buf, 0, buf.length, 0) !== buf.length) return null;
    const v: unknown = JSON.parse(buf.toString('utf8'));
    if (typeof v !== 'object' || v === null) return null;
    const { v: version, socket, config: served } = v as { v?: unknown; socket?: unknown; config?: unknown };
    if (version !== 1 || served !== config || typeof socket !== 'string' || !isAbsolute(socket) || Buffer.byteLength(socket) > MAX_SOCKET_PATH) return null;
    const s = lstatSync(socket);
    if (!s.isSocket() || (s.uid !== 0 && s.uid !== me)) return null;
    return socket;
  } catch {
    return null;
  } finally {
    closeSync(fd);
  }
}
