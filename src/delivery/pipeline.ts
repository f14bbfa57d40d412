/**
 * NAME        src/delivery/pipeline — resolve recipients and run the module list for each one
 * DESCRIPTION `resolveRecipient` does the one configuration read per recipient
 *             (Store.lookup + resolve), `user+detail@domain` falling back to `user@domain`.
 *             `deliverRecipient` checks for a mail loop (a Delivered-To naming the recipient:
 *             5.4.6; more than MAX_HOPS Delivered-To fields: 5.4.6) — not counting the trace block
 *             Postfix pipe(8) with flags=D prepends above the topmost Received: (it belongs to this
 *             very delivery; pipe(8) did its own loop check before) — then runs every module whose
 *             effective `enabled` is true in phase order. Store-phase modules prepare; if all
 *             succeeded their commits run in order; the first failure aborts whatever is not yet
 *             committed and decides the outcome. Notify-phase modules run after that, only for a
 *             delivered message, and cannot change the outcome; so do the `afterDelivery` steps
 *             earlier modules asked for (the antivirus notice). The last scan/store module, when
 *             nothing was prepared before it, is told that it may commit at once
 *             (RecipientRequest.commitAtOnce): nothing between its prepare and its commit could
 *             fail. If no module stored or forwarded
 *             the message, the recipient is deferred (4.3.5): mail is never dropped silently.
 * DIAGNOSTICS Any exception inside a module becomes 4.3.0 (temporary): nothing is ever bounced
 *             because of a bug.
 */
import type { Store, UserRecord } from '../store.js';
import { resolve, type Effective } from '../resolve.js';
import { slice } from '../modules.js';
import { normaliseAddress, splitDetail } from '../address.js';
import { isAppError, mailStatusOf } from '../errors.js';
import { runOrder } from './registry.js';
import type { DeliveryEnv, DeliveryResult, Prepared, RecipientRequest } from './types.js';
import { loopDeliveredTo, type Spooled } from './message.js';
import { deliveries, deliveryStatus } from '../metrics.js';

/** Count one recipient's result against the module that decided it (metrics). */
function counted(module: string, r: DeliveryResult): DeliveryResult {
  deliveries.inc({ module, status: deliveryStatus(r.dsn) });
  return r;
}

export const MAX_HOPS = 30;

export type Resolved =
  | { readonly ok: true; readonly rcpt: string; readonly user: UserRecord; readonly config: Effective; readonly detail: string | null }
  | { readonly ok: false; readonly rcpt: string; readonly result: DeliveryResult };

/** Who `rcpt` is: the one database read for this recipient. */
export async function resolveRecipient(store: Store, rcptRaw: string): Promise<Resolved> {
  const shown = rcptRaw.replace(/[\r\n\0]/g, '').slice(0, 320);
  let a;
  try {
    a = normaliseAddress(rcptRaw.replace(/^<(.*)>$/, '$1'));
  } catch {
    return { ok: false, rcpt: shown, result: { dsn: '5.1.3', text: `<${shown}>: bad recipient address syntax` } };
  }
  try {
    let found = await store.lookup(a.address);
    let detail: string | null = null;
    if (!found) {
      const s = splitDetail(a);
      if (s.detail !== null || s.base.address !== a.address) {
        found = await store.lookup(s.base.address);
        detail = s.detail;
      }
    }
    if (!found) return { ok: false, rcpt: a.address, result: { dsn: '5.1.1', text: `<${a.address}>: user unknown` } };
    if (found.user.state !== 'active') return { ok: false, rcpt: a.address, result: { dsn: '5.2.1', text: `<${a.address}>: mailbox disabled` } };
    return { ok: true, rcpt: a.address, user: found.user, config: resolve(found.rows), detail };
  } catch (e) {
    if (isAppError(e) && e.code === 'DB_UNAVAILABLE') return { ok: false, rcpt: a.address, result: { dsn: '4.3.0', text: `<${a.address}>: configuration database unavailable; try again later` } };
    if (isAppError(e) && e.code === 'DB_LOCKED') return { ok: false, rcpt: a.address, result: { dsn: '4.3.0', text: `<${a.address}>: configuration database busy; try again later` } };
    return { ok: false, rcpt: a.address, result: { dsn: '4.3.0', text: `<${a.address}>: configuration lookup failed: ${isAppError(e) ? e.message : 'internal error'}` } };
  }
}

export interface RecipientInput {
  readonly resolved: Extract<Resolved, { ok: true }>;
  readonly sender: string;
  readonly original: string | null;
  readonly mailbox: string | null;
  readonly message: Spooled;
  /** the node the message came from over a peer link (log) */
  readonly via?: string;
}

