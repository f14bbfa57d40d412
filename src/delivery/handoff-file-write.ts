/**
 * NAME        src/delivery/handoff-file-write — serve writes and removes DIR/deliver-handoff.json
 * SYNOPSIS    writeHandoffAs(instance.file, socket, writerFor(instance.dir, mailUser)); removeHandoff(dir)
 * DESCRIPTION The serve side of src/delivery/handoff-file.ts (the file's format, and how
 *             `pigeon deliver` reads and checks it, are there). Kept apart from it so the module
 *             every `pigeon deliver` runs holds no code of serve's (node:module, the writer
 *             child): forkers/listen.ts loads this one when the hand-off socket opens and closes.
 * SECURITY    As handoff-file.ts says: a new file (O_EXCL, O_NOFOLLOW) renamed over the old one,
 *             and written as root only into a directory root alone may change; otherwise in a
 *             short-lived child process as the directory's owner (or mail_user).
 */
import { createRequire } from 'node:module';
import { closeSync, constants, fstatSync, lstatSync, openSync, readSync, renameSync, unlinkSync, writeSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { HANDOFF_FILE, MAX_FILE, euid } from './handoff-file.js';

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
  if (rootAloneMayChange(st)) return null;
  return st.uid !== 0 ? { uid: st.uid, gid: st.gid } : { uid: mailUser.uid, gid: mailUser.gid };
}

/** A directory root alone may change (root's, not group- or world-writable): root writes into no other. */
export function rootAloneMayChange(st: { readonly uid: number; readonly mode: number }): boolean {
  return st.uid === 0 && (st.mode & 0o022) === 0;
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
  // loaded here, not at the top: deliver, which reads this module on every message, never spawns
  const { spawnSync } = createRequire(import.meta.url)('node:child_process') as typeof import('node:child_process');
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
