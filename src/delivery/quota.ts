/**
 * NAME        src/delivery/quota — Maildir++ quota: the `maildirsize` file Dovecot and Courier honour
 * DESCRIPTION `maildirsize` in the Maildir root: first line the limit (`<bytes>S`), then one
 *             `<bytes> <count>` line per change. Usage is the sum of all lines. As Courier and
 *             Dovecot do, the file is recalculated from the messages themselves (the S= size in
 *             the file name, else stat) when it is missing, longer than 5120 bytes, or its limit
 *             line differs from the configured limit. Updates are single O_APPEND writes, so
 *             concurrent deliveries never lose one another's lines.
 * SECURITY    Runs in the mail writer (as the mail user). `maildirsize` is opened with O_NOFOLLOW
 *             and must be a regular file with one link (src/writer/safe-fs.ts); a symlinked or
 *             hard-linked one is never read or appended to: it is recalculated, and the rename
 *             replaces the link itself (its target is left alone).
 */
import { readdirSync, statSync, constants } from 'node:fs';
import { rename, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { openChecked, createExclusive } from '../writer/safe-fs.js';

const MAX_FILE = 5120;

export interface QuotaUsage {
  readonly bytes: number;
  readonly count: number;
}

function sizeFromName(dir: string, name: string): number {
  const m = /,S=(\d+)/.exec(name);
  if (m?.[1] !== undefined) return Number(m[1]);
  try {
    return statSync(join(dir, name)).size;
  } catch {
    return 0; // expunged meanwhile
  }
}

/** Scan INBOX and every Maildir++ folder (.Name) except Trash-less rules: everything counts. */
export function scanMaildir(root: string): QuotaUsage {
  let bytes = 0;
  let count = 0;
  const folders = [root];
  try {
    for (const e of readdirSync(root, { withFileTypes: true })) {
      if (e.isDirectory() && e.name.startsWith('.') && e.name !== '.' && e.name !== '..' && !e.name.startsWith('.pigeon')) folders.push(join(root, e.name));
    }
  } catch {
    /* an unreadable root counts as empty; delivery itself will fail loudly */
  }
  for (const f of folders) {
    for (const sub of ['cur', 'new']) {
      const d = join(f, sub);
      let names: string[];
      try {
        names = readdirSync(d);
      } catch {
        continue;
      }
      for (const n of names) {
        if (n.startsWith('.')) continue;
        bytes += sizeFromName(d, n);
        count++;
      }
    }
  }
  return { bytes, count };
}

/** Current usage from maildirsize, recalculated when it is missing, stale or too long. */
export async function readUsage(root: string, limit: number): Promise<QuotaUsage> {
  const file = join(root, 'maildirsize');
  let text: string | null = null;
  let fh;
  try {
    fh = await openChecked(file, constants.O_RDONLY, 0, { singleLink: true });
  } catch (e) {
    // missing, or a link / special file in its place: recalculate, and the rename replaces it
    const code = (e as NodeJS.ErrnoException).code;
    if (code !== 'ENOENT' && code !== 'EUNSAFE') throw e;
  }
  if (fh) {
    try {
      const size = (await fh.stat()).size;
      if (size <= MAX_FILE) {
        const buf = Buffer.alloc(size);
        const { bytesRead } = await fh.read(buf, 0, size, 0);
        text = buf.subarray(0, bytesRead).toString('latin1');
      }
    } finally {
      await fh.close();
    }
  }
  if (text !== null) {
    const lines = text.split('\n');
    const def = lines[0] ?? '';
    if (def === `${limit}S`) {
      let bytes = 0;
      let count = 0;
      let ok = true;
      for (const l of lines.slice(1)) {
        if (l.trim() === '') continue;
        const m = /^\s*(-?\d+)\s+(-?\d+)\s*$/.exec(l);
        if (!m) {
          ok = false;
          break;
        }
        bytes += Number(m[1]);
        count += Number(m[2]);
      }
      if (ok) return { bytes, count };
    }
  }
  return recalculate(root, limit);
}

/** Rewrite maildirsize from the messages (new file in tmp/ + rename: a link in its place is replaced, not followed). */
export async function recalculate(root: string, limit: number): Promise<QuotaUsage> {
  const u = scanMaildir(root);
  const tmp = join(root, 'tmp', `maildirsize.${process.pid}.${Date.now()}`);
  try {
    const fh = await createExclusive(tmp);
    if (fh) {
      try {
        await fh.write(`${limit}S\n${u.bytes} ${u.count}\n`);
      } finally {
        await fh.close();
      }
      await rename(tmp, join(root, 'maildirsize'));
    }
  } catch {
    await unlink(tmp).catch(() => undefined);
    /* a quota file we cannot write is recalculated next time */
  }
  return u;
}

/** Account one delivered message (single O_APPEND write). */
export async function addUsage(root: string, bytes: number, count: number): Promise<void> {
  let fh;
  try {
    // no O_CREAT: a missing file is recalculated (with its limit line) on the next delivery
    fh = await openChecked(join(root, 'maildirsize'), constants.O_WRONLY | constants.O_APPEND, 0, { singleLink: true });
  } catch {
    return; /* missing (recalculated next time) or unsafe (refused by the next delivery's readUsage) */
  }
  try {
    await fh.write(`${bytes} ${count}\n`);
  } catch {
    /* recalculated when it no longer adds up */
  } finally {
    await fh.close();
  }
}
