/**
 * NAME        src/delivery/mailstore — delivery module: store the message in the user's mailbox
 * DESCRIPTION Finds (or lazily allocates, through the creator module chosen in
 *             `mailstore.creator`) the user's mailbox with src/allocation.ts `placeUser` — the same
 *             function the proxy uses, so Dovecot is started on exactly this path — then hands the
 *             message to the MDA module of the mailbox's format (src/delivery/maildir.ts, mbox.ts).
 *             Skipped when an earlier module (forward with keep=false) took the message.
 * CONFIG      mailstore.enabled, format, creator, quota, quota_full, max_size, detail
 * DIAGNOSTICS 5.3.4 too big; 5.2.2 / 4.2.2 over quota; 4.3.x file system; 4.2.1 creator none and
 *             no mailbox; 4.3.0 mailbox on another node (peer delivery not available yet).
 */
import type { Json } from '../settings.js';
import { placeUser } from '../allocation.js';
import { isAppError } from '../errors.js';
import { MDA_MODULES } from './registry-mda.js';
import { traceHeaders } from './message.js';
import { fsFailure } from './mda.js';
import type { DeliveryModule, StepResult } from './types.js';

const num = (v: Json | undefined, d: number): number => (typeof v === 'number' ? v : d);

/** The largest spool any of these recipients' mailstore settings allows (0 = unlimited). */
export function spoolLimit(maxSizes: readonly (Json | undefined)[]): number {
  let m = 0;
  for (const v of maxSizes) {
    const n = num(v, 67108864);
    if (n === 0) return 0;
    m = Math.max(m, n);
  }
  return m === 0 ? 0 : m + 1;
}

const mailstore: DeliveryModule = {
  name: 'mailstore',
  phase: 'store',
  summary: 'stores mail in the user\'s mailbox (maildir or mbox)',
  async run(req, settings, env): Promise<StepResult> {
    if (!req.keep) return { kind: 'continue' };
    const max = num(settings['max_size'], 67108864);
    if (req.message.oversized || (max > 0 && req.message.size > max)) {
      return { kind: 'fail', result: { dsn: '5.3.4', text: `Message too big for mailbox (limit ${max} bytes)` } };
    }
    let placement;
    try {
      placement = await placeUser(env.alloc, req.user, req.config);
    } catch (e) {
      if (isAppError(e)) {
        if (e.code === 'NO_SUCH_USER') return { kind: 'fail', result: { dsn: '4.2.1', text: `mailbox of ${req.user.address} does not exist and mailstore.creator is none` } };
        if (e.code === 'INVALID_ADDRESS') return { kind: 'fail', result: { dsn: '5.1.3', text: e.message } };
        return { kind: 'fail', result: { dsn: '4.3.0', text: e.message } };
      }
      return { kind: 'fail', result: fsFailure(e, 'allocate mailbox') };
    }
    if (placement.kind === 'remote') {
      return { kind: 'fail', result: { dsn: '4.3.0', text: `mailbox of ${req.user.address} is on node ${placement.node}; deliver there (peer delivery is not available yet)` } };
    }
    const a = placement.allocation;
    const mda = MDA_MODULES.get(a.format);
    if (!mda) return { kind: 'fail', result: { dsn: '4.3.5', text: `unknown mailbox format ${a.format}` } };
    if (!mda.isAllocated(a)) {
      try {
        mda.allocate(a, env.alloc.mailUser);
      } catch (e) {
        return { kind: 'fail', result: fsFailure(e, 'create mailbox') };
      }
    }
    const folder = req.mailbox ?? (settings['detail'] === false ? null : req.detail);
    const qf = settings['quota_full'] === 'defer' ? 'defer' : 'bounce';
    const r = await mda.prepare({
      allocation: a,
      mailUser: env.alloc.mailUser,
      message: req.message,
      trace: traceHeaders(req.sender, req.rcpt),
      folder,
      quota: num(settings['quota'], 0),
      quotaFull: qf,
      sender: req.sender,
      hostname: env.hostname,
    });
    if ('dsn' in r) return { kind: 'fail', result: r };
    env.log('debug', 'mailstore: prepared', { user: req.user.address, file: r.what });
    return { kind: 'continue', prepared: r };
  },
};

export default mailstore;
