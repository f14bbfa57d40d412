/**
 * NAME        src/delivery/mda — the contract of the mailstore's MDA modules (maildir, mbox)
 * DESCRIPTION Two kinds of MDA module. A built-in one (`mailstore.mda builtin`, the default) knows
 *             one mailbox format: whether a user's mailbox exists, and how to
 *             deliver into it in two steps (store = write and fsync; commit = make visible).
 *             `store` runs inside the mail writer (src/writer/mail-writer.ts) — as the mail user,
 *             in a child process when pigeon runs as root — so its request is plain data and the
 *             message body arrives as a stream of chunks. Registered by name in
 *             src/delivery/registry-mda.ts; `mailstore.format` chooses one. Its name is a mailbox
 *             format of `Allocation` (src/store.ts): a new format is also a value there, because
 *             the database, the peer link and every backend carry or read it.
 *             Errors of the file system map to enhanced status codes here, once.
 *             An MDA program (`mailstore.mda NAME`, e.g. src/delivery/dovecot-lda.ts) is another
 *             mail server's own delivery program, run for a mailbox the mailstore already placed
 *             and created (allocation, creators and quota settings unchanged): one step, the
 *             message is visible when it answers; it may declare per-user settings of its own.
 */
import type { Allocation } from '../store.js';
import type { ModuleBase } from '../modules.js';
import type { SettingsDecl } from '../settings.js';
import type { MailUser } from '../mailuser.js';
import type { Effective } from '../resolve.js';
import type { DeliveryEnv, DeliveryResult } from './types.js';

/** What the writer needs to store one message (plain data: it may cross a process boundary). */
export interface StoreRequest {
  readonly format: 'maildir' | 'mbox';
  /** the mailbox: Maildir directory or mbox file */
  readonly path: string;
  /** the node's mail root: no symbolic link is followed below it */
  readonly mailRoot: string;
  /** folder asked for by +detail or -m, delivered into only when it exists */
  readonly folder: string | null;
  /** create `folder` when it does not exist (a quarantine folder); else a missing one means INBOX */
  readonly createFolder: boolean;
  readonly quota: number;
  readonly quotaFull: 'bounce' | 'defer';
  readonly sender: string;
  readonly hostname: string;
  /** trace header lines, the message's header section and the blank line */
  readonly prefix: Buffer;
  /** bytes on disk (LF line ends) and with CRLF (Maildir S= / W=) */
  readonly size: number;
  readonly vsize: number;
  /** mbox: how long to wait for the fcntl lock and the dotlock (limits.mda_lock_wait_s) */
  readonly lockWaitMs: number;
}

/** A stored, not yet visible message, held by the writer until commit or abort. */
export interface Held {
  readonly what: string;
  readonly folder: string;
  readonly size: number;
  commit(): Promise<void>;
  abort(): Promise<void>;
}

export interface MdaModule extends ModuleBase<'mda'> {
  /** the mailbox format it writes: an allocation's format (stored in the database, carried on peer links, read by every backend) */
  readonly name: Allocation['format'];
  isAllocated(a: Allocation): boolean;
  /** Runs in the mail writer: write the message (prefix + body chunks) durably, not yet visible. */
  store(req: StoreRequest, body: AsyncIterable<Buffer>): Promise<Held | DeliveryResult>;
}

export function overQuota(req: Pick<StoreRequest, 'quota' | 'quotaFull'>, used: number, size: number): DeliveryResult | null {
  if (req.quota <= 0 || used + size <= req.quota) return null;
  return req.quotaFull === 'defer'
    ? { dsn: '4.2.2', text: `Mailbox full (quota ${req.quota} bytes exceeded); try again later` }
    : { dsn: '5.2.2', text: `Mailbox full (quota ${req.quota} bytes exceeded)` };
}

/**
 * A file-system error during delivery → a temporary status (nothing is ever bounced for it).
 * A refused link or special file (EUNSAFE, ELOOP) is 4.2.0 "Mailbox unsafe" with the path.
 */
export function fsFailure(e: unknown, what: string): DeliveryResult {
  const code = (e as NodeJS.ErrnoException | null)?.code ?? 'error';
  if (code === 'EUNSAFE' || code === 'ELOOP') {
    const detail = e instanceof Error ? e.message : 'symbolic link';
    return { dsn: '4.2.0', text: `Mailbox unsafe, not delivering (${what}: ${detail})` };
  }
  if (code === 'ENOSPC' || code === 'EDQUOT') return { dsn: '4.3.1', text: `Mail system full (${what}: ${code})` };
  if (code === 'EROFS' || code === 'EACCES' || code === 'EPERM') return { dsn: '4.3.0', text: `Mailbox not writable (${what}: ${code})` };
  return { dsn: '4.3.0', text: `Temporary delivery failure (${what}: ${code})` };
}

/** What an MDA program is given for one recipient whose mailbox is on this node. */
export interface ProgramRequest {
  /** the user's mailbox, already created (format: one of the program's `formats`) */
  readonly allocation: Allocation;
  /** the user's address (login name), the envelope recipient as given (+detail), and -a/ORCPT */
  readonly user: string;
  readonly rcpt: string;
  readonly original: string | null;
  /** envelope sender, '' for the null sender */
  readonly sender: string;
  /** an existing folder asked for by +detail or -m (its directory name without the dot), or null */
  readonly folder: string | null;
  /** mailstore.quota (0 = none) and mailstore.quota_full */
  readonly quota: number;
  readonly quotaFull: 'bounce' | 'defer';
  /** the recipient's effective configuration (a program reads its own settings' slice) */
  readonly config: Effective;
  readonly mailUser: MailUser;
  /** trace header lines, the message's header section and the blank line; then the body, as often as asked */
  readonly prefix: Buffer;
  readonly body: () => AsyncIterable<Buffer>;
}

export interface MdaProgram extends ModuleBase<'mda'> {
  /** the mailbox formats it can deliver into */
  readonly formats: readonly Allocation['format'][];
  /** per-user settings it reads (a settings module of its own, e.g. `sieve.*`), or null */
  readonly settings: SettingsDecl | null;
  /** Deliver one message; never throws (a failure is a temporary status). */
  deliver(req: ProgramRequest, env: DeliveryEnv): Promise<DeliveryResult>;
}
