/**
 * NAME        src/writer/safe-fs — open and create files under the mail root without following links
 * DESCRIPTION Everything the delivery agent writes under the mail root goes through here:
 *             - a directory it writes into must be reached from the mail root without a symbolic
 *               link (realpath of the directory = realpath of the mail root + the relative path),
 *               so a symlinked DOMAIN, mailbox, tmp/, new/ or folder is refused;
 *             - a file it opens is opened with O_NOFOLLOW (a symlink fails with ELOOP) and
 *               O_NONBLOCK (a FIFO cannot make it hang), then fstat'ed: it must be a regular file,
 *               and a file opened to append or rewrite (mbox, maildirsize, vacation state, lock
 *               files) must have exactly one link, so a hard link to another file is refused too;
 *             - a file it creates is created with O_CREAT|O_EXCL, which never follows a link.
 *             A refusal is an UnsafePathError (code EUNSAFE); ELOOP from O_NOFOLLOW is reported the
 *             same way by src/delivery/mda.ts fsFailure: the delivery is deferred (4.2.0).
 *             A mailbox outside the mail root (provisioned elsewhere) is checked from its parent.
 *             `fsyncDirGrouped` is group commit for directories: callers whose rename (or create)
 *             is done join the next fsync of that directory; at most one fsync per directory
 *             runs at a time, and the next one starts when it ends, for everyone who joined
 *             meanwhile. A caller's promise settles only after an fsync that began after it
 *             joined, so each is covered by the fsync it waits for (databases batch their log
 *             flushes the same way).
 *             Waiting for the disk: `fdatasyncFd` and the directory fsyncs run on Node's thread
 *             pool (the event loop keeps serving meanwhile), one round trip each: the directory is
 *             opened and closed in place (a path lookup, no disk wait). A process whose event loop
 *             has nothing else to do while one delivery waits — the mail writer child when it
 *             holds a single operation — says so with `syncInPlaceWhen`; the syncs are then made
 *             directly, saving two thread switches each (on a loaded machine each switch waits
 *             for a CPU). The same syscalls in the same order either way: durability does not
 *             depend on the mode.
 * SECURITY    These checks hold for any uid; the writes themselves run as the mail user
 *             (src/writer/mail-writer.ts), so even a race between check and use can only make the
 *             mail user write where the mail user may write anyway.
 */
import { constants, realpathSync, lstatSync, openSync, closeSync, fsync, fsyncSync, fdatasync, fdatasyncSync } from 'node:fs';
import { open, mkdir, type FileHandle } from 'node:fs/promises';
import { dirname, join, relative, resolve, isAbsolute, sep } from 'node:path';
import { fault, faultArmed } from '../delivery/fault.js';

export class UnsafePathError extends Error {
  readonly code = 'EUNSAFE';
}

const isUnder = (base: string, p: string): boolean => {
  const rel = relative(base, p);
  return rel !== '' && !rel.startsWith('..') && !isAbsolute(rel) && !rel.split(sep).includes('..');
};

/**
 * The trusted directory paths below which links are refused: the mail root when `box` lies under
 * it, else the mailbox's parent directory.
 */
export function baseOf(mailRoot: string, box: string): string {
  // normalised: a mail_root written with a trailing slash (or `..`) names the same directory, and
  // checkDir and ensureDir compare paths as strings
  return isUnder(mailRoot, box) ? resolve(mailRoot) : dirname(resolve(box));
}

/** `dir` must be a directory reached from `base` through no symbolic link. Throws ENOENT when missing. */
export function checkDir(base: string, dir: string): void {
  if (resolve(dir) === resolve(base)) return;
  if (!isUnder(base, dir)) throw new UnsafePathError(`${dir} is not below ${base}`);
  const real = realpathSync.native(dir);
  const want = join(realpathSync.native(base), relative(base, dir));
  if (real !== want) throw new UnsafePathError(`${dir} is reached through a symbolic link (it resolves to ${real})`);
  if (!lstatSync(dir).isDirectory()) throw new UnsafePathError(`${dir} is not a directory`);
}

/**
 * checkDir for a directory directly inside `parent`, which checkDir has just accepted: one lstat
 * instead of resolving the whole path again (the parent is reached through no link, so the child
 * is too unless it is a link itself).
 */
export function checkChildDir(parent: string, dir: string): void {
  if (dirname(resolve(dir)) !== resolve(parent)) throw new UnsafePathError(`${dir} is not directly below ${parent}`);
  const st = lstatSync(dir);
  if (st.isSymbolicLink()) throw new UnsafePathError(`${dir} is reached through a symbolic link (it is one)`);
  if (!st.isDirectory()) throw new UnsafePathError(`${dir} is not a directory`);
}

/** mkdir -p below `base` (mode for what it creates), then checkDir on the result. */
export async function ensureDir(base: string, dir: string, mode = 0o700): Promise<void> {
  base = resolve(base);
  dir = resolve(dir);
  if (dir !== base) {
    if (!isUnder(base, dir)) throw new UnsafePathError(`${dir} is not below ${base}`);
    const parent = dirname(dir);
    if (parent !== base) await ensureDir(base, parent, mode);
    try {
      await mkdir(dir, { mode });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    }
  }
  checkDir(base, dir);
}

