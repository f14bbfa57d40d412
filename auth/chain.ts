/**
 * NAME        auth/chain — one login's authentication: the user read once, then `auth.chain`
 * DESCRIPTION `createAuth` builds the sources of `auth.chain` (auth/registry.ts) and returns the
 *             AuthInstance the proxy, `pigeon auth test` and the tests use. Per request: the user
 *             and every setting row that applies are read in one statement (Store.lookup), waiting
 *             for a locked database at most until the request's deadline; then each source in
 *             order until one knows the user (`ok`, `bad` or `tempfail` decide; `unknown` passes
 *             on). When none knows the user a dummy verification is paid, so an unknown user
 *             costs what a wrong password costs. A user that a provisioning source (passwd-file)
 *             authenticated and the database lacks is added to it when its domain exists.
 *             A login in a domain on `upstream.login passthrough` skips the sources: the
 *             upstream server decides (auth/passthrough.ts).
 *             A SCRAM login's exchange is run by the deciding source against its stored hash
 *             (an unknown user's on a fake record). A bearer token (OAUTHBEARER, XOAUTH2) asks no
 *             source: auth/oauth.ts checks it against `oauth:`, it must name the user, and the
 *             user must be in the database.
 * DIAGNOSTICS tempfail for a database that stays locked or unreachable, a source that is
 *             unavailable or throws: never "success", never "wrong password" for a server fault.
 * SECURITY    No password or hash in any result, log field or error text; the password stays the
 *             client's bytes.
 */
import type { AuthInstance, AuthRequest, AuthResult } from '../src/modules.js';
import { isBearer } from '../src/modules.js';
import type { Store, UserRecord } from '../src/store.js';
import { createBearerVerifier, type BearerVerifier, type OAuthConfig } from './oauth.js';
import type { AuthSourceInstance } from './types.js';
import { resolve } from '../src/resolve.js';
import { normaliseAddress } from '../src/address.js';
import { AppError, isAppError } from '../src/errors.js';
import { BUSY_TIMEOUT_MS } from '../src/store.js';
import { spendDummy } from './verify.js';
import { authSource } from './registry.js';
import { passthrough } from './passthrough.js';

export interface NamedSource {
  readonly name: string;
  readonly source: AuthSourceInstance;
}

function dbFailure(e: unknown): AuthResult {
  return { ok: false, why: 'tempfail', detail: isAppError(e) ? e.message : 'database error' };
}

/** A user the database holds may log in (active, login and the service enabled)? */
function admitted(found: { user: UserRecord; rows: Parameters<typeof resolve>[0] }, service: AuthRequest['service'], warnings: string[]): AuthResult {
  const config = resolve(found.rows);
  if (found.user.state !== 'active' || config['login.enabled']?.value === false) return { ok: false, why: 'disabled' };
  if (service !== 'test' && config[`${service}.enabled`]?.value === false) return { ok: false, why: 'disabled' };
  return { ok: true, user: { user: found.user, config }, warnings };
}

/**
 * A bearer token (OAUTHBEARER, XOAUTH2): valid for the address it names (auth/oauth.ts), and
 * the user must be in the database; no password source is asked.
 */
async function bearerLogin(store: Store, bearer: BearerVerifier | null, req: AuthRequest, token: string): Promise<AuthResult> {
  if (bearer === null) return { ok: false, why: 'bad-credentials' };
  const v = await bearer.verify(token);
  if (v.kind === 'tempfail') return { ok: false, why: 'tempfail', detail: v.detail };
  if (v.kind === 'bad') return { ok: false, why: 'bad-credentials' };
  let address: string;
  try {
    address = normaliseAddress(req.user).address;
    if (normaliseAddress(v.user).address !== address) return { ok: false, why: 'bad-credentials' };
  } catch {
    return { ok: false, why: 'bad-credentials' };
  }
  let found;
  try {
    found = await store.withDeadline(req.deadline ?? Date.now() + BUSY_TIMEOUT_MS).lookup(address);
  } catch (e) {
    return dbFailure(e);
  }
  if (!found) return { ok: false, why: 'unknown-user' };
  return admitted(found, req.service, []);
}

