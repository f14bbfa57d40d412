/**
 * NAME        src/delivery/driver — one message to its recipients: the one delivery driver
 * SYNOPSIS    const r = await resolveRecipient(store, rcpt);            // per recipient, at once
 *             const results = await deliverMessage(env, input, { sender, recipients, … });
 * DESCRIPTION Shared by `pigeon deliver` (src/delivery/deliver.ts), LMTP (src/delivery/lmtp.ts)
 *             and the peer listener's receiver (src/delivery/receive.ts). The caller resolves
 *             each recipient first (one configuration read each, src/delivery/pipeline.ts), so an
 *             unknown one is refused before the message is read. `deliverMessage` then spools the
 *             message once (as large as the largest mailstore.max_size of the recipients allows),
 *             takes the sender from Return-Path when the caller has none, and runs the pipeline
 *             for each distinct recipient in order; a recipient given twice gets one copy and
 *             the same answer. Every result that is not a delivery is logged (deferred/rejected).
 * DIAGNOSTICS A spool failure (disk full, a client that went away) answers every recipient with a
 *             temporary status (src/delivery/mda.ts fsFailure); nothing else throws.
 */
import type { DeliveryEnv, DeliveryResult } from './types.js';
import { spool, headerText, type Spooled } from './message.js';
import { deliverRecipient, type Resolved } from './pipeline.js';
import { spoolLimit } from './mailstore.js';
import { fsFailure } from './mda.js';
import { statusLine } from './outcome.js';
import { fault } from './fault.js';
import { deliveries, deliveryDuration, deliveryStatus } from '../metrics.js';

export { resolveRecipient, type Resolved } from './pipeline.js';

export type Accepted = Extract<Resolved, { ok: true }>;

export interface Transaction {
  /** envelope sender, '' for the null sender; null: the message's Return-Path (pipe(8) without -f) */
  readonly sender: string | null;
  /** original recipient (-a / ORCPT), for information */
  readonly original: string | null;
  /** -m FOLDER, or null */
  readonly mailbox: string | null;
  /** the accepted recipients in order; one given twice is delivered once and answered twice */
  readonly recipients: readonly Accepted[];
  /** only these modules run (a delivery received over a peer link: the sender ran the others) */
  readonly only?: ReadonlySet<string>;
  /** the node a delivery came from (log) */
  readonly via?: string;
}

/**
 * Normalise an envelope sender: '' for the null sender; null if unusable. U+FFFD is refused: node
 * puts it in place of argv bytes that are not UTF-8 (and smtp-server in place of such bytes in
 * MAIL FROM), so a sender holding it is not the address the MTA gave.
 */
export function parseSender(s: string): string | null {
  const v = s.trim().replace(/^<(.*)>$/, '$1').trim();
  // pipe(8) expands the null sender to MAILER-DAEMON unless null_sender= is set
  if (v === '' || v.toUpperCase() === 'MAILER-DAEMON') return '';
  if (/[\s\0<>\ufffd]/.test(v) || v.length > 320) return null;
  return v;
}

/** Log a result that is not a delivery. */
export function logOutcome(env: DeliveryEnv, rcpt: string, r: DeliveryResult, via?: string): void {
  if (r.dsn.startsWith('2')) return;
  const temp = r.dsn.startsWith('4');
  env.log(temp ? 'warn' : 'info', temp ? 'deferred' : 'rejected', { user: rcpt, status: statusLine(r), ...(via !== undefined ? { via } : {}) });
}

/**
 * Spool `input` once and deliver it to every recipient of `tx`. Returns each distinct
 * recipient's result (by address); never throws for a delivery problem.
 */
export async function deliverMessage(env: DeliveryEnv, input: AsyncIterable<Buffer>, tx: Transaction): Promise<ReadonlyMap<string, DeliveryResult>> {
  const results = new Map<string, DeliveryResult>();
  if (tx.recipients.length === 0) return results;
  const timer = deliveryDuration.startTimer();
  let message: Spooled;
  try {
    message = await spool(input, { limit: spoolLimit(tx.recipients.map((r) => r.config['mailstore.max_size']?.value)) });
  } catch (e) {
    const r = fsFailure(e, 'spool');
    for (const x of tx.recipients) results.set(x.rcpt, r);
    deliveries.inc({ module: 'spool', status: deliveryStatus(r.dsn) }, results.size);
    timer();
    return results;
  }
  try {
    await fault('spooled');
    // the Return-Path's bytes as UTF-8 (it becomes the envelope sender of forwards and the
    // recipient of a vacation reply); one that is not UTF-8 counts as the null sender
    const sender = tx.sender ?? parseSender(headerText(message.get('return-path')[0] ?? '') ?? '') ?? '';
    for (const r of tx.recipients) {
      if (results.has(r.rcpt)) continue; // a duplicate recipient: one copy, the same answer
      const res = await deliverRecipient({ resolved: r, sender, original: tx.original, mailbox: tx.mailbox, message, ...(tx.via !== undefined ? { via: tx.via } : {}) }, env, tx.only);
      logOutcome(env, r.rcpt, res, tx.via);
      results.set(r.rcpt, res);
    }
  } finally {
    await message.close();
    timer();
  }
  return results;
}
