/**
 * NAME        src/writer/local-writer — the mail writer's operations, run in this process
 * DESCRIPTION Every file-system write the delivery agent, the allocator, the Dovecot backend, a
 *             move-in and the admin CLI make under the mail root: create a mailbox (and discard an
 *             empty one after a lost allocation race), store a message (MDA modules), commit or
 *             abort it (or both at once), arm the vacation interval, make a directory, take a lock file, write a
 *             moved file durably, purge a deleted user's mailbox (`pigeon user del --purge`).
 *             Each one checks its paths with src/writer/safe-fs.ts. A mailbox it creates is
 *             durable when createMailbox returns (every directory from the mailbox up to the mail
 *             root fsynced), so the first message into it is never acknowledged on entries that a
 *             crash could still take away. Stored messages are held here
 *             by a numeric handle until commit or abort (an mbox keeps its locks meanwhile).
 *             Used directly when pigeon already runs as the mail user, and inside the writer
 *             child (src/writer/writer-main.ts) when pigeon runs as root.
 * SECURITY    Never chowns and never switches users: whoever runs this code owns what it creates.
 */
import { isAppError } from '../errors.js';
import { constants } from 'node:fs';
import { rmdir, unlink, lstat, rename, open, rm } from 'node:fs/promises';
import { dirname, join, basename, resolve } from 'node:path';
import type { Allocation } from '../store.js';
import { MDA_MODULES } from '../delivery/registry-mda.js';
import { dueNow } from '../delivery/vacation-state.js';
import type { DeliveryResult } from '../delivery/types.js';
import type { Held, StoreRequest } from '../delivery/mda.js';
import { baseOf, checkDir, createExclusive, ensureDir, fsyncDir, openChecked, UnsafePathError } from './safe-fs.js';

export type MailboxRef = Pick<Allocation, 'format' | 'path'>;

/** What `store` answers when the message is written: `handle` for commit/abort. */
export interface Stored {
  readonly handle: number;
  readonly what: string;
  readonly folder: string;
  readonly size: number;
}

/** What `storeAndCommit` answers when the message is in the mailbox, durably. */
export type Delivered = Omit<Stored, 'handle'>;

/** The operations; `body`, where present, is the last parameter. */
export interface MailWriter {
  createMailbox(a: MailboxRef, mailRoot: string): Promise<void>;
  discardEmpty(a: MailboxRef, mailRoot: string): Promise<void>;
  store(req: StoreRequest, body: AsyncIterable<Buffer>): Promise<Stored | DeliveryResult>;
  /** null when committed; else why not (the message is then gone) */
  commit(handle: number): Promise<DeliveryResult | null>;
  /**
   * store, then at once commit: for a delivery with nothing else to wait for between the two (one
   * round trip to the writer child instead of two). A failure of either step is the answer.
   */
  storeAndCommit(req: StoreRequest, body: AsyncIterable<Buffer>): Promise<Delivered | DeliveryResult>;
  abort(handle: number): Promise<void>;
  vacationDue(mailRoot: string, rel: readonly string[], sender: string, days: number): Promise<boolean>;
  ensureDir(base: string, dir: string): Promise<void>;
  /** exclusive-create `path` (a lock file); a file older than staleMs is removed first. false: busy */
  takeLock(base: string, path: string, staleMs: number): Promise<boolean>;
  removeFile(base: string, path: string): Promise<void>;
  /** write `path` through a temporary name: write, fsync, rename (the caller fsyncs the directory) */
  putFile(base: string, path: string, body: AsyncIterable<Buffer>): Promise<void>;
  syncDir(base: string, dir: string): Promise<void>;
  /**
   * Remove a mailbox and everything below it. Its parent must be reached from the mail root
   * without a symbolic link and the mailbox itself must be no link; links inside it are removed,
   * never followed. false: there was nothing to remove.
   */
  purgeMailbox(a: MailboxRef, mailRoot: string): Promise<boolean>;
}

export class LocalWriter implements MailWriter {
  private readonly held = new Map<number, Held>();
  private next = 1;

  async createMailbox(a: MailboxRef, mailRoot: string): Promise<void> {
    const base = baseOf(mailRoot, a.path);
    await ensureDir(base, dirname(a.path), 0o770);
    if (a.format === 'maildir') {
      await ensureDir(base, a.path);
      for (const d of ['cur', 'new', 'tmp']) await ensureDir(base, join(a.path, d));
    } else {
      const fh = await openChecked(a.path, constants.O_WRONLY | constants.O_APPEND | constants.O_CREAT, 0o600, { singleLink: true });
      await fh.close();
    }
    // durable before the first message is acknowledged: the fsync of new/ (or of the mbox file)
    // makes the message durable, not the entries that lead to it. Every directory from the one
    // holding cur/ new/ tmp/ (or the mbox file) up to the base is fsynced, whether this call or a
    // concurrent one created it (a racing first delivery must not be answered before the entries
    // are on disk). Only when the mailbox was missing: a few fsyncs per new mailbox.
    const top = resolve(base); // a mail_root written with a trailing slash is the same directory
    for (let d = resolve(a.format === 'maildir' ? a.path : dirname(a.path)); ; d = dirname(d)) {
      checkDir(top, d);
      await fsyncDir(d);
      if (d === top || dirname(d) === d) break;
    }
  }

