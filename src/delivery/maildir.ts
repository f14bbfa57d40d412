/**
 * NAME        src/delivery/maildir — MDA module: Maildir++ (what Dovecot and Courier read)
 * DESCRIPTION Delivery writes tmp/NAME with an exclusive create, fsyncs it, and on commit renames
 *             it into new/ and fsyncs new/ — only then is the message acknowledged. NAME is
 *             Dovecot's form `SECS.MUSECSPpidQn.host,S=size,W=vsize`, so Dovecot and the quota
 *             scan never need to stat it. A kill -9 at any point leaves at most a file in tmp/
 *             (Dovecot removes those after 36 hours), never a partial one in new/.
 *             `+detail` (or -m) selects an existing Maildir++ folder `.detail`; a missing one means
 *             INBOX (folders are never created by mail from outside).
 *             Quota: Maildir++ `maildirsize` (src/delivery/quota.ts).
 * SECURITY    Files are 0600 and owned by the mail user (chown when running as root).
 */
import { existsSync, readdirSync, statSync } from 'node:fs';
import { open, rename, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { createMailbox } from '../allocation.js';
import type { Allocation } from '../store.js';
import { deliveredParts } from './message.js';
import { readUsage, addUsage } from './quota.js';
import { fault } from './fault.js';
import { fsFailure, overQuota, type MdaModule, type MdaPrepared, type MdaRequest } from './mda.js';
import type { DeliveryResult } from './types.js';

let counter = 0;

function hostPart(hostname: string): string {
  return hostname.replace(/\//g, '\\057').replace(/:/g, '\\072');
}

export function uniqueName(hostname: string, size: number, vsize: number): string {
  const now = Date.now();
  const secs = Math.floor(now / 1000);
  const usecs = (now % 1000) * 1000 + Math.floor(Math.random() * 1000);
  counter++;
  return `${secs}.M${usecs}P${process.pid}Q${counter}R${randomBytes(4).toString('hex')}.${hostPart(hostname)},S=${size},W=${vsize}`;
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

async function fsyncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

async function prepare(req: MdaRequest): Promise<MdaPrepared | DeliveryResult> {
  const root = req.allocation.path;
  const folderDir = req.folder === null ? null : findFolder(root, req.folder);
  const dir = folderDir === null ? root : join(root, folderDir);
  const parts = deliveredParts(req.message, req.trace);
  if (req.quota > 0) {
    const used = readUsage(root, req.quota, req.mailUser);
    const full = overQuota(req, used.bytes, parts.size);
    if (full) return full;
  }
  const name = uniqueName(req.hostname, parts.size, parts.size + parts.lines);
  const tmp = join(dir, 'tmp', name);
  let fh;
  try {
    fh = await open(tmp, 'wx', 0o600);
  } catch (e) {
    return fsFailure(e, `create ${join(folderDir ?? '', 'tmp')}`);
  }
  try {
    if (req.mailUser.switchTo) await fh.chown(req.mailUser.uid, req.mailUser.gid);
    let pos = 0;
    const w = async (b: Buffer): Promise<void> => {
      let off = 0;
      while (off < b.length) {
        const { bytesWritten } = await fh.write(b, off, b.length - off, pos);
        off += bytesWritten;
        pos += bytesWritten;
      }
    };
    await w(parts.prefix);
    fault('tmp-partial');
    for await (const chunk of req.message.body(true)) await w(chunk);
    await fh.sync();
    await fh.close();
    fault('tmp-synced');
  } catch (e) {
    await fh.close().catch(() => undefined);
    await unlink(tmp).catch(() => undefined);
    return fsFailure(e, 'write tmp');
  }
  const target = join(dir, 'new', name);
  return {
    what: `maildir ${target}`,
    folder: folderDir === null ? 'INBOX' : folderDir.slice(1),
    size: parts.size,
    async commit() {
      try {
        await rename(tmp, target);
      } catch (e) {
        await unlink(tmp).catch(() => undefined);
        throw Object.assign(new Error(`rename into new/: ${(e as NodeJS.ErrnoException).code ?? 'error'}`), { result: fsFailure(e, 'rename into new') });
      }
      fault('renamed');
      try {
        await fsyncDir(join(dir, 'new'));
      } catch (e) {
        // the rename may not be durable: say so, Postfix retries (a duplicate beats a loss)
        await unlink(target).catch(() => undefined);
        throw Object.assign(new Error('fsync new/'), { result: fsFailure(e, 'fsync new') });
      }
      if (req.quota > 0) addUsage(root, parts.size, 1);
    },
    async abort() {
      await unlink(tmp).catch(() => undefined);
    },
  };
}

const maildir: MdaModule = {
  name: 'maildir',
  isAllocated(a: Allocation): boolean {
    try {
      return statSync(join(a.path, 'new')).isDirectory() && statSync(join(a.path, 'tmp')).isDirectory();
    } catch {
      return false;
    }
  },
  allocate: createMailbox,
  prepare,
};

export default maildir;
