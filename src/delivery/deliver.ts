/**
 * NAME        src/delivery/deliver — `pigeon deliver`: the MDA for Postfix pipe(8)
 * SYNOPSIS    pigeon [-c DIR] deliver [-f SENDER] [-a ORIGINAL] [-m FOLDER] [-p FILE] [-d RCPT]... [--] [RCPT...]
 * DESCRIPTION Resolves every recipient first (one configuration read each; an unknown one is
 *             answered without reading the message), then hands the message from stdin (or -p
 *             FILE) to the delivery driver (src/delivery/driver.ts, shared with LMTP and the peer
 *             receiver), which spools it once and runs the pipeline per recipient. dovecot-lda's -d/-a/-f/-m/-e/-p are
 *             accepted. Without -f the sender is taken from the message's Return-Path.
 * DIAGNOSTICS Exit 0 delivered; 67 unknown user (5.1.1); 65 unusable input (5.1.3, 5.3.4, 5.4.6,
 *             ...); 73 over quota (5.2.2); 75 every temporary failure, including configuration
 *             and database trouble and any bug — pipe(8) bounces on anything but 75 and 71, and a
 *             broken pigeon must never bounce mail. On failure it prints exactly one line,
 *             beginning with the enhanced status code (`5.1.1 <x@y>: user unknown`), which
 *             pipe(8) prefers over the exit status. Nothing else is written to stdout/stderr:
 *             logs go to `log.file`, else syslog, else `log.fallback_file` (src/delivery/env.ts).
 * SECURITY    Runs as the pipe(8) `user=` and then writes mailboxes itself; run as root (by hand)
 *             its writes go to a child running as `mail_user` (src/writer/mail-writer.ts).
 */
import { loadInstance } from '../instance.js';
import type { Store } from '../store.js';
import { openInstanceStore } from '../context.js';
import { isAppError, EX, type ExitCode } from '../errors.js';
import { loadModules } from '../module-files.js';
import { countNothing } from '../metrics.js';
import { NodeDirectory } from '../nodes.js';
import { resolveRecipient, deliverMessage, parseSender, type Accepted } from './driver.js';
import { makeDeliveryEnv, deliveryLogger } from './env.js';
import { exitCodeOf, statusLine, summarise } from './outcome.js';
import type { DeliveryEnv, DeliveryResult, RemoteStore } from './types.js';

export { parseSender } from './driver.js';

export interface DeliverArgs extends DeliverRequest {
  readonly config: string | undefined;
  /** the message; default stdin */
  readonly input: AsyncIterable<Buffer>;
  /** recipients homed on other nodes (the peer link, built on first use) */
  readonly remote: (instance: import('../instance.js').Instance, store: Store, nodes: NodeDirectory) => RemoteStore;
}

export interface DeliverOutcome {
  readonly code: ExitCode;
  /** the one line to print, or null on success */
  readonly line: string | null;
}

const fail = (r: DeliveryResult): DeliverOutcome => ({ code: exitCodeOf(r), line: statusLine(r) });

/** What one `pigeon deliver` asks for, as given on its command line (the hand-off carries it as is). */
export interface DeliverRequest {
  readonly sender: string | undefined;
  readonly original: string | undefined;
  readonly mailbox: string | undefined;
  readonly recipients: readonly string[];
}

/** The checks of a request that need no configuration: null when it may go on. */
export function checkRequest(a: DeliverRequest): DeliveryResult | null {
  if (a.recipients.length === 0) return { dsn: '4.3.5', text: 'no recipient on the command line (check the pipe argv in master.cf)' };
  if (a.sender !== undefined && parseSender(a.sender) === null) {
    return { dsn: '5.1.7', text: a.sender.includes('\ufffd') ? 'bad sender address: not UTF-8' : `bad sender address syntax: ${JSON.stringify(a.sender.slice(0, 100))}` };
  }
  if (a.mailbox !== undefined && /[\0\r\n/]/.test(a.mailbox)) return { dsn: '5.2.0', text: 'bad -m mailbox name' };
  return null;
}

/**
 * One `pigeon deliver` request, checked (checkRequest), on an open store: resolve every
 * recipient, then, when at least one was accepted, call `accepted` (which gives the message) and
 * deliver it. The one result pipe(8) gets (outcome.ts summarise). Shared by the in-process path
 * and `pigeon serve`'s hand-off socket (src/delivery/handoff-server.ts), so both answer alike.
 */
export async function deliverRequest(env: DeliveryEnv, store: Store, a: DeliverRequest, accepted: () => AsyncIterable<Buffer>): Promise<DeliveryResult> {
  const sender: string | null = a.sender === undefined ? null : parseSender(a.sender);
  const results: DeliveryResult[] = [];
  const taken: Accepted[] = [];
  const seen = new Set<string>();
  for (const r of a.recipients) {
    const x = await resolveRecipient(store, r);
    if (seen.has(x.rcpt)) continue; // a duplicate recipient gets one copy
    seen.add(x.rcpt);
    if (x.ok) taken.push(x);
    else {
      env.log('info', 'rejected', { user: x.rcpt, status: statusLine(x.result) });
      results.push(x.result);
    }
  }
  // the message is read only when someone can take it
  if (taken.length > 0) {
    const delivered = await deliverMessage(env, accepted(), { sender, original: a.original ?? null, mailbox: a.mailbox ?? null, recipients: taken });
    for (const x of taken) results.push(delivered.get(x.rcpt) ?? { dsn: '4.3.0', text: 'internal error' });
  }
  return summarise(results);
}

export async function runDeliver(a: DeliverArgs): Promise<DeliverOutcome> {
  // one message, then exit: nobody could read this process's metrics
  countNothing();
  const bad = checkRequest(a);
  if (bad !== null) return fail(bad);

  let instance;
  try {
    instance = loadInstance(a.config);
    await loadModules(instance);
  } catch (e) {
    return fail({ dsn: '4.3.5', text: `configuration error: ${isAppError(e) ? e.message : String(e)}` });
  }
  const logger = deliveryLogger(instance);
  let store: Store;
  try {
    store = await openInstanceStore(instance, { log: (level, m) => logger.log(level, 'database', m) });
  } catch (e) {
    const locked = isAppError(e) && e.temporary;
    logger.log('error', 'deliver', 'cannot open the configuration database', { error: e instanceof Error ? e.message : String(e) });
    return fail({ dsn: locked ? '4.3.0' : '4.3.5', text: `configuration database unavailable: ${isAppError(e) ? e.message : 'error'}` });
  }
  try {
    const nodes = new NodeDirectory(store);
    const env = makeDeliveryEnv(instance, store, logger, 'deliver', a.remote(instance, store, nodes), nodes);
    const s = await deliverRequest(env, store, a, () => a.input);
    return s.dsn.startsWith('2') ? { code: EX.OK, line: null } : fail(s);
  } finally {
    await store.close();
  }
}
