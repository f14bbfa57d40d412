/**
 * NAME        src/delivery/forward — delivery module: forward to other addresses
 * DESCRIPTION Re-injects the message through the MTA's sendmail command with the original
 *             envelope sender, to `forward.to`; with `forward.keep` false the mailstore is skipped.
 *             The forwarded copy carries `Delivered-To: RECIPIENT`, so when a forward chain comes
 *             back here the loop check bounces it (5.4.6) instead of circling. Targets equal to
 *             the recipient itself are dropped. The sendmail call is this module's commit: it runs
 *             only after every other store-phase module prepared successfully, and before the
 *             mailbox rename, so a failed forward defers the whole recipient with nothing stored.
 * CONFIG      forward.enabled, forward.to, forward.keep
 */
import { mailError } from '../errors.js';
import { normaliseAddress } from '../address.js';
import { deliveredParts } from './message.js';
import { sendmail } from './sendmail.js';
import type { DeliveryModule, StepResult } from './types.js';

const forward: DeliveryModule = {
  kind: 'delivery',
  name: 'forward',
  phase: 'store',
  summary: 'forwards mail to other addresses through the MTA',
  settings: {
    enabled: { type: 'boolean', default: false, doc: 'forward incoming mail' },
    to: { type: 'string-list', default: [], doc: 'addresses to forward to (comma-separated or JSON list)' },
    keep: { type: 'boolean', default: true, doc: 'also keep a copy in the mailbox' },
  },
  async run(req, settings, env): Promise<StepResult> {
    const raw = Array.isArray(settings['to']) ? settings['to'] : [];
    const targets: string[] = [];
    for (const v of raw) {
      if (typeof v !== 'string') continue;
      let a: string;
      try {
        a = normaliseAddress(v.trim()).address;
      } catch {
        env.log('warn', 'forward: invalid target ignored', { user: req.user.address, target: v });
        continue;
      }
      if (a === req.rcpt || a === req.user.address || targets.includes(a)) continue;
      targets.push(a);
    }
    if (targets.length === 0) return { kind: 'continue' };
    const keep = settings['keep'] !== false;
    const trace = Buffer.from(`Delivered-To: ${req.rcpt}\n`, 'latin1');
    const parts = deliveredParts(req.message, trace);
    return {
      kind: 'continue',
      keep,
      prepared: {
        what: `forward to ${targets.join(', ')}`,
        async commit() {
          const r = await sendmail({
            command: env.sendmail,
            sender: req.sender,
            recipients: targets,
            data: async function* () {
              yield parts.prefix;
              yield* req.message.body();
            },
          });
          if (r) throw mailError(r);
          env.log('info', 'forward: forwarded', { user: req.user.address, to: targets.join(' ') });
        },
        async abort() {
          /* nothing was sent */
        },
      },
    };
  },
};

export default forward;
