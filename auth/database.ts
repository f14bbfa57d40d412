/**
 * NAME        auth/database — password authentication against the configuration database
 * DESCRIPTION One read (user + settings), then the stored hash is verified. Unknown users cost the
 *             same as wrong passwords (a dummy verify of the default scheme). At most
 *             MAX_CONCURRENT_VERIFIES hash computations run at once per process. A locked
 *             database is waited for until the request's deadline (one busy timeout), between
 *             tries, never by blocking the process.
 * DIAGNOSTICS tempfail for a locked/missing database or an unusable stored hash: never "success",
 *             never "wrong password" for a server-side problem.
 * SECURITY    No password or hash in any result, log field or error text.
 */
import type { AuthModule, AuthInstance, AuthRequest, AuthResult } from '../src/modules.js';
import type { Store } from '../src/store.js';
import { resolve } from '../src/resolve.js';
import { normaliseAddress } from '../src/address.js';
import { isAppError } from '../src/errors.js';
import { verifyPassword, dummyVerify, parseHash } from './schemes.js';
import { count } from '../src/metrics.js';
import { BUSY_TIMEOUT_MS } from '../src/db.js';

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

/** Where a password hash comes from. The first source of the chain that knows the user decides. */
export interface PasswordSource {
  readonly name: string;
  /** may add a user it authenticated to the database when the domain exists there */
  readonly provisions: boolean;
  /** the stored `{SCHEME}hash` of an address, null when unknown here; throws when unavailable */
  hashOf(address: string, dbHash: string | null): string | null;
}

export const databaseSource: PasswordSource = { name: 'database', provisions: false, hashOf: (_a, dbHash) => dbHash };

export function databaseAuth(store: Store, chain: readonly PasswordSource[] = [databaseSource]): AuthInstance {
  return {
    async authenticate(req: AuthRequest): Promise<AuthResult> {
      let address: string;
      try {
        address = normaliseAddress(req.user).address;
      } catch {
        await limited(() => dummyVerify(req.password));
        return { ok: false, why: 'unknown-user' };
      }
      const deadline = req.deadline ?? Date.now() + BUSY_TIMEOUT_MS;
      let found;
      try {
        found = await store.within(() => store.lookup(address), deadline);
      } catch (e) {
        return { ok: false, why: 'tempfail', detail: isAppError(e) ? e.message : 'database error' };
      }
      let stored: string | null = null;
      let source: PasswordSource | null = null;
      try {
        for (const src of chain) {
          stored = src.hashOf(address, found?.user.password ?? null);
          if (stored !== null) {
            source = src;
            break;
          }
        }
      } catch (e) {
        return { ok: false, why: 'tempfail', detail: `password source unavailable: ${e instanceof Error ? e.message.split('\n')[0] : 'error'}` };
      }
      if (stored === null || source === null || (!found && !source.provisions)) {
        await limited(() => dummyVerify(req.password));
        return { ok: false, why: 'unknown-user' };
      }
      let ok: boolean;
      const warnings: string[] = [];
      try {
        if (parseHash(stored).scheme === 'PLAIN') warnings.push(`user ${address} has a {PLAIN} password; set a new one`);
        const hash = stored;
        count('pigeon_password_checks_total');
        ok = await limited(() => verifyPassword(hash, req.password));
      } catch (e) {
        return { ok: false, why: 'tempfail', detail: isAppError(e) ? `stored password of ${address}: ${e.message}` : 'password verification failed' };
      }
      if (!ok) return { ok: false, why: 'bad-credentials' };
      if (!found) {
        // authenticated by a provisioning source (passwd-file): add the user when its domain exists
        try {
          if (!(await store.writableWithin(deadline))) return { ok: false, why: 'tempfail', detail: `database ${store.file} is locked by another process; try again` };
          store.addUser(address, null, null);
          warnings.push(`user ${address} added to the database from ${source.name}`);
          found = await store.within(() => store.lookup(address), deadline);
        } catch (e) {
          if (!isAppError(e) || e.code !== 'DUPLICATE') {
            if (isAppError(e) && e.code === 'NO_SUCH_DOMAIN') return { ok: false, why: 'unknown-user' };
            return { ok: false, why: 'tempfail', detail: isAppError(e) ? e.message : 'database error' };
          }
          try {
            found = await store.within(() => store.lookup(address), deadline);
          } catch (e2) {
            return { ok: false, why: 'tempfail', detail: isAppError(e2) ? e2.message : 'database error' };
          }
        }
        if (!found) return { ok: false, why: 'tempfail', detail: `user ${address} vanished` };
      }
      const config = resolve(found.rows);
      if (found.user.state !== 'active' || config['login.enabled']?.value === false) return { ok: false, why: 'disabled' };
      if (req.service !== 'test' && config[`${req.service}.enabled`]?.value === false) return { ok: false, why: 'disabled' };
      return { ok: true, user: { user: found.user, config }, warnings };
    },
  };
}

export default {
  kind: 'auth',
  name: 'database',
  summary: 'passwords stored in the configuration database ({SCHEME} hashes as Dovecot writes them)',
  create: (ctx) => databaseAuth(ctx.store),
} satisfies AuthModule;
