/**
 * NAME        src/peer/move — `pigeon user move ADDR --to NODE`: copy a mailbox to another node
 * DESCRIPTION 1. The user is marked `moving_to` NODE: logins answer [UNAVAILABLE] and deliveries
 *                are deferred (4.2.0; the MTA retries, nothing is lost); every node ends the user's
 *                running sessions within a second (src/proxy/live.ts).
 *             2. After a settle time, the old home streams the Maildir to NODE over a peer link
 *                (`move-out` asks it to when the command runs elsewhere; `move-in` carries the
 *                files). NODE writes each file to a temporary name, fsyncs it, renames it, fsyncs
 *                the directories, and only then answers with the new allocation. NODE's writes
 *                are made by its mail writer (as the mail user, no link followed).
 *             3. One transaction switches home and allocation and clears `moving_to`.
 *             4. A second pass copies messages that reached the old mailbox late (a delivery that
 *                was already past its checks), skipping those NODE already has (same Maildir base
 *                name). The old copy stays on the old node; its path is printed.
 * DIAGNOSTICS AppError PEER_UNAVAILABLE (a node is down), TEMPFAIL (user changed meanwhile),
 *             USAGE (mbox mailboxes: not supported by move in this version).
 */
import { MOVE_LINE_MAX, MOVE_STALL_MS, MOVE_ANSWER_MS, MOVE_OUT_MS } from '../limits.js';
import { readdirSync, existsSync, constants } from 'node:fs';
import { open } from 'node:fs/promises';
import { join, dirname, relative, sep, normalize, isAbsolute } from 'node:path';
import type { TLSSocket } from 'node:tls';
import type { Readable } from 'node:stream';
import type { Allocation, UserRecord } from '../store.js';
import type { MailUser } from '../mailuser.js';
import type { PeerContext } from './context.js';
import { sendHandOff, linkSessionId } from './link.js';
import { LineBuffer } from '../lines.js';
import { wireUser, readLine, replyLine, writeAll, nextWithin, exactBytes, type HandOff, type MoveSpec, type WireUser } from './protocol.js';
import { mailboxPath } from '../allocation.js';
import { AppError } from '../errors.js';
import { mailWriter } from '../writer/mail-writer.js';


export interface MoveResult {
  readonly files: number;
  readonly bytes: number;
  readonly allocation: Allocation;
}

/** Every file to copy, relative to the Maildir: pass 1 all but tmp/ and locks; pass 2 only mail. */
export function mailboxFiles(root: string, pass: 1 | 2): string[] {
  const out: string[] = [];
  const walk = (dir: string): void => {
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      const p = join(dir, e.name);
      if (e.isDirectory()) {
        if (e.name === 'tmp') continue;
        walk(p);
      } else if (e.isFile()) {
        if (e.name.endsWith('.lock')) continue;
        const parent = dirname(p).split(sep).pop();
        if (pass === 2 && parent !== 'new' && parent !== 'cur') continue;
        out.push(relative(root, p));
      }
    }
  };
  walk(root);
  return out.sort();
}


/** Stream the Maildir at `source` to node `to` (run on the old home). */
export async function exportMailbox(ctx: PeerContext, user: WireUser, source: Allocation, to: string, pass: 1 | 2, mailRoot: string): Promise<MoveResult> {
  if (source.format !== 'maildir') throw new AppError('USAGE', `user move copies maildir mailboxes only (${user.address} uses ${source.format})`);
  if (!source.path.startsWith(mailRoot + sep)) throw new AppError('USAGE', `mailbox ${source.path} is not under this node's mail root ${mailRoot}`);
  const files = existsSync(source.path) ? mailboxFiles(source.path, pass) : [];
  const sock = await sendHandOff(
    ctx,
    to,
    { kind: 'move-in', user, config: {}, client: null, session: linkSessionId(), tag: null, hops: 1, deliver: null, move: { from: ctx.node, to, pass, source } },
    ctx.handoffTimeoutMs,
  );
  try {
    let bytes = 0;
    for (const f of files) {
      // no link is followed (a symlink swapped in after the directory walk fails with ELOOP)
      const fh = await open(join(source.path, f), constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK).catch(() => null);
      if (!fh) continue; // expunged meanwhile
      try {
        const st = await fh.stat();
        if (!st.isFile()) continue;
        const size = st.size;
        await writeAll(sock, Buffer.from(`${JSON.stringify({ path: f, size })}\n`));
        let left = size;
        const buf = Buffer.allocUnsafe(256 * 1024);
        while (left > 0) {
          const { bytesRead } = await fh.read(buf, 0, Math.min(buf.length, left), size - left);
          if (bytesRead <= 0) throw new Error(`${f} shrank while copying`);
          await writeAll(sock, Buffer.from(buf.subarray(0, bytesRead)));
          left -= bytesRead;
        }
        bytes += size;
      } finally {
        await fh.close();
      }
    }
    await writeAll(sock, Buffer.from(`${JSON.stringify({ end: true })}\n`));
    const line = await readLine(sock, MOVE_LINE_MAX, MOVE_ANSWER_MS);
    const r = JSON.parse(line.toString('utf8')) as { ok?: boolean; text?: string; files?: number; allocation?: Allocation };
    if (r.ok !== true || !r.allocation) throw new AppError('PEER_REFUSED', `node ${to} did not take the mailbox: ${r.text ?? 'no reason given'}`);
    return { files: r.files ?? files.length, bytes, allocation: r.allocation };
  } finally {
    sock.destroy();
  }
}


