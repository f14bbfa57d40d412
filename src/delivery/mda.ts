/**
 * NAME        src/delivery/mda — the contract of the mailstore's MDA modules (maildir, mbox)
 * DESCRIPTION An MDA module knows one mailbox format: whether a user's mailbox exists, how to
 *             create it (lazily, idempotently, owned by the mail user), and how to deliver into
 *             it in two steps (prepare = write and fsync; commit = make visible). Registered by
 *             name in src/delivery/registry.ts; `mailstore.format` chooses one.
 *             Errors of the file system map to enhanced status codes here, once.
 */
import type { Allocation } from '../store.js';
import type { MailUser } from '../mailuser.js';
import type { Spooled } from './message.js';
import type { DeliveryResult, Prepared } from './types.js';

export interface MdaRequest {
  readonly allocation: Allocation;
  readonly mailUser: MailUser;
  readonly message: Spooled;
  /** trace header lines (Return-Path, Delivered-To) */
  readonly trace: Buffer;
  /** folder asked for by +detail or -m, delivered into only when it exists */
  readonly folder: string | null;
  readonly quota: number;
  readonly quotaFull: 'bounce' | 'defer';
  readonly sender: string;
  readonly hostname: string;
}

export type MdaPrepared = Prepared & { readonly folder: string; readonly size: number };

export interface MdaModule {
  readonly name: 'maildir' | 'mbox';
  isAllocated(a: Allocation): boolean;
  allocate(a: Allocation, mu: MailUser): void;
  prepare(req: MdaRequest): Promise<MdaPrepared | DeliveryResult>;
}

export function overQuota(req: MdaRequest, used: number, size: number): DeliveryResult | null {
  if (req.quota <= 0 || used + size <= req.quota) return null;
  return req.quotaFull === 'defer'
    ? { dsn: '4.2.2', text: `Mailbox full (quota ${req.quota} bytes exceeded); try again later` }
    : { dsn: '5.2.2', text: `Mailbox full (quota ${req.quota} bytes exceeded)` };
}

/** A file-system error during delivery → a temporary status (nothing is ever bounced for it). */
export function fsFailure(e: unknown, what: string): DeliveryResult {
  const code = (e as NodeJS.ErrnoException).code ?? 'error';
  if (code === 'ENOSPC' || code === 'EDQUOT') return { dsn: '4.3.1', text: `Mail system full (${what}: ${code})` };
  if (code === 'EROFS' || code === 'EACCES' || code === 'EPERM') return { dsn: '4.3.0', text: `Mailbox not writable (${what}: ${code})` };
  return { dsn: '4.3.0', text: `Temporary delivery failure (${what}: ${code})` };
}
