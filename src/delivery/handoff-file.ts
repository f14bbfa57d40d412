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
 *             delivers in its own process. Node built-ins only (plus src/instance-path.ts).
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
import { spawnSync } from 'node:child_process';
import { closeSync, constants, fstatSync, lstatSync, openSync, readSync, renameSync, unlinkSync, writeSync } from 'node:fs';
import { dirname, isAbsolute, join } from 'node:path';
import { configFileOf } from '../instance-path.js';

export const HANDOFF_FILE = 'deliver-handoff.json';
export const HANDOFF_SOCKET = 'deliver.sock';
/** a unix socket path has at most 107 bytes (sun_path) */
export const MAX_SOCKET_PATH = 107;
const MAX_FILE = 4096;

/** The configuration file `-c` names (see src/instance-path.ts); it may not exist. */
export function configOf(c: string | undefined): string {
  return configFileOf(c);
}

function euid(): number {
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

/** Say (atomically) that this process, running configuration file `config`, serves the hand-off on `socket`. Throws on failure. */
export function writeHandoff(config: string, socket: string, pid: number = process.pid): void {
  const dir = dirname(config);
  const tmp = join(dir, `.${HANDOFF_FILE}.${process.pid}`); // the writing process's own pid
  try {
    unlinkSync(tmp);
  } catch {
    /* none left over */
  }
  const fd = openSync(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o644);
  try {
    writeSync(fd, `${JSON.stringify({ v: 1, pid, config, socket })}\n`);
  } finally {
    closeSync(fd);
  }
  renameSync(tmp, join(dir, HANDOFF_FILE));
}

/**
 * The user root must write the file as in directory `dir` (see SECURITY), or null when this
 * process may write it itself (not root, or a directory only root may change).
 */
export function writerFor(dir: string, mailUser: { readonly uid: number; readonly gid: number }): { uid: number; gid: number } | null {
  if (euid() !== 0) return null;
  const st = lstatSync(dir);
  if (st.uid === 0 && (st.mode & 0o022) === 0) return null;
  return st.uid !== 0 ? { uid: st.uid, gid: st.gid } : { uid: mailUser.uid, gid: mailUser.gid };
}

/**
 * writeHandoff as `as` (a uid/gid, see writerFor) in a child process, or in this process when
 * `as` is null. Throws on failure, with the child's one-line reason.
 */
export function writeHandoffAs(config: string, socket: string, as: { readonly uid: number; readonly gid: number } | null): void {
  if (as === null) {
    writeHandoff(config, socket);
    return;
  }
  const self = new URL(import.meta.url).href;
  const code = `import(${JSON.stringify(self)}).then((m) => m.writeHandoff(process.argv[1], process.argv[2], Number(process.argv[3]))).catch((e) => { process.stderr.write(String(e && e.code || e)); process.exitCode = 1; })`;
  // a clean environment: no NODE_OPTIONS (a preload may not be readable by that user)
  const r = spawnSync(process.execPath, ['-e', code, config, socket, String(process.pid)], { uid: as.uid, gid: as.gid, env: { PATH: '/usr/bin:/bin' }, stdio: ['ignore', 'ignore', 'pipe'], timeout: 30_000 });
  if (r.status !== 0) {
    const why = `as uid ${as.uid}: ${r.error?.message ?? (r.stderr.toString('utf8').trim() || `exit ${String(r.status ?? r.signal)}`)}`;
    throw Object.assign(new Error(why), { code: why });
  }
}

/** Remove the file if it is still this process's (a later serve may have replaced it). Never throws. */
export function removeHandoff(dir: string): void {
  const f = join(dir, HANDOFF_FILE);
  let fd: number | null = null;
  try {
    fd = openSync(f, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
    const st = fstatSync(fd);
    if (!st.isFile() || st.size > MAX_FILE) return;
    const buf = Buffer.alloc(st.size);
    if (readSync(fd, buf, 0, buf.length, 0) !== buf.length) return;
    const v = JSON.parse(buf.toString('utf8')) as { pid?: unknown };
    if (v.pid === process.pid) unlinkSync(f); // unlink replaces no link target: it removes the entry
  } catch {
    /* gone, or not ours */
  } finally {
    if (fd !== null) closeSync(fd);
  }
}