const NOFOLLOW = constants.O_NOFOLLOW | constants.O_NONBLOCK;

export interface OpenChecks {
  /** refuse a file with more than one link (anything opened to append or rewrite) */
  readonly singleLink: boolean;
}

/** Open an existing file (or create it with O_CREAT in `flags`) without following a link; check what was opened. */
export async function openChecked(path: string, flags: number, mode: number, checks: OpenChecks): Promise<FileHandle> {
  let fh: FileHandle;
  try {
    fh = await open(path, flags | NOFOLLOW, mode);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ELOOP') throw new UnsafePathError(`${path} is a symbolic link`);
    throw e;
  }
  try {
    const st = await fh.stat();
    if (!st.isFile()) throw new UnsafePathError(`${path} is not a regular file`);
    if (checks.singleLink && st.nlink !== 1) throw new UnsafePathError(`${path} has ${st.nlink} hard links`);
  } catch (e) {
    await fh.close().catch(() => undefined);
    throw e;
  }
  return fh;
}

/** Create a new file exclusively (O_EXCL never follows a link); null when it exists. */
export async function createExclusive(path: string, mode = 0o600): Promise<FileHandle | null> {
  try {
    return await open(path, constants.O_CREAT | constants.O_EXCL | constants.O_RDWR | NOFOLLOW, mode);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EEXIST') return null;
    throw e;
  }
}

/** createExclusive, as a file descriptor and without a thread-pool round trip (a metadata operation). */
export function createExclusiveSync(path: string, mode = 0o600): number | null {
  try {
    return openSync(path, constants.O_CREAT | constants.O_EXCL | constants.O_RDWR | NOFOLLOW, mode);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EEXIST') return null;
    throw e;
  }
}

/** Nothing else waits on this process's event loop: a sync may block it (see syncInPlaceWhen). */
let inPlace: () => boolean = () => false;

/**
 * Make this process's fsyncs directly, without a thread-pool round trip, whenever `alone()` says
 * that nothing else is waiting on its event loop (the mail writer child: one operation in flight).
 * Never for a process that serves clients: a slow disk would stall all of them.
 */
export function syncInPlaceWhen(alone: () => boolean): void {
  inPlace = alone;
}

/** fdatasync an open file: on the thread pool, or in place (syncInPlaceWhen). */
export function fdatasyncFd(fd: number): Promise<void> {
  if (inPlace()) {
    try {
      fdatasyncSync(fd);
      return Promise.resolve();
    } catch (e) {
      return Promise.reject(e);
    }
  }
  return new Promise((res, rej) => fdatasync(fd, (e) => (e ? rej(e) : res())));
}

/** fsync a directory (after a rename or create in it): opened and closed in place, one thread-pool round trip for the fsync. */
export async function fsyncDir(dir: string): Promise<void> {
  const fd = openSync(dir, constants.O_RDONLY | constants.O_DIRECTORY | constants.O_NOFOLLOW);
  try {
    if (inPlace()) fsyncSync(fd);
    else await new Promise<void>((res, rej) => fsync(fd, (e) => (e ? rej(e) : res())));
  } finally {
    closeSync(fd);
  }
}

interface DirBatch {
  /** callers that joined it */
  members: number;
  readonly promise: Promise<void>;
  readonly resolve: () => void;
  readonly reject: (e: unknown) => void;
}

interface DirSync {
  /** the fsync in progress, if any */
  running: boolean;
  /** who joined since it began: covered by the next fsync */
  next: DirBatch | null;
}

const dirSyncs = new Map<string, DirSync>();

function startDirSync(dir: string, st: DirSync): void {
  const batch = st.next;
  if (batch === null) {
    dirSyncs.delete(dir);
    return;
  }
  st.next = null;
  st.running = true;
  if (batch.members > 1 && faultArmed('shared-dir-sync')) {
    void fault('shared-dir-sync'); // tests: killed here, none of the batch answered
    return;
  }
  fsyncDir(dir).then(batch.resolve, batch.reject).finally(() => {
    st.running = false;
    startDirSync(dir, st);
  });
}

/**
 * fsync `dir` for a caller whose change in it is complete: joins the next fsync of that directory
 * (group commit). Settles only after an fsync that started after this call.
 */
export function fsyncDirGrouped(dir: string): Promise<void> {
  // alone (syncInPlaceWhen): nobody else could share this fsync, it is made at once
  if (inPlace() && !dirSyncs.has(dir)) return fsyncDir(dir);
  let st = dirSyncs.get(dir);
  if (!st) {
    st = { running: false, next: null };
    dirSyncs.set(dir, st);
  }
  if (st.next === null) {
    let resolve!: () => void;
    let reject!: (e: unknown) => void;
    const promise = new Promise<void>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    st.next = { members: 0, promise, resolve, reject };
    // the first of a batch waits one turn of the event loop, so renames finishing together share it
    if (!st.running) {
      const s = st;
      setImmediate(() => {
        if (!s.running) startDirSync(dir, s);
      });
    }
  }
  st.next.members++;
  return st.next.promise;
}
