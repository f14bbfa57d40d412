/**
 * NAME        src/allocation — where a user's mailbox lives: the one function the proxy and the
 *             delivery agent share
 * DESCRIPTION `placeUser` returns the mailbox of a user: local (format + absolute path) or on another
 *             node. A user without a home is allocated lazily on first login or first mail, on
 *             this node, under the creator module chosen in `mailstore.creator`
 *             (src/creators/: lock, cas, none; contract src/creators/types.ts).
 *             Whoever loses a race re-reads the row and uses the winner's allocation, so two nodes
 *             never create two mailboxes for one user. Layout: MAILROOT/DOMAIN/LOCAL (maildir, with
 *             cur/new/tmp) or MAILROOT/DOMAIN/LOCAL.mbox (mbox file).
 *             Every directory and file is created by the mail writer (src/writer/mail-writer.ts),
 *             as the mail user and without following symbolic links, also the lock file.
 * DIAGNOSTICS AppError NO_SUCH_USER (creator none), TEMPFAIL (lock busy, race lost three times),
 *             CONFIG_INVALID (mailstore.creator names no creator module of this node).
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import type { Store, UserRecord, Allocation } from './store.js';
import type { Effective } from './resolve.js';
import type { MailUser } from './mailuser.js';
import { AppError } from './errors.js';
import { isUp, type NodeDirectory } from './nodes.js';
import { mailWriter } from './writer/mail-writer.js';
import { CREATORS } from './creators/registry.js';

export type Placement =
  | { readonly kind: 'local'; readonly allocation: Allocation }
  | { readonly kind: 'remote'; readonly node: string; readonly allocation: Allocation | null; readonly user: UserRecord };

export interface AllocationContext {
  readonly store: Store;
  readonly node: string;
  readonly mailRoot: string;
  readonly mailUser: MailUser;
  /** the cluster's nodes, for `mailstore.placement = fewest` (absent: always this node) */
  readonly nodes?: NodeDirectory;
}

/** The path a new mailbox of this user gets. Local part and domain are already normalised. */
export function mailboxPath(mailRoot: string, address: string, format: 'maildir' | 'mbox'): string {
  const at = address.lastIndexOf('@');
  const local = address.slice(0, at);
  const domain = address.slice(at + 1);
  // normalised addresses contain no '/', but guard the file system anyway
  if (local.includes('/') || domain.includes('/') || local.startsWith('.')) throw new AppError('INVALID_ADDRESS', `address ${address} cannot name a mailbox`);
  return join(mailRoot, domain, format === 'mbox' ? `${local}.mbox` : local);
}

/**
 * Create the mailbox on disk (idempotent), owned by the mail user: the mail writer creates it
 * (as the mail user, in a child process when pigeon runs as root), without following links.
 */
export async function createMailbox(a: Pick<Allocation, 'format' | 'path'>, mu: MailUser, mailRoot: string): Promise<void> {
  await mailWriter(mu).createMailbox(a, mailRoot);
}

/** Create the mailbox only when it is missing: the per-login/per-delivery path does no writes. */
export async function ensureMailbox(a: Allocation, mu: MailUser, mailRoot: string): Promise<void> {
  const present = a.format === 'maildir' ? ['cur', 'new', 'tmp'].every((d) => existsSync(join(a.path, d))) : existsSync(a.path);
  if (!present) await createMailbox(a, mu, mailRoot);
}

/** The active, running node with the fewest users (ties: by name); this node when alone. */
async function fewestNode(ctx: AllocationContext): Promise<string> {
  const counts = await ctx.store.usersPerNode();
  const now = Date.now();
  const candidates = ((await ctx.nodes?.all()) ?? []).filter((n) => n.state === 'active' && n.peerAddress !== null && (n.name === ctx.node || isUp(n, now)));
  if (!candidates.some((n) => n.name === ctx.node)) return ctx.node;
  candidates.sort((a, b) => (counts.get(a.name) ?? 0) - (counts.get(b.name) ?? 0) || a.name.localeCompare(b.name));
  return candidates[0]?.name ?? ctx.node;
}

/**
 * Where the mailbox of `user` is; allocates it on this node when the user has none.
 * `config` is the user's effective config (read once by the caller).
 */
export async function placeUser(ctx: AllocationContext, user: UserRecord, config: Effective): Promise<Placement> {
  const known = await placed(ctx, user);
  if (known !== null) return known;
  // one allocation per user at a time in this process: concurrent first deliveries here wait for
  // it and then re-read (a loser discarding its empty mailbox while another attempt of this process
  // was still creating the same directory failed that delivery with ENOENT)
  const key = `${ctx.mailRoot}\0${user.id}`;
  const running = allocating.get(key);
  if (running) {
    await running.catch(() => undefined);
    return placeUser(ctx, await ctx.store.mustUser(user.address), config);
  }
  const p = allocate(ctx, user, config);
  allocating.set(key, p);
  try {
    return await p;
  } finally {
    if (allocating.get(key) === p) allocating.delete(key);
  }
}

