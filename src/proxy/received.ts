/**
 * NAME        src/proxy/received — run an IMAP/POP3 session another node handed over
 * DESCRIPTION The peer listener (src/peer/listener.ts) checked the link and the hand-off; here
 *             the session is started like a local login's, from what was received — no second
 *             authentication, no user lookup: the local backend the user's configuration names,
 *             never forwarded again (the route's `forward: false`). The sending node is told
 *             `ok` once the backend runs, or why not; then the relay carries the session over the
 *             link. No user+IP slot is taken: the node the client connected to counted it.
 *             Under `pigeon serve` (a spawner process, `handoff` on) the backend is started the
 *             way a local plain-TCP login's is: handed off, by the spawner, on one end of a local
 *             socket pair (src/peer/pair.ts), and the relay joins the link with the other end. The
 *             worker does not fork (a fork of the worker blocked its event loop for milliseconds
 *             per received login), and Dovecot answers the login tag itself while the `ok`
 *             crosses the link. Otherwise (one-shot processes, a backend that takes no hand-off,
 *             a pair that cannot be made) the backend runs on pipes and the relay reads those.
 * DIAGNOSTICS `imap(user): Backend failure for a session from NODE: …`, `imap(user): Login:
 *             from=NODE, method=peer: …`.
 */
import type { Socket } from 'node:net';
import type { ProxyEnv } from './env.js';
import type { ReceivedSession } from '../peer/listener.js';
import type { BackendEnd, BackendSession } from '../../backends/types.js';
import { ClientConn } from './conn.js';
import { route, runSession } from './router.js';
import { relay } from './relay.js';
import { sessionPair, type Pair } from '../peer/pair.js';
import { RELAY_GRACE_MS } from '../limits.js';

export async function receiveSession(env: ProxyEnv, s: ReceivedSession): Promise<void> {
  const c = s.client;
  const conn = new ClientConn({ stream: s.sock, peer: { rip: c.rip, rport: c.rport, lip: c.lip, lport: c.lport }, secure: true, local: false, canTls: false });
  const address = s.user.user.address;
  let pair: Pair | null = null;
  if (env.spawner && env.instance.config.handoff) {
    try {
      pair = await sessionPair();
    } catch (e) {
      env.log.log('warn', `${s.protocol}(${address})`, `No local socket pair for a session from ${s.from} (relaying through pipes): ${(e as Error).message}:`, { session: s.session });
    }
  }
  const rt = await route(env, s.protocol, s.user, conn, s.session, s.tag, () => Buffer.alloc(0), { forward: false, ...(pair ? { handoffSocket: pair.far } : {}) });
  const handedOff = rt.ok && rt.session.handedOff;
  if (pair && !handedOff) {
    pair.near.destroy();
    pair.far.destroy();
  }
  if (!rt.ok) {
    env.log.log('error', `${s.protocol}(${address})`, `Backend failure for a session from ${s.from}: ${rt.reason}:`, { rip: c.rip, session: s.session });
    s.refuse('unavailable', rt.reason);
    return;
  }
  s.accept();
  env.log.log('info', `${s.protocol}(${address})`, `Login: from=${s.from}, method=peer:`, { rip: c.rip, lip: c.lip, TLS: c.tls, session: s.session });
  if (!pair || !handedOff) {
    await runSession(env, s.protocol, address, s.session, conn, rt.session, Buffer.alloc(0));
    return;
  }
  // the backend's session (`pigeon who`/`kick`, its end and log line) as for any handed-off one;
  // the link and the pair's near end are relayed until both are done
  await runSession(env, s.protocol, address, s.session, conn, rt.session, Buffer.alloc(0));
  await relay(conn, nearSession(pair.near), Buffer.alloc(0));
}

/**
 * The relay's backend: the near end of the pair. The backend's bytes come out of it; it ends
 * when the backend (and the spawner, which holds the far end for its last words) closed the far end.
 */
function nearSession(near: Socket): BackendSession {
  const ended = new Promise<BackendEnd>((resolve) => {
    if (near.destroyed) resolve({ exit: null });
    else near.once('close', () => resolve({ exit: null }));
  });
  return {
    greeting: Buffer.alloc(0),
    handedOff: false,
    input: near,
    output: near,
    ended,
    clientEnded() {
      // the link closed: the backend sees EOF on its stdin and leaves; then the pair goes
      if (!near.writableEnded) near.end();
      setTimeout(() => near.destroy(), RELAY_GRACE_MS).unref();
    },
    stop() {
      near.destroy();
    },
  };
}
