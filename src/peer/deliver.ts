/**
 * NAME        src/peer/deliver — hand one recipient's message to its home node's mailstore
 * DESCRIPTION Used by the mailstore module when the recipient lives on another node: a `deliver`
 *             hand-off (user, resolved config, envelope), then the message bytes, then the home
 *             node's one-line result. The result is what the MTA gets, so mail is acknowledged
 *             only after the home node has it on disk. A link lost before the answer defers the
 *             message (4.4.2): the MTA retries; at worst the home node stored it and the retry
 *             duplicates it — never a loss.
 */
import { PEER_STORE_ANSWER_MS } from '../limits.js';
import type { TLSSocket } from 'node:tls';
import type { RecipientRequest, DeliveryResult } from '../delivery/types.js';
import type { PeerContext } from './context.js';
import { sendHandOff, linkSessionId } from './link.js';
import { wireUser, wireConfig, readLine, writeAll } from './protocol.js';
import { isAppError } from '../errors.js';



export async function deliverViaPeer(ctx: PeerContext, node: string, req: RecipientRequest): Promise<DeliveryResult> {
  const m = req.message;
  const sep = Buffer.from('\n');
  // header lines this node's modules added travel above the message's own header
  const head = Buffer.concat([...req.added, m.head]);
  const size = head.length + sep.length + m.bodySize;
  let sock: TLSSocket;
  try {
    sock = await sendHandOff(
      ctx,
      node,
      {
        kind: 'deliver',
        user: wireUser(req.user),
        config: wireConfig(req.config),
        client: null,
        session: linkSessionId(),
        tag: null,
        hops: 1,
        deliver: { rcpt: req.rcpt, sender: req.sender, detail: req.detail, original: req.original, mailbox: req.folder ?? req.mailbox, size },
        move: null,
      },
      ctx.handoffTimeoutMs,
    );
  } catch (e) {
    return { dsn: '4.4.1', text: `mailbox of ${req.user.address} is on node ${node}: ${isAppError(e) ? e.message : String(e)}` };
  }
  try {
    await writeAll(sock, head);
    await writeAll(sock, sep);
    for await (const c of m.body()) await writeAll(sock, c);
    const line = await readLine(sock, 4096, PEER_STORE_ANSWER_MS);
    const r = JSON.parse(line.toString('utf8')) as { dsn?: unknown; text?: unknown };
    if (typeof r.dsn !== 'string' || !/^[245]\.\d{1,3}\.\d{1,3}$/.test(r.dsn)) return { dsn: '4.4.2', text: `node ${node} answered the delivery with garbage` };
    return { dsn: r.dsn, text: String(r.text ?? '').replace(/[\r\n]/g, ' ').slice(0, 400) };
  } catch (e) {
    return { dsn: '4.4.2', text: `link to node ${node} lost before it confirmed the delivery: ${(e as Error).message}` };
  } finally {
    sock.destroy();
  }
}
