/**
 * NAME        backends/peer — an authenticated session whose mailbox lives on another node
 * DESCRIPTION The router uses this when the user's home is another node: it hands the session over
 *             a peer link (src/peer/link.ts) carrying the user, the resolved configuration, the
 *             client's address and TLS state, the session id and the IMAP login tag. The home node
 *             starts its local Dovecot/Courier from that (no second authentication, no database
 *             read) and its answer to the login tag comes back through the link, so the client
 *             sees the home node's own `OK [CAPABILITY …] Logged in`. Then bytes are relayed both
 *             ways until either side ends; a link that dies ends the client's session.
 * DIAGNOSTICS AppError PEER_UNAVAILABLE / PEER_REFUSED from the link; the router answers
 *             `NO [UNAVAILABLE]` / `-ERR [SYS/TEMP]`.
 */
import { pipeline } from 'node:stream';
import type { TLSSocket } from 'node:tls';
import type { ResolvedUser } from '../src/modules.js';
import type { ClientConn } from '../src/proxy/conn.js';
import { sendHandOff } from '../src/peer/link.js';
import type { PeerContext } from '../src/peer/context.js';
import { wireUser, wireConfig } from '../src/peer/protocol.js';
import { BACKEND_START_MS } from '../src/limits.js';

export interface PeerSession {
  readonly kind: 'peer';
  readonly node: string;
  readonly socket: TLSSocket;
}

/** Hand the logged-in session to `node`; resolves once that node has its backend running. */
export async function startPeerSession(
  ctx: PeerContext,
  node: string,
  protocol: 'imap' | 'pop3',
  u: ResolvedUser,
  conn: ClientConn,
  sessionId: string,
  tag: string | null,
): Promise<PeerSession> {
  const socket = await sendHandOff(
    ctx,
    node,
    {
      kind: protocol,
      user: wireUser(u.user),
      config: wireConfig(u.config),
      client: { rip: conn.peer.rip, rport: conn.peer.rport, lip: conn.peer.lip, lport: conn.peer.lport, tls: conn.secure },
      session: sessionId,
      tag,
      hops: 1,
      deliver: null,
      move: null,
    },
    BACKEND_START_MS + ctx.handoffTimeoutMs,
  );
  return { kind: 'peer', node, socket };
}

/** Relay client ↔ link until either ends. Byte counts are of the client side. */
export function relayPeer(conn: ClientConn, s: PeerSession, leftover: Buffer, onLinkLost: (why: string) => void): Promise<{ in: number; out: number; exit: number | null }> {
  const { input, output, pending } = conn.detach();
  const link = s.socket;
  let bytesIn = 0;
  let bytesOut = 0;
  return new Promise((resolve) => {
    let finished = false;
    const finish = (): void => {
      if (finished) return;
      finished = true;
      input.destroy();
      link.destroy();
      resolve({ in: bytesIn, out: bytesOut, exit: null });
    };
    for (const b of [leftover, ...pending]) {
      if (b.length === 0) continue;
      bytesIn += b.length;
      link.write(b);
    }
    input.on('data', (c: Buffer) => {
      bytesIn += c.length;
    });
    link.on('data', (c: Buffer) => {
      bytesOut += c.length;
    });
    let clientGone = false;
    input.once('close', () => {
      clientGone = true;
    });
    link.once('error', (e) => {
      if (!clientGone) onLinkLost(e.message);
    });
    pipeline(input, link, () => {
      // client closed: let the home node see EOF, then make sure the link is gone
      setTimeout(finish, 2000).unref();
      link.end();
    });
    pipeline(link, output as NodeJS.WritableStream, () => {
      (output as NodeJS.WritableStream & { destroy?: () => void }).destroy?.();
      finish();
    });
    input.resume();
  });
}
