/**
 * NAME        src/proxy/received — run an IMAP/POP3 session another node handed over
 * DESCRIPTION The peer listener (src/peer/listener.ts) checked the link and the hand-off; here
 *             the session is started like a local login's, from what was received — no second
 *             authentication, no user lookup: the local backend the user's configuration names,
 *             never forwarded again (the route's `forward: false`). The sending node is told
 *             `ok` once the backend runs, or why not; then the relay carries the session over the
 *             link. No user+IP slot is taken: the node the client connected to counted it.
 *             Under `pigeon serve` the router starts the backend as it does a local TLS login's:
 *             by the spawner, on one end of a local socket pair, relayed from the other end
 *             (src/proxy/router.ts); Dovecot answers the login tag itself while the `ok` crosses
 *             the link.
 * DIAGNOSTICS `imap(user): Backend failure for a session from NODE: …`, `imap(user): Login:
 *             from=NODE, method=peer: …`.
 */
import type { ProxyEnv } from './env.js';
import type { ReceivedSession } from '../peer/listener.js';
import { ClientConn } from './conn.js';
import { route, runSession } from './router.js';

export async function receiveSession(env: ProxyEnv, s: ReceivedSession): Promise<void> {
  const c = s.client;
  const conn = new ClientConn({ stream: s.sock, peer: { rip: c.rip, rport: c.rport, lip: c.lip, lport: c.lport }, secure: true, local: false, canTls: false });
  const address = s.user.user.address;
  const rt = await route(env, s.protocol, s.user, conn, s.session, s.tag, () => Buffer.alloc(0), { forward: false });
  if (!rt.ok) {
    env.log.log('error', `${s.protocol}(${address})`, `Backend failure for a session from ${s.from}: ${rt.reason}:`, { rip: c.rip, session: s.session });
    s.refuse('unavailable', rt.reason);
    return;
  }
  s.accept();
  env.log.log('info', `${s.protocol}(${address})`, `Login: from=${s.from}, method=peer:`, { rip: c.rip, lip: c.lip, TLS: c.tls, session: s.session });
  await runSession(env, s.protocol, address, s.session, conn, rt.session, Buffer.alloc(0));
}
