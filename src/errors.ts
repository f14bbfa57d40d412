/**
 * NAME        src/errors — the one error type (AppError), its codes, and what each code means
 *             to every protocol pigeon speaks
 * DESCRIPTION Expected failures are AppErrors with a stable code. The code gives the sysexits(3)
 *             value the CLI exits with (`exit`), the IMAP and POP3 response codes a client is
 *             answered with (`replyCode`), and the mail status (RFC 3463 enhanced code, whence
 *             the SMTP/LMTP reply: src/delivery/outcome.ts) an MTA is given (`mailStatusOf`). A
 *             failure that is a mail outcome already (a delivery step refusing a message) carries
 *             it: `mailError(status)`. Anything else is a bug (exit 70, `4.3.0`,
 *             `[UNAVAILABLE]`). Messages never carry a password, hash or private key.
 */
export const EX = {
  OK: 0,
  USAGE: 64,
  DATAERR: 65,
  NOINPUT: 66,
  NOUSER: 67,
  NOHOST: 68,
  UNAVAILABLE: 69,
  SOFTWARE: 70,
  CANTCREAT: 73,
  IOERR: 74,
  TEMPFAIL: 75,
  NOPERM: 77,
  CONFIG: 78,
} as const;
export type ExitCode = (typeof EX)[keyof typeof EX];

export const ERROR_CODES = {
  USAGE: EX.USAGE,
  INVALID_ADDRESS: EX.DATAERR,
  INVALID_DOMAIN: EX.DATAERR,
  INVALID_VALUE: EX.DATAERR,
  UNKNOWN_KEY: EX.USAGE,
  NO_SUCH_DOMAIN: EX.NOUSER,
  NO_SUCH_USER: EX.NOUSER,
  DUPLICATE: EX.CANTCREAT,
  DOMAIN_NOT_EMPTY: EX.DATAERR,
  CONFIG_INVALID: EX.CONFIG,
  CONFIG_MISSING: EX.CONFIG,
  INSTANCE_EXISTS: EX.CANTCREAT,
  DB_LOCKED: EX.TEMPFAIL,
  DB_UNAVAILABLE: EX.TEMPFAIL,
  DB_READONLY: EX.CONFIG,
  DB_MISSING: EX.CONFIG,
  DB_SCHEMA: EX.CONFIG,
  PASSWORD_SCHEME: EX.DATAERR,
  PASSWORD_COST: EX.DATAERR,
  AUTH_FAILED: EX.NOPERM,
  IO: EX.IOERR,
  TEMPFAIL: EX.TEMPFAIL,
  CERT_INVALID: EX.CONFIG,
  NODE_REMOVED: EX.CONFIG,
  NODE_CONFLICT: EX.CONFIG,
  NO_SUCH_NODE: EX.NOHOST,
  NODE_BUSY: EX.DATAERR,
  PEER_UNAVAILABLE: EX.TEMPFAIL,
  PEER_REFUSED: EX.TEMPFAIL,
  /** a peer link closed before its line was complete (PEER_UNUSED: before a single byte, a spare link dropped) */
  PEER_CLOSED: EX.TEMPFAIL,
  PEER_UNUSED: EX.TEMPFAIL,
  BACKEND_START: EX.TEMPFAIL,
  BACKEND_TIMEOUT: EX.TEMPFAIL,
  BACKEND_PROTOCOL: EX.TEMPFAIL,
  MAIL_REFUSED: EX.DATAERR,
} as const satisfies Record<string, ExitCode>;
export type ErrorCode = keyof typeof ERROR_CODES;

/** A mail outcome: an enhanced status code (RFC 3463) and a short text (what an MTA is told). */
export interface MailStatus {
  readonly dsn: string;
  readonly text: string;
}

export class AppError extends Error {
  readonly code: ErrorCode;
  readonly exit: ExitCode;
  /** the mail outcome this failure is (a delivery step's refusal), or null: derived from the code */
  readonly status: MailStatus | null;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown; status?: MailStatus }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'AppError';
    this.code = code;
    this.exit = ERROR_CODES[code];
    this.status = options?.status ?? null;
  }
  get temporary(): boolean {
    return this.exit === EX.TEMPFAIL;
  }
}

export function isAppError(e: unknown): e is AppError {
  return e instanceof AppError;
}

/** A mail outcome that is not a delivery, as the error a delivery step throws (4.x.x: TEMPFAIL). */
export function mailError(status: MailStatus): AppError {
  return new AppError(status.dsn.startsWith('4') ? 'TEMPFAIL' : 'MAIL_REFUSED', status.text, { status });
}

/** The enhanced status code a failure of this exit class gives an MTA (sysexits → RFC 3463). */
const DSN_OF_EXIT: Partial<Record<ExitCode, string>> = {
  [EX.NOUSER]: '5.1.1',
  [EX.DATAERR]: '5.6.0',
  [EX.NOPERM]: '5.7.1',
  [EX.CONFIG]: '4.3.5',
  [EX.TEMPFAIL]: '4.3.0',
};

/**
 * What an MTA is told about a failure: the status it carries, or the one of its code (an error
 * that is not an AppError is a bug: 4.3.0, the MTA retries, and `what` says where it happened).
 */
export function mailStatusOf(e: unknown, what: string): MailStatus {
  if (!isAppError(e)) return { dsn: '4.3.0', text: `${what}: internal error` };
  if (e.status !== null) return e.status;
  return { dsn: DSN_OF_EXIT[e.exit] ?? '4.3.0', text: `${what}: ${e.message}` };
}

/**
 * The response code a client is answered with (RFC 5530 for IMAP, RFC 3206 for POP3): a refused
 * identity is the client's; anything else is the server's, and temporary (the client retries).
 */
export function replyCode(e: unknown, protocol: 'imap' | 'pop3'): string {
  const exit = isAppError(e) ? e.exit : EX.SOFTWARE;
  if (exit === EX.NOPERM || exit === EX.NOUSER) return protocol === 'imap' ? 'AUTHENTICATIONFAILED' : 'AUTH';
  return protocol === 'imap' ? 'UNAVAILABLE' : 'SYS/TEMP';
}

/** Is `s` one of the codes above (an AppError sent between processes as its code)? */
export function isErrorCode(s: string): s is ErrorCode {
  return Object.prototype.hasOwnProperty.call(ERROR_CODES, s);
}
