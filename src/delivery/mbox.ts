/**
 * NAME        src/delivery/mbox — MDA module: one mbox file per user
 * DESCRIPTION Takes the locks Dovecot takes for writing (`mbox_write_locks = fcntl dotlock`, in
 *             that order, as Postfix local(8) does): a POSIX write lock on the whole file (an
 *             open-file-description lock, F_OFD_SETLK, which conflicts with Dovecot's and
 *             procmail's F_SETLK locks both ways; fs-native-extensions), then the dotlock
 *             `MBOX.lock` (exclusive create; a lock older than 5 minutes is stale, as in
 *             Postfix/Dovecot). It waits at most `limits.mda_lock_wait_s` (default 20 s) for both
 *             together, then defers 4.2.0. Then it appends `From SENDER DATE`, the trace headers,
 *             the message with body lines beginning "From " quoted as ">From " (mboxo, as Postfix
 *             local(8); Dovecot does not unquote, so ">From" lines are left alone), and a blank
 *             line; fsyncs. If anything fails the file is truncated back to its previous size, so
 *             a reader never keeps half a message. The locks are held until commit/abort, so a
 *             later failure of another module can still take the message back out.
 * SECURITY    `store` runs in the mail writer, as the mail user. The mbox is opened with
 *             O_NOFOLLOW and must be a regular file with one link; the dotlock is created with
 *             O_EXCL; the directory must be reached without a symbolic link (src/writer/safe-fs.ts).
 *             Anything else defers the message (4.2.0) and leaves the file it points to alone.
 */
import { MBOX_STALE_LOCK_MS } from '../limits.js';
import { existsSync, constants } from 'node:fs';
import { lstat, unlink } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { dirname } from 'node:path';
import type { Allocation } from '../store.js';
import { fsFailure, overQuota, type Held, type MdaModule, type StoreRequest } from './mda.js';
import type { DeliveryResult } from './types.js';
import { notice } from './notice.js';
import { baseOf, checkDir, createExclusive, openChecked } from '../writer/safe-fs.js';

// fs-native-extensions: fcntl(F_OFD_SETLK) on Linux (a maintained addon with prebuilt binaries;
// Node has no fcntl(2) locks, and flock(2) does not conflict with Dovecot's fcntl locks)
interface FcntlLocks {
  tryLock(fd: number, opts?: { shared?: boolean }): boolean;
  unlock(fd: number): void;
}
let fsxLoaded: FcntlLocks | null = null;
const fsx = (): FcntlLocks => (fsxLoaded ??= createRequire(import.meta.url)('fs-native-extensions') as FcntlLocks);

/** Default of limits.mda_lock_wait_s, in ms (LIMITS.md: Postfix waits 20 × 1 s). */
export const MDA_LOCK_WAIT_MS = 20_000;

const GT = Buffer.from('>');
const FROM = Buffer.from('From ');

/** mboxo quoting (as Postfix local(8)): a body line beginning "From " gets a '>', across chunk boundaries. */
export class MboxQuoter {
  private pending: Buffer = Buffer.alloc(0);
  private atStart = true;

  private classify(d: Buffer, p: number): 'quote' | 'no' | 'unknown' {
    const i = p;
    for (let k = 0; k < FROM.length; k++) {
      if (i + k >= d.length) return 'unknown';
      if (d[i + k] !== FROM[k]) return 'no';
    }
    return 'quote';
  }

  push(chunk: Buffer): Buffer[] {
    const d = this.pending.length > 0 ? Buffer.concat([this.pending, chunk]) : chunk;
    this.pending = Buffer.alloc(0);
    const out: Buffer[] = [];
    let seg = 0;
    let p: number;
    if (this.atStart) p = 0;
    else {
      const nl = d.indexOf(10);
      if (nl < 0) return [d];
      p = nl + 1;
    }
    for (;;) {
      if (p >= d.length) {
        this.atStart = true;
        break;
      }
      const c = this.classify(d, p);
      if (c === 'unknown') {
        out.push(d.subarray(seg, p));
        this.pending = Buffer.from(d.subarray(p));
        this.atStart = true;
        return out;
      }
      if (c === 'quote') {
        out.push(d.subarray(seg, p), GT);
        seg = p;
      }
      const nl = d.indexOf(10, p);
      if (nl < 0) {
        this.atStart = false;
        break;
      }
      p = nl + 1;
    }
    out.push(d.subarray(seg));
    return out;
  }

  end(): Buffer[] {
    const r = this.pending.length > 0 ? [this.pending] : [];
    this.pending = Buffer.alloc(0);
    return r;
  }
}

