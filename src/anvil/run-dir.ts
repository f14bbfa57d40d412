/**
 * NAME        src/anvil/run-dir — the directory holding the node state service's socket
 * DESCRIPTION `run_dir` in pigeon.yaml (default `run` inside the instance directory). It is
 *             created (mode 0700) when missing, then opened once, without following a symlink,
 *             and checked on the open descriptor: a directory, owned by this user or by root,
 *             writable by its owner only. Everything after that goes through
 *             /proc/self/fd/N/NAME, i.e. relative to the checked directory (no path swap between
 *             check and use), which also keeps socket paths short (a unix socket path has at most
 *             107 bytes; instance directories can be longer).
 *             `mine` says whether this process may create the socket there (it owns the
 *             directory); a process that only may connect uses a service someone else started.
 * SECURITY    Root never uses a run directory another user owns or can write to: the mail
 *             account must not be able to plant files that root then writes through. Clients of
 *             other users connect through the directory's and the socket's group permissions
 *             (e.g. root-owned, mode 2750, group of the Postfix spawn user).
 */
import { closeSync, constants, existsSync, fstatSync, mkdirSync, openSync } from 'node:fs';

export class RunDirError extends Error {
  override readonly name = 'RunDirError';
}

export interface RunDir {
  readonly path: string;
  /** this process owns the directory: it may start the service there */
  readonly mine: boolean;
  /** a path for NAME inside the checked directory */
  at(name: string): string;
  close(): void;
}

function euid(): number {
  return process.geteuid?.() ?? 0;
}

/** Create (if asked) and open the run directory; throws RunDirError saying why it is unusable. */
export function openRunDir(path: string, opts: { create: boolean }): RunDir {
  if (opts.create) {
    try {
      mkdirSync(path, { mode: 0o700 });
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code !== 'EEXIST') throw new RunDirError(`run_dir ${path}: cannot create: ${code ?? String(e)}`);
    }
  }
  let fd: number;
  try {
    fd = openSync(path, constants.O_RDONLY | constants.O_DIRECTORY | constants.O_NOFOLLOW);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new RunDirError(`run_dir ${path}: cannot open: ${code === 'ELOOP' || code === 'ENOTDIR' ? 'not a directory (symlinks are not followed)' : (code ?? String(e))}`);
  }
  const st = fstatSync(fd);
  const me = euid();
  const why = !st.isDirectory()
    ? 'not a directory'
    : st.uid !== me && st.uid !== 0
      ? `owned by uid ${st.uid}, neither this user (${me}) nor root`
      : (st.mode & 0o022) !== 0
        ? `writable by ${[(st.mode & 0o020) !== 0 ? 'its group' : '', (st.mode & 0o002) !== 0 ? 'others' : ''].filter((w) => w !== '').join(' and ')} (mode ${(st.mode & 0o7777).toString(8)}); only its owner may write there`
        : null;
  if (why !== null) {
    closeSync(fd);
    throw new RunDirError(`run_dir ${path}: ${why}`);
  }
  const base = existsSync(`/proc/self/fd/${fd}`) ? `/proc/self/fd/${fd}` : path;
  let open = true;
  return {
    path,
    mine: st.uid === me,
    at: (name) => `${base}/${name}`,
    close: () => {
      if (open) closeSync(fd);
      open = false;
    },
  };
}
