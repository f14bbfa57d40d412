/**
 * NAME        src/delivery/vacation-state — the vacation module's once-per-sender state files
 * DESCRIPTION One file per (recipient, sender hash) under MAIL_ROOT/.pigeon-vacation/DOMAIN/LOCAL,
 *             created with O_EXCL (first answer) and re-armed by its mtime. `dueNow` says whether
 *             a reply is due now and arms the interval.
 * SECURITY    Runs in the mail writer, as the mail user (src/writer/mail-writer.ts). The
 *             directories must be reached without a symbolic link and an existing state file is
 *             opened with O_NOFOLLOW and must be a regular file with one link
 *             (src/writer/safe-fs.ts): a link in its place is an error, never followed.
 */
import { constants } from 'node:fs';
import { join } from 'node:path';
import { cryptoModule } from '../builtins.js';
import { createExclusive, ensureDir, openChecked } from '../writer/safe-fs.js';

/** True when this (recipient, sender) pair is due a reply now; arms the interval. */
export async function dueNow(root: string, rel: readonly string[], sender: string, days: number): Promise<boolean> {
  const dir = join(root, ...rel);
  await ensureDir(root, dir);
  const f = join(dir, cryptoModule().createHash('sha256').update(sender.toLowerCase()).digest('hex').slice(0, 32));
  const created = await createExclusive(f);
  if (created) {
    await created.close();
    return true;
  }
  const fh = await openChecked(f, constants.O_RDONLY, 0, { singleLink: true });
  try {
    const age = Date.now() - (await fh.stat()).mtimeMs;
    if (age < days * 86_400_000) return false;
    const now = new Date();
    await fh.utimes(now, now);
    return true;
  } finally {
    await fh.close();
  }
}
