/**
 * NAME        src/creators/lock — creator module `lock` (the default): one allocator at a time
 * DESCRIPTION The database's lock for this user where it has one (PostgreSQL: an advisory lock,
 *             cluster-wide), else an exclusive lock file under the mail root (SQLite: every node
 *             sharing the file shares the host), created and removed by the mail writer (as the
 *             mail user, no link followed). A lock file older than the wait belongs to a dead
 *             process and is taken over. Then placeUser's compare-and-set.
 * DIAGNOSTICS AppError TEMPFAIL when the lock stays busy for ALLOCATION_LOCK_WAIT_MS.
 */
import { join } from 'node:path';
import type { Creator } from './types.js';
import { AppError } from '../errors.js';
import { mailWriter } from '../writer/mail-writer.js';
import { ALLOCATION_LOCK_WAIT_MS } from '../limits.js';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export default {
  kind: 'creator',
  name: 'lock',
  summary: "the database's lock for the user (PostgreSQL), else a lock file under the mail root",
  creates: true,
  async exclusive(ctx, user, attempt, settled) {
    if (ctx.store.userLock !== null) {
      const done = await settled();
      if (done !== null) return done;
      return ctx.store.userLock(user.id, ALLOCATION_LOCK_WAIT_MS, attempt);
    }
    const lock = join(ctx.mailRoot, '.pigeon-allocate.lock');
    const w = mailWriter(ctx.mailUser);
    const deadline = Date.now() + ALLOCATION_LOCK_WAIT_MS;
    for (;;) {
      const done = await settled();
      if (done !== null) return done;
      let taken: boolean;
      try {
        taken = await w.takeLock(ctx.mailRoot, lock, ALLOCATION_LOCK_WAIT_MS);
      } catch (e) {
        throw new AppError('TEMPFAIL', `cannot take allocation lock ${lock}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
      }
      if (taken) break;
      if (Date.now() > deadline) throw new AppError('TEMPFAIL', `allocation lock ${lock} busy for ${ALLOCATION_LOCK_WAIT_MS / 1000}s`);
      await sleep(20 + Math.random() * 30);
    }
    try {
      return await attempt();
    } finally {
      await w.removeFile(ctx.mailRoot, lock).catch(() => undefined);
    }
  },
} satisfies Creator;
