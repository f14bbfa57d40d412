/**
 * NAME        src/delivery/receive — store a message another node handed over for a user of this node
 * DESCRIPTION The peer listener (src/peer/listener.ts) checked the link and the hand-off (this
 *             node is the user's home); here the delivery driver (src/delivery/driver.ts) spools
 *             the announced bytes and runs this node's mailstore only — the sending node already
 *             ran the user's other modules, and its result is what the MTA gets, so the answer
 *             comes only after the message is on disk (fsync, rename, directory fsync). Nothing
 *             received is forwarded again (the environment has no RemoteStore).
 */
import type { ReceivedDelivery } from '../peer/listener.js';
import type { DeliveryEnv, DeliveryResult } from './types.js';
import { deliverMessage } from './driver.js';

const ONLY_STORE: ReadonlySet<string> = new Set(['mailstore']);

export async function receiveDelivery(env: DeliveryEnv, d: ReceivedDelivery): Promise<DeliveryResult> {
  const results = await deliverMessage(env, d.body, {
    sender: d.sender,
    original: d.original,
    mailbox: d.mailbox,
    recipients: [{ ok: true, rcpt: d.rcpt, user: d.user, config: d.config, detail: d.detail }],
    only: ONLY_STORE,
    via: d.from,
  });
  return results.get(d.rcpt) ?? { dsn: '4.3.0', text: 'internal error' };
}
