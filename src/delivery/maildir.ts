/**
 * NAME        src/delivery/maildir — MDA module: Maildir++ (what Dovecot and Courier read)
 * DESCRIPTION Delivery writes tmp/NAME with an exclusive create, in one write when the message is
 *             in memory, fdatasyncs it, and on commit renames it into new/ and fsyncs new/ — only
 *             then is the message acknowledged. The fsync of new/ is shared by the deliveries
 *             into the same new/ that renamed before it began (group commit,
 *             src/writer/safe-fs.ts fsyncDirGrouped); each is answered after the fsync that
 *             covers its rename. Only the two fsyncs wait on the thread pool (in the mail writer
 *             child holding one delivery, not even they: safe-fs.ts syncInPlaceWhen): create,
 *             write, close and rename run in place (metadata and page cache). NAME is
 *             Dovecot's form `SECS.MUSECSPpidQn.host,S=size,W=vsize`, so Dovecot and the quota
 *             scan never need to stat it. A kill -9 at any point leaves at most a file in tmp/,
 *             never a partial one in new/.
 *             tmp/ clean-up (Maildir's rule): files in tmp/ untouched for 36 hours are leftovers
 *             of killed deliveries and are removed, at most once per hour per tmp/ directory (a
 *             stamp file `tmp/.pigeon-tmp-clean` remembers the last scan across processes).
 *             `+detail` (or -m) selects an existing Maildir++ folder `.detail`; a missing one means
 *             INBOX (folders are never created by mail from outside). A folder a scan module chose
 *             (the antivirus quarantine: StoreRequest.createFolder) is created when missing.
 *             Quota: Maildir++ `maildirsize` (src/delivery/quota.ts).
 * SECURITY    `store` runs in the mail writer, as the mail user (src/writer/mail-writer.ts): files
 *             are 0600 and owned by the mail user because the mail user creates them. tmp/, new/
 *             and the folder must be reached from the mail root without a symbolic link
 *             (src/writer/safe-fs.ts checkDir); a link there defers the message (4.2.0).
 */
