/**
 * NAME        src/delivery/quota — Maildir++ quota: the `maildirsize` file Dovecot and Courier honour
 * DESCRIPTION `maildirsize` in the Maildir root: first line the limit (`<bytes>S`), then one
 *             `<bytes> <count>` line per change. Usage is the sum of all lines. As Courier and
 *             Dovecot do, the file is recalculated from the messages themselves (the S= size in
 *             the file name, else stat) when it is missing, longer than 5120 bytes, or its limit
 *             line differs from the configured limit. Updates are single O_APPEND writes, so
 *             concurrent deliveries never lose one another's lines.
 */
import { readFileSync, readdirSync, statSync, writeFileSync, renameSync, openSync, writeSync, closeSync, fchownSync, constants } from 'node:fs';
import { join } from 'node:path';
import type { MailUser } from '../mailuser.js';

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
export function readUsage(root: string, limit: number, mu: MailUser): QuotaUsage {
  const file = join(root, 'maildirsize');
  let text: string | null = null;
  try {
    if (statSync(file).size <= MAX_FILE) text = readFileSync(file, 'latin1');
  } catch {
    text = null;
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
  return recalculate(root, limit, mu);
}

/** Rewrite maildirsize from the messages (tmp file + rename). */
export function recalculate(root: string, limit: number, mu: MailUser): QuotaUsage {
  const u = scanMaildir(root);
  const tmp = join(root, 'tmp', `maildirsize.${process.pid}.${Date.now()}`);
  try {
    writeFileSync(tmp, `${limit}S\n${u.bytes} ${u.count}\n`, { mode: 0o600 });
    if (mu.switchTo) {
      const fd = openSync(tmp, 'r');
      try {
        fchownSync(fd, mu.uid, mu.gid);
      } finally {
        closeSync(fd);
      }
    }
    renameSync(tmp, join(root, 'maildirsize'));
  } catch {
    /* a quota file we cannot write is recalculated next time */
  }
  return u;
}

/** Account one delivered message (single O_APPEND write). */
export function addUsage(root: string, bytes: number, count: number): void {
  try {
    // no O_CREAT: a missing file is recalculated (with its limit line) on the next delivery
    const fd = openSync(join(root, 'maildirsize'), constants.O_WRONLY | constants.O_APPEND);
    try {
      writeSync(fd, `${bytes} ${count}\n`);
    } finally {
      closeSync(fd);
    }
  } catch {
    /* missing file: recalculated on the next delivery */
  }
}