function asctime(d: Date): string {
  const s = d.toUTCString(); // "Thu, 03 Dec 2026 09:32:00 GMT"
  const m = /^(\w+), (\d+) (\w+) (\d+) ([\d:]+) GMT$/.exec(s);
  if (!m) return s;
  return `${m[1]} ${m[3]} ${String(Number(m[2])).padStart(2, ' ')} ${m[5]} ${m[4]}`;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

const locked = (path: string): DeliveryResult => ({ dsn: '4.2.0', text: `mailbox ${path} is locked by another process; try again later` });

/** The fcntl write lock on the open mbox, polled until `deadline`. */
async function takeFcntl(fd: number, path: string, deadline: number): Promise<DeliveryResult | null> {
  for (let i = 0; ; i++) {
    if (fsx().tryLock(fd)) return null;
    if (i === 0) notice('mbox: waiting for the fcntl lock another process holds', { mailbox: path });
    if (Date.now() >= deadline) return locked(path);
    await sleep(Math.min(50 + Math.random() * 100, Math.max(1, deadline - Date.now())));
  }
}

async function takeDotlock(path: string, deadline: number): Promise<string | DeliveryResult> {
  const lock = `${path}.lock`;
  let waited = false;
  for (;;) {
    try {
      const fh = await createExclusive(lock);
      if (fh) {
        try {
          await fh.write(`${process.pid}\n`);
        } finally {
          await fh.close();
        }
        return lock;
      }
    } catch (e) {
      return fsFailure(e, 'dotlock');
    }
    try {
      const st = await lstat(lock);
      if (Date.now() - st.mtimeMs > MBOX_STALE_LOCK_MS) await unlink(lock);
      else if (!waited) notice('mbox: waiting for the dotlock another process holds', { mailbox: path });
      waited = true;
    } catch {
      /* gone meanwhile */
    }
    if (Date.now() >= deadline) return locked(path);
    await sleep(Math.min(50 + Math.random() * 100, Math.max(1, deadline - Date.now())));
  }
}

async function store(req: StoreRequest, body: AsyncIterable<Buffer>): Promise<Held | DeliveryResult> {
  const path = req.path;
  let fh;
  try {
    checkDir(baseOf(req.mailRoot, path), dirname(path));
    fh = await openChecked(path, constants.O_RDWR, 0, { singleLink: true });
  } catch (e) {
    return fsFailure(e, 'open mbox');
  }
  const deadline = Date.now() + req.lockWaitMs;
  const busy = await takeFcntl(fh.fd, path, deadline);
  if (busy) {
    await fh.close();
    return busy;
  }
  const lock = await takeDotlock(path, deadline);
  if (typeof lock !== 'string') {
    await fh.close(); // closing the file releases the fcntl lock
    return lock;
  }
  const handle = fh;
  const release = async (): Promise<void> => {
    await unlink(lock).catch(() => undefined);
    try {
      fsx().unlock(handle.fd);
    } catch {
      /* released by close anyway */
    }
    await handle.close().catch(() => undefined);
  };
  let start = 0;
  try {
    start = (await fh.stat()).size;
  } catch (e) {
    await release();
    return fsFailure(e, 'open mbox');
  }
  const full = overQuota(req, start, req.size);
  if (full) {
    await release();
    return full;
  }
  let pos = start;
  const w = async (bs: Buffer[]): Promise<void> => {
    for (const b of bs) {
      let off = 0;
      while (off < b.length) {
        const { bytesWritten } = await handle.write(b, off, b.length - off, pos);
        off += bytesWritten;
        pos += bytesWritten;
      }
    }
  };
  try {
    const sender = req.sender === '' ? 'MAILER-DAEMON' : req.sender.replace(/\s/g, '');
    await w([Buffer.from(`From ${sender} ${asctime(new Date())}\n`, 'latin1'), req.prefix]);
    const q = new MboxQuoter();
    let last = 10;
    for await (const chunk of body) {
      if (chunk.length > 0) last = chunk[chunk.length - 1] ?? 10;
      await w(q.push(chunk));
    }
    await w(q.end());
    await w([Buffer.from(last === 10 ? '\n' : '\n\n')]);
    await handle.sync();
  } catch (e) {
    await handle.truncate(start).catch(() => undefined);
    await handle.sync().catch(() => undefined);
    await release();
    return fsFailure(e, 'append to mbox');
  }
  return {
    what: `mbox ${path}`,
    folder: 'INBOX',
    size: pos - start,
    async commit() {
      await release();
    },
    async abort() {
      await handle.truncate(start).catch(() => undefined);
      await handle.sync().catch(() => undefined);
      await release();
    },
  };
}

const mbox: MdaModule = {
  kind: 'mda',
  name: 'mbox',
  summary: 'one mbox file, fcntl + dotlock as Dovecot takes them, From_ quoting',
  isAllocated(a: Allocation): boolean {
    return existsSync(a.path);
  },
  store,
};

export default mbox;
