/**
 * NAME        src/store/pg-errors — PostgreSQL and connection failures as AppErrors
 * DESCRIPTION Outages (server down or unreachable, connect or statement timeout, shutdown,
 *             failover, a read-only standby, too many connections) become DB_UNAVAILABLE (75:
 *             retry later); lock and serialization conflicts DB_LOCKED (75); what only an admin
 *             can fix becomes a 78: authentication or TLS refused (CONFIG_INVALID), no such
 *             database (DB_MISSING), schema missing or too old (DB_SCHEMA), no privilege
 *             (DB_READONLY). Anything else is returned unchanged (a bug: exit 70).
 * SECURITY    A message names the database by its printable `where` (no password) and says
 *             why in words of its own or the server's message text (which never holds a
 *             password); the cause kept is a plain Error with that text only, so no query
 *             parameter (a password hash) rides along on an AppError.
 */
import { AppError, type ErrorCode } from '../errors.js';

/** network-level error codes of node:net / dns that mean "not reachable now" */
const NET_DOWN: Readonly<Record<string, string>> = {
  ECONNREFUSED: 'connection refused',
  ECONNRESET: 'connection reset',
  EPIPE: 'connection broken',
  ETIMEDOUT: 'connection timed out',
  EHOSTUNREACH: 'host unreachable',
  ENETUNREACH: 'network unreachable',
  EHOSTDOWN: 'host down',
  EADDRNOTAVAIL: 'address not available',
  ENOTFOUND: 'host name not found',
  EAI_AGAIN: 'host name lookup failed (temporary)',
  ENOENT: 'no server socket (server not running?)',
  ECONNABORTED: 'connection aborted',
};

/** postgres.js's own codes */
const CLIENT_DOWN: Readonly<Record<string, string>> = {
  CONNECT_TIMEOUT: 'connect timeout',
  CONNECTION_CLOSED: 'connection closed by the server',
  CONNECTION_DESTROYED: 'connection lost',
  CONNECTION_ENDED: 'store closed',
  QUERY_TIMEOUT: 'no answer within the query timeout',
  QUEUE_TIMEOUT: 'no free connection within the query timeout',
  CANCEL_UNANSWERED: 'server stopped answering',
};

const CLIENT_CONFIG: Readonly<Record<string, string>> = {
  SSL_NOT_SUPPORTED: 'the server does not offer TLS, but sslmode asks for it',
  TLS_HANDSHAKE_FAILED: 'TLS handshake failed',
  AUTH_TYPE_NOT_IMPLEMENTED: 'the server asks for an authentication method this client does not have',
  AUTH_METHOD_REFUSED: 'the server asks for an authentication method the URL does not allow',
  CHANNEL_BINDING_REQUIRED: 'channel binding required but not possible',
  SASL_SIGNATURE_MISMATCH: 'the server failed SCRAM authentication (wrong server?)',
  SASL_NONCE_MISMATCH: 'the server failed SCRAM authentication (wrong server?)',
  SASL_MECHANISM_NOT_SUPPORTED: 'no SCRAM mechanism in common with the server',
};

function field(e: object, k: string): string {
  const v = (e as Record<string, unknown>)[k];
  return typeof v === 'string' ? v : '';
}

function isTlsVerify(code: string): boolean {
  return /CERT|SELF_SIGNED|UNABLE_TO_|ERR_TLS|ERR_SSL|HOSTNAME|ALTNAME/.test(code);
}

function make(code: ErrorCode, message: string, causeText: string): AppError {
  return new AppError(code, message, { cause: new Error(causeText) });
}

/** Is this error an outage (the operation may succeed later, unchanged)? */
export function isOutage(e: unknown): boolean {
  return e instanceof AppError && (e.code === 'DB_UNAVAILABLE' || e.code === 'DB_LOCKED');
}

/** Translate whatever the client threw into the AppError an admin can act on. */
export function mapPgError(e: unknown, where: string): unknown {
  if (e instanceof AppError) return e;
  if (typeof e !== 'object' || e === null) return e;
  const code = field(e, 'code');
  const msg = field(e, 'message').replace(/\s+/g, ' ').slice(0, 300);
  const unavailable = (why: string): AppError => make('DB_UNAVAILABLE', `database ${where} unavailable: ${why}`, `${code}: ${msg}`);
  if (field(e, 'severity') !== '' && /^[0-9A-Z]{5}$/.test(code)) {
    // an answer from the server
    const cls = code.slice(0, 2);
    if (code === '57014') return unavailable(`statement canceled (statement timeout): ${msg}`);
    if (code === '55P03' || code === '40001' || code === '40P01') {
      return make('DB_LOCKED', `database ${where}: ${msg}; try again`, `${code}: ${msg}`);
    }
    if (cls === '08' || cls === '53' || cls === '58' || code.startsWith('57P') || code === '25P03') return unavailable(msg);
    if (code === '25006') return unavailable(`the server is read-only (a standby: fail-over in progress, or use target_session_attrs=read-write): ${msg}`);
    if (cls === '28') return make('CONFIG_INVALID', `database ${where}: ${msg} (check the user and the password: the URL, database_password_file, or ~/.pgpass / PGPASSFILE)`, `${code}: ${msg}`);
    if (code === '3D000') return make('DB_MISSING', `database ${where}: ${msg} (create it, then "pigeon db migrate")`, `${code}: ${msg}`);
    if (code === '42P01' || code === '42883' || code === '42703') {
      return make('DB_SCHEMA', `database ${where}: ${msg}: the schema is missing or too old ("pigeon db status", "pigeon db migrate")`, `${code}: ${msg}`);
    }
    if (code === '42501') return make('DB_READONLY', `database ${where}: ${msg} (grant the pigeon role its privileges)`, `${code}: ${msg}`);
    return e;
  }
  const net = NET_DOWN[code];
  if (net !== undefined) return unavailable(net);
  const down = CLIENT_DOWN[code];
  if (down !== undefined) return unavailable(down);
  const conf = CLIENT_CONFIG[code];
  if (conf !== undefined) return make('CONFIG_INVALID', `database ${where}: ${conf}`, `${code}: ${msg}`);
  if (isTlsVerify(code)) return make('CONFIG_INVALID', `database ${where}: the server's certificate is not accepted (${code}): check sslmode and sslrootcert`, `${code}: ${msg}`);
  return e;
}
