/**
 * NAME        src/limits — every protocol limit, in one place (LIMITS.md)
 * DESCRIPTION A violation sends one final reply (`* BYE`, `-ERR`) and closes the connection.
 *             Values an admin may tune are also in pigeon.yaml `limits:` (line length, failure
 *             delay, pre-auth timeout); these are the defaults and the hard caps.
 */
export const IMAP_MAX_LINE = 8192; // pre-auth command incl. CRLFs and inline literals
export const IMAP_MAX_NONSYNC_LITERAL = 4096; // LITERAL- (RFC 7888)
export const IMAP_MAX_TAG = 126;
export const IMAP_MAX_NESTING = 1; // `(` depth before login
export const MAX_BAD_COMMANDS = 3;
export const MAX_AUTH_FAILURES = 3;
export const MAX_PREAUTH_COMMANDS = 50;
export const POP3_MAX_LINE = 255; // incl. CRLF (RFC 2449)
export const SASL_MAX_LINE = 8192; // one SASL response line incl. CRLF
export const ID_MAX_PAIRS = 30;
export const ID_MAX_FIELD = 30;
export const ID_MAX_VALUE = 1024;
export const PREAUTH_IDLE_MS = 60_000;
export const PREAUTH_ABSOLUTE_MS = 180_000;
export const BACKEND_START_MS = 30_000;
export const AUTH_FAILURE_DELAY_MS = 2_000;
export const AUTH_PENALTY_MAX_MS = 15_000;
export const AUTH_PENALTY_RESET_MS = 29_000;
export const PREAUTH_CONNS_PER_IP = 20;
export const MAX_CONNECTIONS = 1_000;
export const POSTAUTH_IDLE_IMAP_MS = 30 * 60_000;
export const POSTAUTH_IDLE_POP3_MS = 10 * 60_000;