import { mailError } from '../errors.js';
import { existsSync, readdirSync, statSync, lstatSync, constants, writevSync, closeSync, renameSync } from 'node:fs';
import { readdir, lstat, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import type { Allocation } from '../store.js';
import { readUsage, addUsage } from './quota.js';
import { fault } from './fault.js';
import { fsFailure, overQuota, type Held, type MdaModule, type StoreRequest } from './mda.js';
import type { DeliveryResult } from './types.js';
import { baseOf, checkChildDir, checkDir, createExclusive, createExclusiveSync, ensureDir, fdatasyncFd, fsyncDir, fsyncDirGrouped, openChecked } from '../writer/safe-fs.js';

/** Maildir's rule: a file in tmp/ untouched this long is a leftover (Dovecot, qmail: 36 hours). */
export const TMP_MAX_AGE_MS = 36 * 3600_000;
/** A tmp/ directory is scanned for leftovers at most this often. */
export const TMP_SCAN_EVERY_MS = 3600_000;
export const TMP_STAMP = '.pigeon-tmp-clean';

/** A body spilled to disk is written in batches of this many bytes (one in memory: at once). */
const WRITE_BATCH = 1024 * 1024;

/** Write all of `bufs` at `pos` (writev, again for what a short write left); the bytes written. */
function writeAll(fd: number, bufs: readonly Buffer[], pos: number): number {
  let rest = bufs.filter((b) => b.length > 0);
  let done = 0;
  while (rest.length > 0) {
    let n = writevSync(fd, rest, pos + done);
    if (n <= 0) throw Object.assign(new Error('write returned 0'), { code: 'EIO' });
    done += n;
    const left: Buffer[] = [];
    for (const b of rest) {
      if (n >= b.length) n -= b.length;
      else {
        left.push(n > 0 ? b.subarray(n) : b);
        n = 0;
      }
    }
    rest = left;
  }
  return done;
}

let counter = 0;

function hostPart(hostname: string): string {
  return hostname.replace(/\//g, '\\057').replace(/:/g, '\\072');
}

export function uniqueName(hostname: string, size: number, vsize: number): string {
  const now = Date.now();
  const secs = Math.floor(now / 1000);
  const usecs = (now % 1000) * 1000 + Math.floor(Math.random() * 1000);
  counter++;
  // R: 32 random bits against a pid reused within the same second (Math.random, seeded per
  // process by V8 from the system's entropy: unique, not secret; node:crypto is not loaded for it)
  const r = Math.floor(Math.random() * 0x1_0000_0000).toString(16).padStart(8, '0');
  return `${secs}.M${usecs}P${process.pid}Q${counter}R${r}.${hostPart(hostname)},S=${size},W=${vsize}`;
}

/** Find an existing Maildir++ folder for `name` (exact, then case-insensitive). */
export function findFolder(root: string, name: string): string | null {
  if (name === '' || name.includes('/') || name.startsWith('.') || /[\0\r\n]/.test(name)) return null;
  if (name.toUpperCase() === 'INBOX') return null;
  const want = `.${name}`;
  const ok = (d: string): boolean => existsSync(join(root, d, 'new')) && existsSync(join(root, d, 'tmp'));
  if (ok(want)) return want;
  try {
    for (const e of readdirSync(root)) if (e.toLowerCase() === want.toLowerCase() && ok(e)) return e;
  } catch {
    /* unreadable root: deliver to INBOX, which then fails loudly */
  }
  return null;
}

/** A name findFolder would look up (and createFolder may create): no path, no leading dot, not INBOX. */
export function validFolderName(name: string): boolean {
  return name !== '' && !name.includes('/') && !name.startsWith('.') && !/[\0\r\n]/.test(name) && name.toUpperCase() !== 'INBOX';
}

/**
 * Create the Maildir++ folder `.NAME` (cur/, new/, tmp/ and the `maildirfolder` marker) below
 * `root`, as whoever runs this (the mail writer: the mail user). Returns its directory name.
 */
export async function createFolder(base: string, root: string, name: string): Promise<string> {
  const d = `.${name}`;
  checkDir(base, root);
  await ensureDir(base, join(root, d));
  for (const s of ['cur', 'new', 'tmp']) await ensureDir(base, join(root, d, s));
  const marker = await createExclusive(join(root, d, 'maildirfolder'));
  await marker?.close();
  // its cur/ new/ tmp/ entries, then its own entry in the mailbox: durable before a message in it is
  await fsyncDir(join(root, d));
  await fsyncDir(root);
  return d;
}

// per process (a long-lived writer): tmp/ directories scanned recently
const scanned = new Map<string, number>();

/** Remove leftovers older than TMP_MAX_AGE_MS from `tmp`, at most once per TMP_SCAN_EVERY_MS. */
export async function cleanTmp(tmp: string, now = Date.now()): Promise<number> {
  const last = scanned.get(tmp);
  if (last !== undefined && now - last < TMP_SCAN_EVERY_MS) return 0;
  const stamp = join(tmp, TMP_STAMP);
  try {
    const st = lstatSync(stamp);
    if (st.isFile() && now - st.mtimeMs < TMP_SCAN_EVERY_MS && st.mtimeMs <= now) {
      scanned.set(tmp, st.mtimeMs);
      return 0;
    }
  } catch {
    /* no stamp yet */
  }
  scanned.set(tmp, now);
  if (scanned.size > 10_000) scanned.clear(); // a bound for a long-lived writer serving many boxes
  const fh = (await createExclusive(stamp)) ?? (await openChecked(stamp, constants.O_WRONLY, 0, { singleLink: true }));
  try {
    await fh.utimes(now / 1000, now / 1000);
  } finally {
    await fh.close();
  }
  let removed = 0;
  for (const name of await readdir(tmp)) {
    if (name === TMP_STAMP) continue;
    const p = join(tmp, name);
    try {
      const st = await lstat(p);
      if (st.isDirectory()) continue;
      if (now - Math.max(st.mtimeMs, st.atimeMs) > TMP_MAX_AGE_MS) {
        await unlink(p);
        removed++;
      }
    } catch {
      /* gone meanwhile */
    }
  }
  return removed;
}

async function store(req: StoreRequest, body: AsyncIterable<Buffer>): Promise<Held | DeliveryResult> {
  const root = req.path;
  const base = baseOf(req.mailRoot, root);
  let folderDir = req.folder === null ? null : findFolder(root, req.folder);
  if (folderDir === null && req.folder !== null && req.createFolder && validFolderName(req.folder)) {
    try {
      folderDir = await createFolder(base, root, req.folder);
    } catch (e) {
      return fsFailure(e, `create folder .${req.folder}`);
    }
  }
  const dir = folderDir === null ? root : join(root, folderDir);
  const tmpDir = join(dir, 'tmp');
  const newDir = join(dir, 'new');
  try {
    // the mailbox from the mail root; what lies inside it, one lstat each
    checkDir(base, root);
    if (dir !== root) checkChildDir(root, dir);
    checkChildDir(dir, tmpDir);
    checkChildDir(dir, newDir);
  } catch (e) {
    return fsFailure(e, `open ${folderDir ?? 'INBOX'}`);
  }
  if (req.quota > 0) {
    try {
      const used = await readUsage(root, req.quota);
      const full = overQuota(req, used.bytes, req.size);
      if (full) return full;
    } catch (e) {
      return fsFailure(e, 'maildirsize');
    }
  }
  try {
    await cleanTmp(tmpDir);
  } catch {
    /* a failed clean-up never stops a delivery; it is retried in an hour */
  }
  const name = uniqueName(req.hostname, req.size, req.vsize);
  const tmp = join(tmpDir, name);
  // open, write and close are metadata and page-cache operations: done in place, no thread-pool
  // round trip each; only the fdatasync waits for the disk (safe-fs.ts fdatasyncFd)
  let fd: number | null;
  try {
    fd = createExclusiveSync(tmp);
    if (fd === null) throw Object.assign(new Error(`${tmp} exists`), { code: 'EEXIST' });
  } catch (e) {
    return fsFailure(e, `create ${join(folderDir ?? '', 'tmp')}`);
  }
  const file = fd;
  let closed = false;
  try {
    // one write for the whole message when it is in memory (trace headers, header section,
    // body); a body spilled to disk goes in batches of WRITE_BATCH bytes
    let pos = 0;
    let batch: Buffer[] = [req.prefix];
    let batched = req.prefix.length;
    const flush = (): void => {
      pos += writeAll(file, batch, pos);
      batch = [];
      batched = 0;
    };
    let first = true;
    for await (const chunk of body) {
      // a copy: a body read back from the spool file reuses one buffer for every chunk
      batch.push(Buffer.from(chunk));
      batched += chunk.length;
      if (batched >= WRITE_BATCH) {
        flush();
        if (first) await fault('tmp-partial');
        first = false;
      }
    }
    flush();
    if (first) await fault('tmp-partial');
    // a new file: fdatasync writes its data and the size that reaches it; the name in tmp/ does
    // not matter (the rename into new/ and the fsync of new/ make it visible and durable)
    await fdatasyncFd(file);
    closed = true;
    closeSync(file);
    await fault('tmp-synced');
  } catch (e) {
    if (!closed) {
      try {
        closeSync(file);
      } catch {
        /* nothing more to do: the file is removed below */
      }
    }
    await unlink(tmp).catch(() => undefined);
    return fsFailure(e, 'write tmp');
  }
  const target = join(newDir, name);
  return {
    what: `maildir ${target}`,
    folder: folderDir === null ? 'INBOX' : folderDir.slice(1),
    size: req.size,
    async commit() {
      try {
        checkDir(base, newDir);
        renameSync(tmp, target);
      } catch (e) {
        await unlink(tmp).catch(() => undefined);
        throw mailError(fsFailure(e, 'rename into new'));
      }
      await fault('renamed');
      try {
        // shared with every other delivery into new/ that renamed before it began (group commit)
        await fsyncDirGrouped(newDir);
      } catch (e) {
        // the rename may not be durable: say so, Postfix retries (a duplicate beats a loss)
        await unlink(target).catch(() => undefined);
        throw mailError(fsFailure(e, 'fsync new'));
      }
      if (req.quota > 0) await addUsage(root, req.size, 1);
    },
    async abort() {
      await unlink(tmp).catch(() => undefined);
    },
  };
}

const maildir: MdaModule = {
  kind: 'mda',
  name: 'maildir',
  summary: 'Maildir++ (tmp → new, fsync; maildirsize quota; folders as .NAME)',
  isAllocated(a: Allocation): boolean {
    try {
      return statSync(join(a.path, 'new')).isDirectory() && statSync(join(a.path, 'tmp')).isDirectory();
    } catch {
      return false;
    }
  },
  store,
};

export default maildir;
