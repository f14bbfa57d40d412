/**
 * NAME        auth/verify — stored-hash verification for auth sources, at most 4 at once
 * DESCRIPTION `verifyStored` checks a password against a `{SCHEME}hash` (auth/schemes.ts);
 *             `verifySecret` does the same for a password or runs a SCRAM exchange against it;
 *             `spendDummy` costs what verifying a new password costs (an unknown user must take
 *             as long as a wrong password). At most MAX_CONCURRENT_VERIFIES run at once per
 *             process, whichever source asks: a flood of logins cannot take every core.
 *             The native hash code (argon2/bcrypt) loads on first use only (auth/schemes.ts), so
 *             processes that never check a password (deliver, LMTP) do not pay for it.
 * SECURITY    No password or hash in any error text (auth/schemes.ts guarantees it).
 */
import { passwordChecks } from '../src/metrics.js';
import { verifyPassword, parseHash, dummyVerify } from './schemes.js';
import { isExchange, type PasswordSecret } from '../src/modules.js';

const MAX_CONCURRENT_VERIFIES = 4;
let running = 0;
const waiting: (() => void)[] = [];

async function limited<T>(fn: () => Promise<T>): Promise<T> {
  // a finishing call hands its slot straight to the first waiter, so a call arriving in between
  // cannot take it too (that let a fifth verification run)
  if (running >= MAX_CONCURRENT_VERIFIES) await new Promise<void>((r) => waiting.push(r));
  else running++;
  try {
    return await fn();
  } finally {
    const next = waiting.shift();
    if (next) next();
    else running--;
  }
}

/** Is `password` right for the stored `{SCHEME}hash`? Throws AppError for an unusable hash. */
export async function verifyStored(stored: string, password: Uint8Array): Promise<boolean> {
  parseHash(stored); // an unusable hash is refused before any work, and outside the limit
  passwordChecks.inc();
  return limited(() => verifyPassword(stored, password));
}

/**
 * Is the secret right for the stored `{SCHEME}hash`? A password is verified as verifyStored
 * does; an exchange (SCRAM) is run against the hash — outside the limit, since it waits for the
 * client and costs the server only a few HMACs. Throws AppError for an unusable hash.
 */
export async function verifySecret(stored: string, secret: PasswordSecret): Promise<boolean> {
  if (!isExchange(secret)) return verifyStored(stored, secret);
  parseHash(stored);
  passwordChecks.inc();
  return secret.prove(stored);
}

/**
 * Spend one verification's time for nothing (unknown users); always false. An exchange is run
 * to its end on a fake record, so an unknown user looks like a wrong password.
 */
export async function spendDummy(password: PasswordSecret): Promise<false> {
  if (isExchange(password)) {
    await password.prove(null);
    return false;
  }
  return limited(() => dummyVerify(password));
}

/** Is the stored hash a readable `{PLAIN}` password (worth a warning)? */
export function isPlain(stored: string): boolean {
  try {
    return parseHash(stored).scheme === 'PLAIN';
  } catch {
    return false;
  }
}