/** Read one header line through the same iterator (so no byte is lost between files). */
async function line(it: AsyncIterator<Buffer>, sock: Readable): Promise<string> {
  const b = new LineBuffer();
  for (;;) {
    const r = b.line(MOVE_LINE_MAX);
    if (r?.kind === 'too-long') throw new Error('file header line too long');
    if (r?.kind === 'line') {
      // the file's bytes that came with the header go back in front of the stream
      const rest = b.rest();
      if (rest.length > 0) sock.unshift(rest);
      return r.line.toString('utf8');
    }
    const next = await nextWithin(it, MOVE_STALL_MS, 'copy stalled');
    if (next.done) throw new Error('link closed before the end of the mailbox');
    b.push(next.value);
  }
}

function safeRelative(p: string): string | null {
  if (p.length === 0 || p.length > 1024 || p.includes('\0') || isAbsolute(p)) return null;
  const n = normalize(p);
  if (n.startsWith('..') || n.split(sep).some((s) => s === '..' || s === 'tmp')) return null;
  return n;
}

/**
 * The new node's side: write the files into this node's mailbox of the user, durably. Every
 * write goes through the mail writer (src/writer/mail-writer.ts): as the mail user, no link
 * followed below the mail root.
 */
export async function receiveMailbox(sock: TLSSocket, h: HandOff, mailRoot: string, mu: MailUser): Promise<void> {
  const mv = h.move as MoveSpec;
  const allocation: Allocation = { format: 'maildir', path: mailboxPath(mailRoot, h.user.address, 'maildir'), node: mv.to };
  const w = mailWriter(mu);
  const dirs = new Set<string>();
  // folder → Maildir base name → files with that base already here (an old copy from an earlier move)
  const known = new Map<string, Map<string, string[]>>();
  const baseOf = (name: string): string => name.split(':')[0] ?? name;
  const present = (folder: string): Map<string, string[]> => {
    let s = known.get(folder);
    if (!s) {
      s = new Map();
      for (const sub of ['cur', 'new']) {
        const d = join(allocation.path, folder, sub);
        if (existsSync(d)) for (const f of readdirSync(d)) s.set(baseOf(f), [...(s.get(baseOf(f)) ?? []), join(d, f)]);
      }
      known.set(folder, s);
    }
    return s;
  };
  const it = sock[Symbol.asyncIterator]() as AsyncIterator<Buffer>;
  let files = 0;
  try {
    await w.createMailbox(allocation, mailRoot);
    sock.write(replyLine({ ok: true }));
    for (;;) {
      const hdr = JSON.parse(await line(it, sock)) as { path?: unknown; size?: unknown; end?: unknown };
      if (hdr.end === true) break;
      const rel = typeof hdr.path === 'string' ? safeRelative(hdr.path) : null;
      const size = typeof hdr.size === 'number' && Number.isInteger(hdr.size) && hdr.size >= 0 ? hdr.size : -1;
      if (rel === null || size < 0) throw new Error(`bad file entry ${JSON.stringify(hdr).slice(0, 200)}`);
      const dest = join(allocation.path, rel);
      const parent = dirname(dest);
      const sub = parent.split(sep).pop();
      const folder = relative(allocation.path, dirname(parent));
      let skip = false;
      const isMail = sub === 'new' || sub === 'cur';
      const base = baseOf(rel.split(sep).pop() ?? '');
      if (mv.pass === 2 && isMail) skip = present(folder).has(base);
      // pass 1 over an old copy: the source's flags win; drop the old file under another name
      if (mv.pass === 1 && isMail) for (const old of present(folder).get(base) ?? []) if (old !== dest) await w.removeFile(mailRoot, old).catch(() => undefined);
      if (skip) {
        for await (const _ of exactBytes(it, sock, size, MOVE_STALL_MS)) void _; // already here: skip its bytes
        continue;
      }
      await w.putFile(mailRoot, dest, exactBytes(it, sock, size, MOVE_STALL_MS));
      dirs.add(parent);
      files++;
    }
    for (const d of dirs) await w.syncDir(mailRoot, d);
    sock.end(replyLine({ ok: true, files, allocation: { ...allocation } }));
  } catch (e) {
    sock.end(replyLine({ ok: false, text: (e as Error).message }));
  }
}

/** `move-out` on the old home: export to the node named in the request, answer with the result. */
export async function serveMoveOut(sock: TLSSocket, h: HandOff, ctx: PeerContext, mailRoot: string): Promise<void> {
  const mv = h.move as MoveSpec;
  sock.write(replyLine({ ok: true }));
  try {
    const src = mv.source;
    const r = await exportMailbox(ctx, h.user, { format: src.format, path: src.path }, mv.to, mv.pass, mailRoot);
    sock.end(replyLine({ ok: true, files: r.files, bytes: r.bytes, allocation: { ...r.allocation } }));
  } catch (e) {
    sock.end(replyLine({ ok: false, text: (e as Error).message }));
  }
}