  async discardEmpty(a: MailboxRef, mailRoot: string): Promise<void> {
    const base = baseOf(mailRoot, a.path);
    // a part already gone is no reason to stop: another discarder of the same mailbox may be a
    // step ahead, or a racing create may have made only part of it (src/allocation.ts)
    const gone = (e: unknown): void => {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    };
    try {
      if (a.format === 'maildir') {
        checkDir(base, a.path);
        for (const d of ['cur', 'new', 'tmp']) await rmdir(join(a.path, d)).catch(gone);
        await rmdir(a.path).catch(gone);
      } else {
        const st = await lstat(a.path);
        if (st.isFile() && st.size === 0) await unlink(a.path);
      }
    } catch {
      /* not empty, or already gone: leave it */
    }
  }

  async store(req: StoreRequest, body: AsyncIterable<Buffer>): Promise<Stored | DeliveryResult> {
    const mda = MDA_MODULES.get(req.format);
    if (!mda) return { dsn: '4.3.5', text: `unknown mailbox format ${req.format}` };
    const r = await mda.store(req, body);
    if ('dsn' in r) return r;
    const handle = this.next++;
    this.held.set(handle, r);
    return { handle, what: r.what, folder: r.folder, size: r.size };
  }

  async commit(handle: number): Promise<DeliveryResult | null> {
    const h = this.held.get(handle);
    this.held.delete(handle);
    if (!h) return { dsn: '4.3.0', text: 'mail writer lost the message before commit; try again later' };
    try {
      await h.commit();
      return null;
    } catch (e) {
      return isAppError(e) && e.status !== null ? e.status : { dsn: '4.3.0', text: `commit failed: ${e instanceof Error ? e.message : String(e)}` };
    }
  }

  async storeAndCommit(req: StoreRequest, body: AsyncIterable<Buffer>): Promise<Delivered | DeliveryResult> {
    const r = await this.store(req, body);
    if ('dsn' in r) return r;
    const failed = await this.commit(r.handle);
    return failed ?? { what: r.what, folder: r.folder, size: r.size };
  }

  async abort(handle: number): Promise<void> {
    const h = this.held.get(handle);
    this.held.delete(handle);
    await h?.abort().catch(() => undefined);
  }

  /** Abort everything still held (the writer child's parent went away). */
  async abortAll(): Promise<void> {
    for (const k of [...this.held.keys()]) await this.abort(k);
  }

  vacationDue(mailRoot: string, rel: readonly string[], sender: string, days: number): Promise<boolean> {
    return dueNow(mailRoot, rel, sender, days);
  }

  ensureDir(base: string, dir: string): Promise<void> {
    return ensureDir(base, dir);
  }

  async takeLock(base: string, path: string, staleMs: number): Promise<boolean> {
    checkDir(base, dirname(path));
    for (let i = 0; i < 2; i++) {
      const fh = await createExclusive(path);
      if (fh) {
        await fh.close();
        return true;
      }
      try {
        const st = await lstat(path);
        if (Date.now() - st.mtimeMs <= staleMs) return false;
        await unlink(path); // a lock older than the wait belongs to a dead process
      } catch {
        /* raced with its owner: try again */
      }
    }
    return false;
  }

  async removeFile(base: string, path: string): Promise<void> {
    checkDir(base, dirname(path));
    await unlink(path).catch((e: NodeJS.ErrnoException) => {
      if (e.code !== 'ENOENT') throw e;
    });
  }

  async putFile(base: string, path: string, body: AsyncIterable<Buffer>): Promise<void> {
    const dir = dirname(path);
    await ensureDir(base, dir);
    const tmp = join(dir, `.${basename(path)}.pigeon-move-${process.pid}-${this.next++}`);
    const fh = await open(tmp, constants.O_CREAT | constants.O_EXCL | constants.O_WRONLY | constants.O_NOFOLLOW, 0o600);
    try {
      let pos = 0;
      for await (const b of body) {
        let off = 0;
        while (off < b.length) {
          const { bytesWritten } = await fh.write(b, off, b.length - off, pos);
          off += bytesWritten;
          pos += bytesWritten;
        }
      }
      await fh.sync();
      await fh.close();
    } catch (e) {
      await fh.close().catch(() => undefined);
      await unlink(tmp).catch(() => undefined);
      throw e;
    }
    try {
      checkDir(base, dir);
      await rename(tmp, path);
    } catch (e) {
      await unlink(tmp).catch(() => undefined);
      throw e;
    }
  }

  async syncDir(base: string, dir: string): Promise<void> {
    checkDir(base, dir);
    await fsyncDir(dir);
  }

  async purgeMailbox(a: MailboxRef, mailRoot: string): Promise<boolean> {
    const base = baseOf(mailRoot, a.path);
    const parent = dirname(a.path);
    try {
      checkDir(base, parent);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return false;
      throw e;
    }
    let st;
    try {
      st = await lstat(a.path);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return false;
      throw e;
    }
    if (st.isSymbolicLink()) throw new UnsafePathError(`${a.path} is a symbolic link`);
    if (a.format === 'maildir') {
      if (!st.isDirectory()) throw new UnsafePathError(`${a.path} is not a directory`);
      // node's rm removes a link it meets below the mailbox; it never descends through one
      await rm(a.path, { recursive: true });
    } else {
      if (!st.isFile()) throw new UnsafePathError(`${a.path} is not a regular file`);
      await unlink(a.path);
    }
    await fsyncDir(parent);
    return true;
  }
}
