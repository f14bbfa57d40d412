/**
 * NAME        src/proxy/sessions — one client connection's IMAP or POP3 session, by protocol
 * DESCRIPTION What every forker runs on a connection it produced (`pigeon serve`'s listeners,
 *             `pigeon imap|pop3 --forker …`): the protocol's session class, run to its end.
 *             Loaded only by the proxy commands (the sessions pull in auth and the backends).
 */
import type { ProxyEnv } from './env.js';
import type { ClientConn } from './conn.js';
import type { MailProtocol } from '../../backends/types.js';
import { ImapSession } from './imap-session.js';
import { Pop3Session } from './pop3-session.js';

/**
 * `admitted` (IMAP only): the connection's admission to the node-wide limits is still being
 * decided; the session greets at once and reads no command before it is (false: refused, the
 * caller has said so on the connection). Without it the connection was admitted before.
 */
export function runSession(env: ProxyEnv, protocol: MailProtocol, conn: ClientConn, admitted?: Promise<boolean>): Promise<void> {
  return (protocol === 'imap' ? new ImapSession(env, conn, admitted) : new Pop3Session(env, conn)).run();
}