/** Ask the old home `from` to export (when this process is not on it). */
export async function requestMoveOut(ctx: PeerContext, user: UserRecord, source: Allocation, from: string, to: string, pass: 1 | 2): Promise<MoveResult> {
  const sock = await sendHandOff(
    ctx,
    from,
    { kind: 'move-out', user: wireUser(user), config: {}, client: null, session: linkSessionId(), tag: null, hops: 1, deliver: null, move: { from, to, pass, source } },
    ctx.handoffTimeoutMs,
  );
  try {
    const l = await readLine(sock, MOVE_LINE_MAX, MOVE_OUT_MS);
    const r = JSON.parse(l.toString('utf8')) as { ok?: boolean; text?: string; files?: number; bytes?: number; allocation?: Allocation };
    if (r.ok !== true || !r.allocation) throw new AppError('PEER_REFUSED', `moving the mailbox from ${from} to ${to} failed: ${r.text ?? 'no reason given'}`);
    return { files: r.files ?? 0, bytes: r.bytes ?? 0, allocation: r.allocation };
  } finally {
    sock.destroy();
  }
}

export interface MoveReport {
  readonly from: string | null;
  readonly to: string;
  readonly files: number;
  readonly bytes: number;
  readonly late: number;
  readonly oldPath: string | null;
  readonly allocation: Allocation | null;
}

/**
 * The whole move, driven from any node of the cluster (this process uses its node's certificate).
 * `settleMs`: time for every node to end the user's sessions and finish deliveries in flight.
 */
export async function moveUser(
  store: import('../store.js').Store,
  ctx: PeerContext,
  mailRoot: string,
  address: string,
  to: string,
  settleMs: number,
  say: (s: string) => void,
): Promise<MoveReport> {
  const u = await store.mustUser(address);
  const target = await ctx.nodes.get(to);
  if (!target) throw new AppError('NO_SUCH_NODE', `no such node: ${to} (see "pigeon node list")`);
  if (target.state !== 'active') throw new AppError('PEER_UNAVAILABLE', `node ${to} is ${target.state}`);
  if (u.movingTo !== null && u.movingTo !== to) throw new AppError('TEMPFAIL', `${u.address} is already being moved to ${u.movingTo}`);
  if (u.home === to && u.movingTo === null) throw new AppError('USAGE', `${u.address} already lives on node ${to}`);
  if (u.home === null || u.allocation === null) {
    // nothing stored anywhere yet: only the home changes
    if (!(await store.casAllocation(u.id, u.version, to, null))) throw new AppError('TEMPFAIL', `${u.address} changed meanwhile; try again`);
    return { from: u.home, to, files: 0, bytes: 0, late: 0, oldPath: null, allocation: null };
  }
  if (u.allocation.format !== 'maildir') throw new AppError('USAGE', `user move copies maildir mailboxes only (${u.address} uses ${u.allocation.format})`);
  const from = u.home;
  const source = u.allocation;
  let marked = u;
  if (u.movingTo === null) {
    if (!(await store.casMoving(u.id, u.version, to))) throw new AppError('TEMPFAIL', `${u.address} changed meanwhile; try again`);
    marked = await store.mustUser(address);
    say(`${u.address}: new sessions and deliveries paused; ending running sessions`);
    await new Promise((r) => setTimeout(r, settleMs));
  }
  const copy = (pass: 1 | 2, who: UserRecord): Promise<MoveResult> =>
    from === ctx.node ? exportMailbox(ctx, wireUser(who), source, to, pass, mailRoot) : requestMoveOut(ctx, who, source, from, to, pass);
  let first: MoveResult;
  try {
    first = await copy(1, marked);
  } catch (e) {
    // leave the user where it was: clear the mark so mail flows to the old home again
    const now = await store.mustUser(address);
    await store.casMoving(now.id, now.version, null);
    throw e;
  }
  say(`${u.address}: copied ${first.files} files (${first.bytes} bytes) from ${from} to ${to}`);
  const now = await store.mustUser(address);
  if (!(await store.casMoved(now.id, now.version, to, first.allocation))) {
    const again = await store.mustUser(address);
    await store.casMoving(again.id, again.version, null);
    throw new AppError('TEMPFAIL', `${u.address} changed during the move; the home stays ${from}; try again`);
  }
  say(`${u.address}: home is now ${to}`);
  let late = 0;
  try {
    const second = await copy(2, await store.mustUser(address));
    late = second.files;
  } catch (e) {
    say(`warning: the second pass (mail that reached ${from} late) failed: ${(e as Error).message}; run the move's copy again or check ${from}:${source.path}`);
  }
  return { from, to, files: first.files, bytes: first.bytes, late, oldPath: source.path, allocation: first.allocation };
}
