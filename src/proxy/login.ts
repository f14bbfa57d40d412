/**
 * NAME        src/proxy/login — the part of a login IMAP and POP3 share
 * DESCRIPTION Plaintext policy (login.plaintext, global scope), one authentication through the
 *             auth module (one database read), failure delay with the per-IP penalty, the log
 *             lines admins and fail2ban read, then the router.
 * SECURITY    No backend is started unless authentication succeeded. A throw inside
 *             authentication answers tempfail, never success.
 */
import type { ProxyEnv } from './env.js';
import type { ClientConn } from './conn.js';
import type { ResolvedUser } from '../modules.js';
import { resolve } from '../resolve.js';

export type Proto = 'imap' | 'pop3';

let policyCache: { at: number; value: string } | null = null;

/** login.plaintext (global scope only), cached for 5 s so a pre-auth session costs no DB read. */
export function plaintextPolicy(env: ProxyEnv): string {
  const now = Date.now();
  if (policyCache && now - policyCache.at < 5000) return policyCache.value;
  let value = 'loopback';
  try {
    const v = resolve(env.store.rowsFor({ scope: 'global', name: null }))['login.plaintext']?.value;
    if (typeof v === 'string') value = v;
  } catch {
    value = policyCache?.value ?? 'loopback';
  }
  policyCache = { at: now, value };
  return value;
}

export function plaintextAllowed(env: ProxyEnv, conn: ClientConn): boolean {
  if (conn.secure) return true;
  const p = plaintextPolicy(env);
  return p === 'always' || (p === 'loopback' && conn.local);
}

export interface LoginState {
  readonly proto: Proto;
  readonly sid: string;
  readonly started: number;
  attempts: number;
  lastUser: string | null;
  lastMethod: string | null;
  /** how the last login attempt ended: a disconnect after `backend` or `tempfail` is no auth failure (fail2ban) */
  lastOutcome?: 'failed' | 'tempfail' | 'backend' | 'ok';
  /** logins that authenticated (whatever happened next) */
  successes?: number;
}

export function logFields(conn: ClientConn, st: LoginState, extra: Record<string, string | number | boolean | null> = {}): Record<string, string | number | boolean | null> {
  return {
    user: st.lastUser ?? '',
    method: st.lastMethod,
    rip: conn.peer.rip,
    lip: conn.peer.lip,
    TLS: conn.secure,
    ...extra,
    session: st.sid,
  };
}

export type LoginOutcome =
  | { kind: 'ok'; user: ResolvedUser }
  | { kind: 'failed' } // bad credentials, unknown or disabled user: same answer
  | { kind: 'tempfail'; detail: string };

export async function checkLogin(env: ProxyEnv, conn: ClientConn, st: LoginState, user: string, password: string, method: string): Promise<LoginOutcome> {
  st.attempts++;
  st.lastUser = user.replace(/[\x00-\x1f]/g, '?').slice(0, 256);
  st.lastMethod = method;
  const wait = await env.penalty.pending(conn.peer.rip);
  if (wait > 0) await new Promise((r) => setTimeout(r, wait));
  let r;
  try {
    r = await env.auth.authenticate({ user, password, service: st.proto, rip: conn.peer.rip });
  } catch (e) {
    r = { ok: false as const, why: 'tempfail' as const, detail: e instanceof Error ? e.message : 'auth error' };
  }
  if (r.ok) {
    st.lastOutcome = 'ok';
    st.successes = (st.successes ?? 0) + 1;
    await env.penalty.success(conn.peer.rip);
    for (const w of r.warnings) env.log.log('warn', `${st.proto}-login`, w);
    return { kind: 'ok', user: r.user };
  }
  if (r.why === 'tempfail') {
    st.lastOutcome = 'tempfail';
    env.log.log('error', `${st.proto}-login`, `Temporary authentication failure: ${r.detail}:`, logFields(conn, st));
    return { kind: 'tempfail', detail: r.detail };
  }
  st.lastOutcome = 'failed';
  const delay = await env.penalty.fail(conn.peer.rip);
  env.log.log('info', `${st.proto}-login`, `auth failed (${r.why}):`, logFields(conn, st));
  if (delay > 0) await new Promise((res) => setTimeout(res, delay));
  return { kind: 'failed' };
}

export function logLogin(env: ProxyEnv, conn: ClientConn, st: LoginState, address: string): void {
  st.lastUser = address;
  env.log.log('info', `${st.proto}-login`, 'Login:', logFields(conn, st));
}

export function logDisconnect(env: ProxyEnv, conn: ClientConn, st: LoginState, why: string): void {
  const secs = Math.round((Date.now() - st.started) / 1000);
  let reason = st.attempts === 0 ? `no auth attempts in ${secs} secs` : why === 'auth failed' ? `auth failed, ${st.attempts} attempts in ${secs} secs` : `${why}`;
  // Dovecot's wording when the password was right but the session could not start: not an auth failure
  if (why === 'auth failed' && (st.lastOutcome === 'backend' || st.lastOutcome === 'tempfail' || st.lastOutcome === 'ok')) {
    reason = st.lastOutcome === 'tempfail' ? `auth unavailable, ${st.attempts} attempts in ${secs} secs` : `internal failure, ${st.successes ?? 0} successful auths in ${secs} secs`;
  }
  env.log.log('info', `${st.proto}-login`, `Disconnected (${reason}):`, logFields(conn, st));
}

