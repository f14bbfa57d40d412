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
 * `admitted`: the connection's admission to the node-wide limits is still being decided (false:
 * refused, the caller has said so on the connection). IMAP greets at once and reads no command
 * before the answer; POP3, which cannot take its +OK greeting back, starts only once admitted.
 * Without it the connection was admitted before.
 */
export async function runSession(env: ProxyEnv, protocol: MailProtocol, conn: ClientConn, admitted?: Promise<boolean>): Promise<void> {
  if (protocol === 'imap') return new ImapSession(env, conn, admitted).run();
  if (admitted && !(await admitted)) return;
  return new Pop3Session(env, conn).run();
}
