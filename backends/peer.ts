/**
 * NAME        backends/peer — the backend for a mailbox that lives on another node (the peer link)
 * DESCRIPTION `serves: 'remote'`: the router uses it when the user's home is another node. It
 *             hands the session over a peer link (src/peer/link.ts) carrying the user, the
 *             resolved configuration, the client's address and TLS state, the session id and the
 *             IMAP login tag. The home node starts its local Dovecot/Courier from that (no second
 *             authentication, no database read) and its answer to the login tag comes back
 *             through the link, so the client sees the home node's own `OK [CAPABILITY …] Logged
 *             in`. Then the relay joins client and link until either side ends; a link that dies
 *             ends the client's session. Settings: the `peer:` section of pigeon.yaml (the node's
 *             cluster link, shared with the delivery agent and the peer listener: src/peer/).
 *             The link module is loaded, and this node's credentials read, on the first session
 *             that needs them; the daemon keeps a pool of spare links per node in use (ctx.daemon,
 *             peer.pool_size).
 * DIAGNOSTICS AppError PEER_UNAVAILABLE / PEER_REFUSED from the link; the router answers
 *             `NO [UNAVAILABLE]` / `-ERR [SYS/TEMP]`. A link lost mid-session is logged
 *             (`Peer link to node N lost: …`).
 */
import type { TLSSocket } from 'node:tls';
import type { Backend, BackendContext, BackendEnd, BackendRequest, BackendSession } from './types.js';
import type { PeerContext } from '../src/peer/context.js';
import { BACKEND_START_MS, RELAY_GRACE_MS } from '../src/limits.js';

function linkSession(node: string, link: TLSSocket): BackendSession {
  let clientGone = false;
  let lost: string | null = null;
  link.on('error', (e) => {
    if (!clientGone) lost ??= `Peer link to node ${node} lost: ${e.message}`;
  });
  const ended = new Promise<BackendEnd>((resolve) => {
    const done = (): void => resolve({ exit: null, ...(lost !== null ? { lost } : {}) });
    if (link.destroyed) done();
    else link.once('close', done);
  });
  return {
    greeting: Buffer.alloc(0),
    handedOff: false,
    input: link,
    output: link,
    ended,
    clientEnded() {
      // the client closed: let the home node see EOF, then make sure the link is gone
      clientGone = true;
      if (!link.writableEnded) link.end();
      setTimeout(() => link.destroy(), RELAY_GRACE_MS).unref();
    },
    stop() {
      link.destroy();
    },
  };
}

async function start(peer: PeerContext, req: BackendRequest): Promise<BackendSession> {
  const [{ sendHandOff }, { wireUser, wireConfig }] = await Promise.all([import('../src/peer/link.js'), import('../src/peer/protocol.js')]);
  const p = req.client.peer;
  const socket = await sendHandOff(
    peer,
    req.node,
    {
      kind: req.protocol,
      user: wireUser(req.user.user),
      config: wireConfig(req.user.config),
      client: { rip: p.rip, rport: p.rport, lip: p.lip, lport: p.lport, tls: req.client.secure },
      session: req.sessionId,
      tag: req.tag,
      hops: 1,
      deliver: null,
      move: null,
    },
    BACKEND_START_MS + peer.handoffTimeoutMs,
  );
  return linkSession(req.node, socket);
}

/** This process's peer context for sessions, built on first use. */
function peerOf(ctx: BackendContext): () => Promise<PeerContext> {
  let made: Promise<PeerContext> | null = null;
  return () =>
    (made ??= import('../src/peer/context.js').then(({ createPeerContext }) => {
      const c = createPeerContext(ctx.instance, ctx.store, ctx.nodes);
      c.prewarm = ctx.daemon;
      return c;
    }));
}

export default {
  kind: 'backend',
  name: 'peer',
  summary: "the node that holds the user's mailbox, over a mutual-TLS peer link",
  serves: 'remote',
  section: null,
  probe: null,
  create(_config, ctx) {
    const peer = peerOf(ctx);
    return {
      acceptsHandoff: () => false,
      start: async (req) => start(await peer(), req),
    };
  },
} satisfies Backend<null>;