/** The chain over ready source instances (the registry's, or a test's); `bearer` checks OAuth tokens (none: refused). */
export function authChain(store: Store, chain: readonly NamedSource[], bearer: BearerVerifier | null = null): AuthInstance {
  return {
    async authenticate(req: AuthRequest): Promise<AuthResult> {
      const secret = req.password;
      if (isBearer(secret)) return bearerLogin(store, bearer, req, secret.token);
      let address: string;
      let domain: string;
      try {
        ({ address, domain } = normaliseAddress(req.user));
      } catch {
        await spendDummy(secret);
        return { ok: false, why: 'unknown-user' };
      }
      const db = store.withDeadline(req.deadline ?? Date.now() + BUSY_TIMEOUT_MS);
      let found;
      try {
        found = await db.lookup(address);
      } catch (e) {
        return dbFailure(e);
      }
      // a domain whose upstream server decides: no local password check (auth/passthrough.ts)
      if (req.service !== 'test') {
        const pt = await passthrough(db, address, domain, req.service, found);
        // the upstream server checks a password it is given: a SCRAM exchange carries none to give
        if (pt !== null) return secret instanceof Uint8Array ? pt : { ok: false, why: 'bad-credentials' };
      }
      let decided: NamedSource | null = null;
      const warnings: string[] = [];
      for (const s of chain) {
        let v;
        try {
          v = await s.source.authenticate(address, secret, found?.user ?? null);
        } catch (e) {
          // a source that throws has failed, not refused: never a wrong password, never success
          return { ok: false, why: 'tempfail', detail: `auth source ${s.name} failed: ${e instanceof Error ? (e.message.split('\n')[0] ?? '') : 'error'}` };
        }
        if (v.kind === 'unknown') continue;
        if (v.kind === 'tempfail') return { ok: false, why: 'tempfail', detail: v.detail };
        if (v.kind === 'bad') return { ok: false, why: 'bad-credentials' };
        warnings.push(...(v.warnings ?? []));
        decided = s;
        break;
      }
      if (decided === null) {
        await spendDummy(secret);
        return { ok: false, why: 'unknown-user' };
      }
      if (!found) {
        if (!decided.source.provisions) return { ok: false, why: 'unknown-user' };
        // authenticated by a provisioning source (passwd-file): add the user when its domain exists
        try {
          await db.addUser(address, null, null);
          warnings.push(`user ${address} added to the database from ${decided.name}`);
        } catch (e) {
          if (isAppError(e) && e.code === 'NO_SUCH_DOMAIN') return { ok: false, why: 'unknown-user' };
          if (!isAppError(e) || e.code !== 'DUPLICATE') return dbFailure(e);
        }
        try {
          found = await db.lookup(address);
        } catch (e) {
          return dbFailure(e);
        }
        if (!found) return { ok: false, why: 'tempfail', detail: `user ${address} vanished` };
      }
      return admitted(found, req.service, warnings);
    },
  };
}

/** The chain of pigeon.yaml's `auth:` section (its sources created once, per process), with its `oauth:` section for bearer tokens. */
export async function createAuth(auth: Readonly<Record<string, unknown>>, store: Store, dir: string, oauth: OAuthConfig | null = null): Promise<AuthInstance> {
  const names = Array.isArray(auth['chain']) ? (auth['chain'] as string[]) : ['database'];
  const chain: NamedSource[] = [];
  for (const name of names) {
    const src = await authSource(name, auth, dir);
    let config: unknown;
    try {
      config = src.parseConfig(auth, true);
    } catch (e) {
      // the source names the key (`passwd_file: …`); a module from outside may throw a plain Error
      throw new AppError('CONFIG_INVALID', `auth.${e instanceof Error ? e.message : String(e)}`);
    }
    try {
      chain.push({ name, source: src.create(config, { store, dir }) });
    } catch (e) {
      throw new AppError('CONFIG_INVALID', `auth source ${name} cannot start: ${e instanceof Error ? e.message : String(e)}`);
    }
  }
  return authChain(store, chain, oauth === null ? null : createBearerVerifier(oauth, dir));
}