function loopCheck(rcpt: string, user: string, m: Spooled): DeliveryResult | null {
  // pipe(8) flags=D... writes Delivered-To for this delivery above the topmost Received: not a loop
  const dt = loopDeliveredTo(m);
  const seen = dt.find((a) => a === rcpt || a === user);
  if (seen !== undefined) return { dsn: '5.4.6', text: `<${rcpt}>: mail forwarding loop (Delivered-To: ${seen} already present)` };
  if (dt.length > MAX_HOPS) return { dsn: '5.4.6', text: `<${rcpt}>: mail forwarding loop (${dt.length} Delivered-To fields)` };
  return null;
}

/** A step that threw: the mail status it carries (mailError), else a temporary failure naming it. */
const failureOf = (e: unknown, what: string): DeliveryResult => {
  const r = mailStatusOf(e, what);
  return isAppError(e) && e.status !== null ? r : { dsn: '4.3.0', text: r.text };
};

/** Deliver one message to one resolved recipient (`only`: just these modules run). Never throws. */
export async function deliverRecipient(input: RecipientInput, env: DeliveryEnv, only?: ReadonlySet<string>): Promise<DeliveryResult> {
  const { resolved: r, message } = input;
  const loop = loopCheck(r.rcpt, r.user.address, message);
  if (loop) return counted('pipeline', loop);
  const added: Buffer[] = [];
  const req: RecipientRequest = {
    added,
    addHeader(name, value) {
      if (!/^[\x21-\x39\x3b-\x7e]{1,76}$/.test(name)) throw new Error(`not a header field name: ${JSON.stringify(name.slice(0, 80))}`);
      if (/[\r\n\0]/.test(value)) throw new Error(`header ${name}: no CR, LF or NUL in a value`);
      added.push(Buffer.from(`${name}: ${value}\n`, 'utf8'));
    },
    rcpt: r.rcpt,
    user: r.user,
    config: r.config,
    detail: r.detail,
    original: input.original,
    sender: input.sender,
    message,
    mailbox: input.mailbox,
    keep: true,
    folder: null,
    commitAtOnce: false,
  };
  const enabled = runOrder().filter((m) => r.config[`${m.name}.enabled`]?.value === true && (only === undefined || only.has(m.name)));
  const prepared: Prepared[] = [];
  const afters: { readonly name: string; readonly run: () => Promise<void> }[] = [];
  /** the module that prepared each entry of `prepared` */
  const preparedBy: string[] = [];
  const abortAll = async (from: number): Promise<void> => {
    for (const p of prepared.slice(from).reverse()) await p.abort().catch(() => undefined);
  };
  const steps = enabled.filter((x) => x.phase !== 'notify');
  for (const [i, m] of steps.entries()) {
    req.commitAtOnce = prepared.length === 0 && i === steps.length - 1;
    let step;
    try {
      step = await m.run(req, slice(r.config, m.name), env);
    } catch (e) {
      env.log('error', `${m.name}: failed`, { user: r.user.address, error: e instanceof Error ? e.message : String(e) });
      step = { kind: 'fail' as const, result: failureOf(e, m.name) };
    }
    if (step.kind === 'fail') {
      await abortAll(0);
      return counted(m.name, step.result);
    }
    if (step.keep === false) req.keep = false;
    if (step.folder !== undefined) req.folder = step.folder;
    if (step.afterDelivery) afters.push({ name: m.name, run: step.afterDelivery });
    if (step.prepared) {
      prepared.push(step.prepared);
      preparedBy.push(m.name);
    }
  }
  if (prepared.length === 0) {
    return counted('pipeline', { dsn: '4.3.5', text: `<${r.rcpt}>: no delivery module stored or forwarded the message (check mailstore.enabled / forward.to)` });
  }
  const done: string[] = [];
  for (let i = 0; i < prepared.length; i++) {
    const p = prepared[i];
    if (!p) continue;
    try {
      await p.commit();
      done.push(p.what);
    } catch (e) {
      await abortAll(i + 1);
      const f = failureOf(e, p.what);
      if (done.length > 0) env.log('warn', 'delivery: deferred after a partial commit; a retry may duplicate', { user: r.user.address, done: done.join('; ') });
      return counted(preparedBy[i] ?? 'pipeline', f);
    }
  }
  for (const a of afters) {
    try {
      await a.run();
    } catch (e) {
      env.log('warn', `${a.name}: failed (message already delivered)`, { user: r.user.address, error: e instanceof Error ? e.message : String(e) });
    }
  }
  for (const m of enabled.filter((x) => x.phase === 'notify')) {
    try {
      await m.run(req, slice(r.config, m.name), env);
    } catch (e) {
      env.log('warn', `${m.name}: failed (message already delivered)`, { user: r.user.address, error: e instanceof Error ? e.message : String(e) });
    }
  }
  env.log('info', 'delivered', { user: r.rcpt, from: input.sender === '' ? '<>' : input.sender, via: input.via ?? null, msgid: message.get('message-id')[0] ?? null, size: message.size, to: done.join('; ') });
  for (const m of new Set(preparedBy)) deliveries.inc({ module: m, status: 'delivered' });
  return { dsn: '2.0.0', text: `<${r.rcpt}> Saved` };
}
