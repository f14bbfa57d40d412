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
import type { Writable } from 'node:stream';
import type { TLSSocket } from 'node:tls';
import type { ResolvedUser } from '../src/modules.js';
import type { ClientConn } from '../src/proxy/conn.js';
import { sendHandOff } from '../src/peer/link.js';
import type { PeerContext } from '../src/peer/context.js';
import { wireUser, wireConfig } from '../src/peer/protocol.js';
import { BACKEND_START_MS } from '../src/limits.js';
import { splice } from '../src/proxy/splice.js';

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
  return new Promise((resolve) => {
    let finished = false;
    let early = 0;
    const finish = (): void => {
      if (finished) return;
      finished = true;
      input.destroy();
      link.destroy();
      resolve({ in: early + counts.bytesIn, out: counts.bytesOut, exit: null });
    };
    for (const b of [leftover, ...pending]) {
      if (b.length === 0) continue;
      early += b.length;
      link.write(b);
    }
    let clientGone = false;
    link.once('error', (e) => {
      if (!clientGone) onLinkLost(e.message);
    });
    const counts = splice(
      { client: { input, output: output as Writable }, backend: { input: link, output: link } },
      {
        clientEnded: () => {
          // client closed: let the home node see EOF, then make sure the link is gone
          clientGone = true;
          if (!link.writableEnded) link.end();
          setTimeout(finish, 2000).unref();
        },
        // the home node's last bytes reached the client's socket
        backendEnded: () => {
          (output as Writable).destroy();
          finish();
        },
      },
    );
  });
}
