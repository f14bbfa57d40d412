/**
 * NAME        src/errors — the one error catalog, and sysexits codes
 * DESCRIPTION Expected failures that end a command are AppErrors with a stable code and the
 *             sysexits(3) value the CLI exits with. Anything else is a bug (exit 70).
 *             Messages never carry a password, hash or private key.
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
  BACKEND_START: EX.TEMPFAIL,
  BACKEND_TIMEOUT: EX.TEMPFAIL,
  BACKEND_PROTOCOL: EX.TEMPFAIL,
} as const satisfies Record<string, ExitCode>;
export type ErrorCode = keyof typeof ERROR_CODES;

export class AppError extends Error {
  readonly code: ErrorCode;
  readonly exit: ExitCode;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'AppError';
    this.code = code;
    this.exit = ERROR_CODES[code];
  }
  get temporary(): boolean {
    return this.exit === EX.TEMPFAIL;
  }
}

export function isAppError(e: unknown): e is AppError {
  return e instanceof AppError;
}

/** Is `s` one of the codes above (an AppError sent between processes as its code)? */
export function isErrorCode(s: string): s is ErrorCode {
  return Object.prototype.hasOwnProperty.call(ERROR_CODES, s);
}
