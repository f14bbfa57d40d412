/**
 * NAME        auth/passthrough — the domains whose logins the upstream server decides
 * DESCRIPTION `imap.backend` (or `pop3.backend`) = upstream with `upstream.login` = passthrough,
 *             the latter from the global or domain scope: the users of that domain need not
 *             exist here, and no local password is checked — the upstream server's answer to
 *             the same credentials decides (backends/upstream.ts; a refusal there is answered as
 *             a wrong password, with the failure delay). The decision uses the user's rows when
 *             the user exists (a user set back to `imap.backend dovecot` after a migration is
 *             checked locally again), else the global and domain rows. A user row alone never
 *             makes a login passthrough. A disabled user, `login.enabled` or `<proto>.enabled`
 *             false is refused as always.
 * SECURITY    Only the router's external backend ever gets these credentials; the chain caller
 *             must not start any other backend for a passthrough result (the config names
 *             upstream for the protocol).
 */
import type { AuthResult } from '../src/modules.js';
import type { Store, UserRecord } from '../src/store.js';
import type { SettingRow } from '../src/resolve.js';
import { resolve } from '../src/resolve.js';
import { isAppError } from '../src/errors.js';

type Found = { readonly user: UserRecord; readonly rows: SettingRow[] } | null;

/** A user this node does not know, in a passthrough domain (no mailbox, no home here). */
function outsider(address: string, domain: string): UserRecord {
  return { id: 0, address, domain, domainId: 0, password: null, state: 'active', home: null, allocation: null, version: 0, created: '', movingTo: null };
}

/**
 * The chain's answer for a passthrough login of `address` (normalised) over `service`, or null
 * when the login is not passthrough (the local password check decides).
 */
export async function passthrough(db: Store, address: string, domain: string, service: 'imap' | 'pop3', found: Found): Promise<AuthResult | null> {
  let rows: readonly SettingRow[];
  if (found) rows = found.rows;
  else {
    try {
      rows = await db.rowsFor({ scope: 'domain', name: domain });
    } catch (e) {
      if (isAppError(e) && (e.code === 'NO_SUCH_DOMAIN' || e.code === 'INVALID_DOMAIN')) return null;
      return { ok: false, why: 'tempfail', detail: isAppError(e) ? e.message : 'database error' };
    }
  }
  const config = resolve(rows);
  const login = config['upstream.login'];
  if (config[`${service}.backend`]?.value !== 'upstream' || login?.value !== 'passthrough' || login.from === 'user') return null;
  if (found && found.user.state !== 'active') return { ok: false, why: 'disabled' };
  if (config['login.enabled']?.value === false || config[`${service}.enabled`]?.value === false) return { ok: false, why: 'disabled' };
  return { ok: true, user: { user: found?.user ?? outsider(address, domain), config }, warnings: [], passthrough: true };
}
