/**
 * NAME        src/delivery/mbox — MDA module: one mbox file per user
 * DESCRIPTION Takes the dotlock `MBOX.lock` (exclusive create; a lock older than 5 minutes is
 *             stale, as in Postfix/Dovecot), waits at most MDA_LOCK_WAIT_MS for it, then appends
 *             `From SENDER DATE`, the trace headers, the message with body lines beginning
 *             "From " quoted as ">From " (mboxo, as Postfix local(8); Dovecot does not unquote,
 *             so ">From" lines are left alone), and a blank line; fsyncs. If anything fails the
 *             file is truncated back to its previous size, so a reader never keeps half a message.
 *             The lock is held until commit/abort, so a later failure of another module can still
 *             take the message back out.
 * BUGS        Node has no fcntl(2): only the dotlock is taken. Dovecot's default mbox write locks
 *             are "dotlock fcntl", so writers still exclude each other through the dotlock; a
 *             fcntl-only reader (Dovecot's read lock) may see an append in progress, as with
 *             procmail.
 */
import { existsSync, statSync, unlinkSync } from 'node:fs';
import { open, unlink } from 'node:fs/promises';
import { createMailbox } from '../allocation.js';
import type { Allocation } from '../store.js';
import { deliveredParts } from './message.js';
import { fsFailure, overQuota, type MdaModule, type MdaPrepared, type MdaRequest } from './mda.js';
import type { DeliveryResult } from './types.js';

export const MDA_LOCK_WAIT_MS = 20_000;
const STALE_LOCK_MS = 300_000;

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

async function takeDotlock(path: string): Promise<string | DeliveryResult> {
  const lock = `${path}.lock`;
  const deadline = Date.now() + MDA_LOCK_WAIT_MS;
  for (;;) {
    try {
      const fh = await open(lock, 'wx', 0o600);
      await fh.write(`${process.pid}\n`);
      await fh.close();
      return lock;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') return fsFailure(e, 'dotlock');
      try {
        if (Date.now() - statSync(lock).mtimeMs > STALE_LOCK_MS) unlinkSync(lock);
      } catch {
        /* gone meanwhile */
      }
      if (Date.now() > deadline) return { dsn: '4.2.0', text: `mailbox ${path} is locked by another process; try again later` };
      await sleep(50 + Math.random() * 100);
    }
  }
}

async function prepare(req: MdaRequest): Promise<MdaPrepared | DeliveryResult> {
  const path = req.allocation.path;
  const parts = deliveredParts(req.message, req.trace);
  const lock = await takeDotlock(path);
  if (typeof lock !== 'string') return lock;
  const release = async (): Promise<void> => {
    await unlink(lock).catch(() => undefined);
  };
  let fh;
  let start = 0;
  try {
    fh = await open(path, 'r+');
    start = (await fh.stat()).size;
  } catch (e) {
    await fh?.close().catch(() => undefined);
    await release();
    return fsFailure(e, 'open mbox');
  }
  const full = overQuota(req, start, parts.size);
  if (full) {
    await fh.close();
    await release();
    return full;
  }
  let pos = start;
  const w = async (bs: Buffer[]): Promise<void> => {
    for (const b of bs) {
      let off = 0;
      while (off < b.length) {
        const { bytesWritten } = await fh.write(b, off, b.length - off, pos);
        off += bytesWritten;
        pos += bytesWritten;
      }
    }
  };
  try {
    const sender = req.sender === '' ? 'MAILER-DAEMON' : req.sender.replace(/\s/g, '');
    await w([Buffer.from(`From ${sender} ${asctime(new Date())}\n`, 'latin1'), parts.prefix]);
    const q = new MboxQuoter();
    let last = 10;
    for await (const chunk of req.message.body(true)) {
      if (chunk.length > 0) last = chunk[chunk.length - 1] ?? 10;
      await w(q.push(chunk));
    }
    await w(q.end());
    await w([Buffer.from(last === 10 ? '\n' : '\n\n')]);
    await fh.sync();
  } catch (e) {
    await fh.truncate(start).catch(() => undefined);
    await fh.sync().catch(() => undefined);
    await fh.close().catch(() => undefined);
    await release();
    return fsFailure(e, 'append to mbox');
  }
  const handle = fh;
  return {
    what: `mbox ${path}`,
    folder: 'INBOX',
    size: pos - start,
    async commit() {
      await handle.close().catch(() => undefined);
      await release();
    },
    async abort() {
      await handle.truncate(start).catch(() => undefined);
      await handle.sync().catch(() => undefined);
      await handle.close().catch(() => undefined);
      await release();
    },
  };
}

const mbox: MdaModule = {
  name: 'mbox',
  isAllocated(a: Allocation): boolean {
    return existsSync(a.path);
  },
  allocate: createMailbox,
  prepare,
};

export default mbox;