/** Where the record says the mailbox is, or null when it has none yet. */
async function placed(ctx: AllocationContext, user: UserRecord): Promise<Placement | null> {
  if (user.home !== null && user.home !== ctx.node) return { kind: 'remote', node: user.home, allocation: user.allocation, user };
  if (user.allocation !== null) {
    // allocated here: make sure it exists on disk (a restored database, a purged box)
    await ensureMailbox(user.allocation, ctx.mailUser, ctx.mailRoot);
    return { kind: 'local', allocation: user.allocation };
  }
  return null;
}

/** In-flight allocations of this process, by mail root and user id. */
const allocating = new Map<string, Promise<Placement>>();

async function allocate(ctx: AllocationContext, user: UserRecord, config: Effective): Promise<Placement> {
  const creatorName = String(config['mailstore.creator']?.value ?? 'lock');
  const creator = CREATORS.get(creatorName);
  if (!creator) throw new AppError('CONFIG_INVALID', `mailstore.creator ${JSON.stringify(creatorName)} of ${user.address}: no such creator module on this node (known: ${CREATORS.names().join(', ')})`);
  const format = config['mailstore.format']?.value === 'mbox' ? 'mbox' : 'maildir';
  if (!creator.creates) {
    throw new AppError('NO_SUCH_USER', `mailbox of ${user.address} is not allocated and mailstore.creator is ${creator.name}`);
  }
  if (user.home === null && config['mailstore.placement']?.value === 'fewest' && ctx.nodes) {
    const target = await fewestNode(ctx);
    if (target !== ctx.node) {
      // reserve the user for that node; it allocates the mailbox itself when the session or mail arrives
      const won = await ctx.store.casAllocation(user.id, user.version, target, null);
      const fresh = await ctx.store.mustUser(user.address);
      if (won) return { kind: 'remote', node: target, allocation: null, user: fresh };
      return (await placed(ctx, fresh)) ?? allocate(ctx, fresh, config);
    }
  }
  const settledIn = (fresh: UserRecord): Placement | null => {
    if (fresh.home !== null && fresh.home !== ctx.node) return { kind: 'remote', node: fresh.home, allocation: fresh.allocation, user: fresh };
    if (fresh.allocation !== null) return { kind: 'local', allocation: fresh.allocation };
    return null;
  };
  const settled = async (): Promise<Placement | null> => settledIn(await ctx.store.mustUser(user.address));
  const attempt = async (): Promise<Placement | null> => {
    // one read decides: the compare-and-set below expects the version of the very row that was
    // checked for a home (a second read could see another node's allocation, one version on,
    // and the cas would then overwrite it: mail stored on both nodes)
    const fresh = await ctx.store.mustUser(user.address);
    const now = settledIn(fresh);
    if (now !== null) return now;
    const allocation: Allocation = { format, path: mailboxPath(ctx.mailRoot, fresh.address, format), node: ctx.node };
    const existed = existsSync(allocation.path);
    const discard = (): Promise<void> => mailWriter(ctx.mailUser).discardEmpty(allocation, ctx.mailRoot).catch(() => undefined);
    try {
      await createMailbox(allocation, ctx.mailUser, ctx.mailRoot);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
      // another allocator of this node (another pigeon deliver process) lost its race and
      // discarded the empty mailbox while this one was creating it (ENOENT). This attempt may
      // have made part of it before that (a cur/ the other had already removed, made again; then
      // new/ removed under this one's check): the race is decided by then, so when the record
      // names another mailbox, discard what is left here; when it names none yet, the next try
      // makes the whole mailbox and goes through the compare-and-set like any other.
      const now = await settled().catch(async (err: unknown) => {
        if (!existed) await discard(); // the database cannot say: leave nothing this attempt made
        throw err;
      });
      if (now !== null && (now.kind !== 'local' || now.allocation.path !== allocation.path)) await discard();
      return now;
    }
    // Not allocated here (lost the race, or the database failed): discard the mailbox, if empty,
    // unless the record names it (the winner is a process of this node). Whether it existed
    // before this attempt does not decide it: another loser of this node may have created it
    // (seen here as existing), discarded it, and this attempt created it again; every loser
    // must discard, or an empty mailbox that nothing records is left (test/deliver-race.test.ts,
    // 2 nodes × 6 deliveries). Only when the database cannot say is a mailbox that existed
    // before left alone. A mailbox holding anything is never removed (discardEmpty removes only
    // empty directories or an empty mbox file).
    const discardUnlessRecorded = async (): Promise<void> => {
      let recorded: string | undefined;
      try {
        recorded = (await ctx.store.getUser(fresh.address))?.allocation?.path;
      } catch {
        if (existed) return;
      }
      if (recorded !== allocation.path) await discard();
    };
    let won: boolean;
    try {
      won = await ctx.store.casAllocation(fresh.id, fresh.version, ctx.node, allocation);
    } catch (e) {
      // the database stayed locked or went away: leave no empty mailbox that nothing records
      await discardUnlessRecorded();
      throw e;
    }
    if (won) return { kind: 'local', allocation };
    await discardUnlessRecorded();
    return null; // re-read
  };
  for (let i = 0; i < 3; i++) {
    const p = await creator.exclusive(ctx, user, attempt, settled);
    if (p) {
      if (p.kind === 'local') await ensureMailbox(p.allocation, ctx.mailUser, ctx.mailRoot);
      return p;
    }
  }
  throw new AppError('TEMPFAIL', `allocation of ${user.address} kept losing races; try again`);
}
