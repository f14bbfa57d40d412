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
  if (user.home !== null && user.home !== ctx.node) return { kind: 'remote', node: user.home, allocation: user.allocation, user };
  if (user.allocation !== null) {
    // allocated here: make sure it exists on disk (a restored database, a purged box)
    await ensureMailbox(user.allocation, ctx.mailUser, ctx.mailRoot);
    return { kind: 'local', allocation: user.allocation };
  }
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
      return placeUser(ctx, fresh, config);
    }
  }
  const settled = async (): Promise<Placement | null> => {
    const fresh = await ctx.store.mustUser(user.address);
    if (fresh.home !== null && fresh.home !== ctx.node) return { kind: 'remote', node: fresh.home, allocation: fresh.allocation, user: fresh };
    if (fresh.allocation !== null) return { kind: 'local', allocation: fresh.allocation };
    return null;
  };
  const attempt = async (): Promise<Placement | null> => {
    const now = await settled();
    if (now !== null) return now;
    const fresh = await ctx.store.mustUser(user.address);
    const allocation: Allocation = { format, path: mailboxPath(ctx.mailRoot, fresh.address, format), node: ctx.node };
    const existed = existsSync(allocation.path);
    try {
      await createMailbox(allocation, ctx.mailUser, ctx.mailRoot);
    } catch (e) {
      // another allocator of this node lost its race and discarded the empty box we were filling
      // in (cas: nothing serialises them): the race is decided by then, so take the winner's answer
      const decided = await settled();
      if (decided !== null) return decided;
      throw e;
    }
    let won: boolean;
    try {
      won = await ctx.store.casAllocation(fresh.id, fresh.version, ctx.node, allocation);
    } catch (e) {
      // the database stayed locked or went away: leave no empty mailbox that nothing records
      if (!existed) await mailWriter(ctx.mailUser).discardEmpty(allocation, ctx.mailRoot).catch(() => undefined);
      throw e;
    }
    if (won) return { kind: 'local', allocation };
    // lost the race: discard the empty mailbox we just created unless it is the winner's too
    if (!existed && (await ctx.store.getUser(fresh.address))?.allocation?.path !== allocation.path) await mailWriter(ctx.mailUser).discardEmpty(allocation, ctx.mailRoot);
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
