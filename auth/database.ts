/**
 * NAME        auth/database — auth source: passwords stored in the configuration database
 * SYNOPSIS    pigeon.yaml:  auth: { chain: [database] }   (the default)
 * DESCRIPTION Verifies the user's stored `{SCHEME}hash` (Dovecot's format, auth/schemes.ts). The
 *             chain has already read the user (one read per login), so this source reads nothing.
 *             A user without a stored password is unknown here: the next source decides.
 * DIAGNOSTICS tempfail for an unusable stored hash (unknown scheme, absurd cost): never "success",
 *             never "wrong password" for a server-side problem.
 * SECURITY    No password or hash in any verdict or warning text.
 */
import type { AuthSource } from './types.js';
import { isAppError } from '../src/errors.js';
import { verifySecret, isPlain } from './verify.js';

const database: AuthSource<null> = {
  kind: 'auth',
  name: 'database',
  summary: 'passwords stored in the configuration database ({SCHEME} hashes as Dovecot writes them)',
  configKeys: [],
  parseConfig: () => null,
  create: () => ({
    provisions: false,
    async authenticate(address, password, dbUser) {
      const stored = dbUser?.password ?? null;
      if (stored === null) return { kind: 'unknown' };
      let ok: boolean;
      try {
        ok = await verifySecret(stored, password);
      } catch (e) {
        return { kind: 'tempfail', detail: isAppError(e) ? `stored password of ${address}: ${e.message}` : 'password verification failed' };
      }
      if (!ok) return { kind: 'bad' };
      return isPlain(stored) ? { kind: 'ok', warnings: [`user ${address} has a {PLAIN} password; set a new one`] } : { kind: 'ok' };
    },
  }),
};

export default database;
