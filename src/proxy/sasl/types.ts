/**
 * NAME        src/proxy/sasl/types — the contract of a SASL mechanism of the IMAP/POP3 login
 * DESCRIPTION A mechanism is one file whose default export is a `SaslMechanism`, listed by name
 *             in src/proxy/sasl/registry.ts. The session (IMAP AUTHENTICATE, POP3 AUTH) gives it
 *             the initial response and a `step` that sends one challenge in the protocol's
 *             framing (`+ BASE64`) and returns the client's decoded answer, or the protocol's
 *             verdict when the answer ended the command (`*`, bad base64, a limit, EOF: already
 *             answered). `start` returns the credentials for the one shared login
 *             (src/proxy/login.ts `authenticate`: same penalty, failure delay and log lines as
 *             PLAIN), and optionally what to send after it: `success` (SCRAM's server signature,
 *             before the session goes to the backend) and `failure` (RFC 7628's error
 *             challenge, after the failure delay and before the NO).
 * SECURITY    Bytes stay bytes. A mechanism never logs a client message; a malformed one is a
 *             `malformed` credential, refused like a wrong password.
 */
import type { Credentials } from '../login.js';
import type { ProxyEnv } from '../env.js';
import type { MechanismName } from './names.js';

/**
 * The verdict of a round that ended the command instead of answering it: true when the session
 * is over (EOF, a limit), false when the command was answered and the session reads on (`*`).
 */
export type Ended = boolean;

/**
 * One round: with `initial` (the initial response, base64 text) no challenge is sent; else
 * `challenge` (raw bytes, base64-encoded by the session) goes to the client and its answer is
 * read. Returns the decoded answer, or the verdict when the round ended the command.
 */
export type SaslStep = (initial: string | null, challenge: Buffer) => Promise<Buffer | Ended>;

/** After the shared login: null to go on (route, or answer NO), or the verdict when the client ended the command. */
export type SaslTail = () => Promise<Ended | null>;

export type SaslStart =
  | { readonly ended: Ended }
  | { readonly creds: Credentials; readonly success?: SaslTail; readonly failure?: SaslTail; readonly ended?: () => Ended | null };

export interface SaslMechanism {
  readonly name: MechanismName;
  /** it sends the password or a bearer token itself: offered only where login.plaintext allows */
  readonly plaintext: boolean;
  start(env: ProxyEnv, initial: string | null, step: SaslStep): Promise<SaslStart>;
}
