/**
 * NAME        src/proxy/login — the part of a login IMAP and POP3 share
 * DESCRIPTION Plaintext policy (login.plaintext, global scope), one authentication through the
 *             auth module (one database read), failure delay with the per-IP penalty, the log
 *             lines admins and fail2ban read, then the router. Every use of the penalty table is
 *             here, awaited (the table may live in another process).
 *             User names arrive as bytes and must be valid UTF-8; passwords stay bytes.
 *             Upstream (backends/upstream.ts): the password bytes go with the route to the
 *             external backend only; in a passthrough domain the upstream server's refusal is
 *             the refusal (same answer, delay and penalty as a wrong password).
 * SECURITY    No backend is started unless authentication succeeded. A throw inside
 *             authentication answers tempfail, never success.
 */
import type { ProxyEnv } from './env.js';
import type { ClientConn } from './conn.js';
import type { AuthResult, ResolvedUser, Secret } from '../modules.js';
import { isExchange } from '../modules.js';
import { resolve } from '../resolve.js';
import { BUSY_TIMEOUT_MS } from '../store.js';
import { route, runSession } from './router.js';
import { PREAUTH_ABSOLUTE_MS } from '../limits.js';
import { logins } from '../metrics.js';
import type { PenaltyBefore } from './penalty.js';
import { dropLoginAhead, loginAhead } from './slots.js';

export type Proto = 'imap' | 'pop3';

let policyCache: { at: number; value: string } | null = null;
let refreshing = false;
const POLICY_TTL_MS = 5000;

async function readPolicy(env: ProxyEnv): Promise<void> {
  const now = Date.now();
  try {
    // never waits for a lock (one try: the deadline is now): a locked database keeps the value we have
    const rows = await env.store.withDeadline(now).rowsFor({ scope: 'global', name: null });
    const v = resolve(rows)['login.plaintext']?.value;
    policyCache = { at: now, value: typeof v === 'string' ? v : 'loopback' };
  } catch {
    policyCache = { at: now, value: policyCache?.value ?? 'loopback' };
  }
}

/** Read login.plaintext once before the first session (createProxyEnv). */
export async function primePlaintextPolicy(env: ProxyEnv): Promise<void> {
  if (policyCache === null) await readPolicy(env);
}

/**
 * login.plaintext (global scope only). A greeting or a LOGIN never waits on the database: the
 * value was read when the process started (without waiting for a lock), is kept for 5 s and then
 * refreshed in the background after it was used; while the database is locked the last value
 * (or the default, loopback) stays in force.
 */
export function plaintextPolicy(env: ProxyEnv): string {
  if (policyCache !== null && Date.now() - policyCache.at >= POLICY_TTL_MS && !refreshing) {
    refreshing = true;
    void readPolicy(env).finally(() => {
      refreshing = false;
    });
  }
  return policyCache?.value ?? 'loopback';
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
  /**
   * `deadline`: what is left of the login's one busy timeout, for the mailbox allocation (route);
   * `passthrough`: no local password was checked, the upstream server decides (loginAndRelay)
   */
  | { kind: 'ok'; user: ResolvedUser; deadline: number; passthrough: boolean; penalty: PenaltyBefore }
  | { kind: 'failed' } // bad credentials, unknown or disabled user, malformed message: same answer
  | { kind: 'tempfail'; detail: string };

/**
 * What a client offered. `malformed`: a SASL message that names no usable identity (PLAIN
 * without two NULs, an authorization identity other than the authentication identity); it is
 * refused like a wrong password, never at once. The password is bytes, or a SCRAM exchange that
 * the deciding auth source runs against its stored hash (src/proxy/sasl/).
 */
export type Credentials =
  | { readonly kind: 'password'; readonly user: Uint8Array; readonly password: Secret }
  | { readonly kind: 'malformed'; readonly why: string; readonly user: Uint8Array | null };

const BASE64 = /^[A-Za-z0-9+/]*={0,2}$/;

/** A SASL response or initial response (RFC 4648 base64, `=` for empty); null when it is not base64. */
export function saslBase64(s: string): Buffer | null {
  if (s === '=') return Buffer.alloc(0);
  return s.length % 4 === 0 && BASE64.test(s) ? Buffer.from(s, 'base64') : null;
}

/** Split a SASL PLAIN message (authzid NUL authcid NUL passwd), bytes kept as they are. */
export function plainCredentials(msg: Buffer): Credentials {
  const a = msg.indexOf(0);
  const b = a < 0 ? -1 : msg.indexOf(0, a + 1);
  if (a < 0 || b < 0 || msg.indexOf(0, b + 1) >= 0) return { kind: 'malformed', why: 'malformed PLAIN message', user: null };
  const authz = msg.subarray(0, a);
  const user = msg.subarray(a + 1, b);
  if (authz.length > 0 && !authz.equals(user)) return { kind: 'malformed', why: 'authorization identity differs', user };
  return { kind: 'password', user, password: msg.subarray(b + 1) };
}

const STRICT_UTF8 = new TextDecoder('utf-8', { fatal: true });
const MAX_USER_BYTES = 256;

/**
 * A user name as text: valid UTF-8, 1..256 bytes, no control characters and no `<` or `>` (no
 * address has them; in a log line they would end the `user=<…>` field early and let the rest of
 * the name pose as fields a log filter such as fail2ban reads); else null.
 */
export function userName(bytes: Uint8Array): string | null {
  if (bytes.length === 0 || bytes.length > MAX_USER_BYTES) return null;
  let s: string;
  try {
    s = STRICT_UTF8.decode(bytes);
  } catch {
    return null;
  }
  return /[\x00-\x1f\x7f<>]/.test(s) ? null : s;
}

/**
 * The user name as it may appear in a log line (never used to authenticate): control characters,
 * undecodable bytes and the `<` `>` that frame the field become '?'.
 */
function shownUser(bytes: Uint8Array | null): string {
  if (bytes === null) return '';
  return Buffer.from(bytes.buffer, bytes.byteOffset, Math.min(bytes.byteLength, MAX_USER_BYTES))
    .toString('utf8')
    .replace(/[\x00-\x1f\x7f\ufffd<>]/g, '?');
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/**
 * Every authentication of both protocols, and every refusal, goes through here: one attempt
 * counted, the per-IP pending penalty waited, then either success, tempfail (an outage, no
 * delay), or refusal — and every refusal (malformed message, bad user name, unknown user, wrong
 * password, disabled user) pays the same failure delay and the same penalty.
 * A plain password is checked while the penalty lookup (a round trip to the node state service)
 * is in flight, so the lookup is off the login's path, and when it is right the user+IP slot is
 * asked for at once (slots.ts loginAhead), also while the lookup is in flight; its wait is spent before any answer, so
 * what a client sees and when is unchanged. An exchange (SCRAM) talks to the client: it starts
 * only after the wait.
 */
export async function authenticate(env: ProxyEnv, conn: ClientConn, st: LoginState, creds: Credentials, method: string): Promise<LoginOutcome> {
  st.attempts++;
  st.lastUser = shownUser(creds.user);
  st.lastMethod = method;
  const lookup = env.penalty.pending(conn.peer.rip);
  // awaited below; not an unhandled rejection while the password is checked
  lookup.catch(() => undefined);
  const user = creds.kind === 'password' ? userName(creds.user) : null;
  const early = user !== null && creds.kind === 'password' && !isExchange(creds.password) ? check(env, conn, st, user, creds.password) : null;
  if (early) {
    // right password: the user+IP slot is asked for now, its round trip beside the lookup's
    const e = await early;
    if (e.r.ok && e.r.passthrough !== true && e.r.user.user.movingTo === null) loginAhead(conn, e.r.user.user.address, st.sid);
  }
  const penalty = await lookup;
  if (penalty.waitMs > 0) await sleep(penalty.waitMs);
  if (creds.kind === 'malformed') return refuse(env, conn, st, creds.why);
  if (user === null) return refuse(env, conn, st, 'invalid user name');
  const { r, deadline: checkDeadline } = early ? await early : await check(env, conn, st, user, creds.password);
  // the mailbox allocation that may follow shares the check's busy timeout, unless the client was
  // waited for in between (the penalty, an exchange): then it gets its own
  const deadline = penalty.waitMs > 0 || isExchange(creds.password) ? Date.now() + BUSY_TIMEOUT_MS : checkDeadline;
  if (r.ok && r.passthrough === true) return { kind: 'ok', user: r.user, deadline, passthrough: true, penalty };
  if (r.ok || r.why === 'tempfail') logins.inc({ protocol: st.proto, result: r.ok ? 'ok' : 'tempfail' });
  if (r.ok) {
    st.lastOutcome = 'ok';
    st.successes = (st.successes ?? 0) + 1;
    await env.penalty.success(conn.peer.rip, penalty);
    for (const w of r.warnings) env.log.log('warn', `${st.proto}-login`, w);
    return { kind: 'ok', user: r.user, deadline, passthrough: false, penalty };
  }
  if (r.why === 'tempfail') {
    st.lastOutcome = 'tempfail';
    env.log.log('error', `${st.proto}-login`, `Temporary authentication failure: ${r.detail}:`, logFields(conn, st));
    return { kind: 'tempfail', detail: r.detail };
  }
  return refuse(env, conn, st, r.why);
}

/**
 * One check of the credentials by the auth module; never rejects (a throw is tempfail). The whole
 * login (this check, and the mailbox allocation that may follow in the router) waits at most one
 * busy timeout for a locked database: `deadline`.
 */
async function check(env: ProxyEnv, conn: ClientConn, st: LoginState, user: string, password: Secret): Promise<{ r: AuthResult; deadline: number }> {
  const deadline = Date.now() + BUSY_TIMEOUT_MS;
  try {
    return { r: await env.auth.authenticate({ user, password, service: st.proto, rip: conn.peer.rip, deadline }), deadline };
  } catch (e) {
    return { r: { ok: false, why: 'tempfail', detail: e instanceof Error ? e.message : 'auth error' }, deadline };
  }
}

async function refuse(env: ProxyEnv, conn: ClientConn, st: LoginState, why: string): Promise<LoginOutcome> {
  st.lastOutcome = 'failed';
  logins.inc({ protocol: st.proto, result: 'failed' });
  const delay = await env.penalty.fail(conn.peer.rip);
  env.log.log('info', `${st.proto}-login`, `auth failed (${why}):`, logFields(conn, st));
  if (delay > 0) await sleep(delay);
  return { kind: 'failed' };
}

/**
 * The client's bytes before login, under the two pre-auth timers both protocols keep: an idle one
 * (limits.preauth_timeout_s) while waiting for more, and an absolute one (PREAUTH_ABSOLUTE_MS).
 * When either trips the client gets `bye` and the connection is cut.
 */
export class PreauthReader {
  private idle: NodeJS.Timeout | null = null;
  private readonly absolute: NodeJS.Timeout;
  private readonly env: ProxyEnv;
  private readonly conn: ClientConn;
  private readonly bye: string;
  /** a timer tripped (the disconnect is logged as inactivity) */
  timedOut = false;

  constructor(env: ProxyEnv, conn: ClientConn, bye: string) {
    this.env = env;
    this.conn = conn;
    this.bye = bye;
    this.absolute = setTimeout(() => this.timeout(), PREAUTH_ABSOLUTE_MS);
  }

  private timeout(): void {
    this.timedOut = true;
    this.conn.write(this.bye);
    this.conn.abort();
  }

  /** The client's next bytes; null at EOF or when a timer tripped. */
  async read(): Promise<Buffer | null> {
    if (this.idle) clearTimeout(this.idle);
    this.idle = setTimeout(() => this.timeout(), this.env.instance.config.limits.preauth_timeout_s * 1000);
    const c = await this.conn.read();
    clearTimeout(this.idle);
    this.idle = null;
    return c === null || this.timedOut ? null : c;
  }

  /** The session logged in or ended: no timer runs any more. */
  stop(): void {
    clearTimeout(this.absolute);
    if (this.idle) clearTimeout(this.idle);
  }

  /**
   * Run a session's pre-auth `loop` to its end: then the timers stop, and a connection that did
   * not go to a backend (`relayed()` false) is closed — the relay owns the others.
   */
  async run(loop: () => Promise<void>, relayed: () => boolean): Promise<void> {
    try {
      await loop();
    } finally {
      this.stop();
      if (!relayed()) this.conn.end();
    }
  }

  /** The client went away (or a timer tripped): log why, close. */
  gone(st: LoginState): void {
    logDisconnect(this.env, this.conn, st, st.attempts > 0 ? 'auth failed' : this.timedOut ? 'inactivity' : 'no auth attempts');
    this.conn.end();
  }
}

/**
 * The credentials of a SASL PLAIN or LOGIN exchange (RFC 4616; the LOGIN draft's two prompts,
 * `Username:` and `Password:`). `step(initial, prompt)` runs one round in the protocol's framing:
 * the initial response when there is one, else the prompt and the client's answer; it returns
 * the decoded bytes, or the protocol's own verdict when the round ended the command.
 */
export async function saslCredentials<V>(
  mech: 'PLAIN' | 'LOGIN',
  initial: string | null,
  step: (initial: string | null, prompt: string) => Promise<Buffer | V>,
): Promise<{ readonly creds: Credentials } | { readonly ended: V }> {
  if (mech === 'PLAIN') {
    const msg = await step(initial, '');
    return Buffer.isBuffer(msg) ? { creds: plainCredentials(msg) } : { ended: msg };
  }
  const user = await step(initial, 'VXNlcm5hbWU6');
  if (!Buffer.isBuffer(user)) return { ended: user };
  const password = await step(null, 'UGFzc3dvcmQ6');
  if (!Buffer.isBuffer(password)) return { ended: password };
  return { creds: { kind: 'password', user, password } };
}

/**
 * The last rounds of a SASL mechanism (src/proxy/sasl/types.ts): `success` after the login
 * succeeded, before the backend (SCRAM's server signature), `failure` after the failure delay,
 * before the NO (RFC 7628's error challenge). Each resolves false when the client ended the
 * command instead (the session has answered it).
 */
export interface SaslTails {
  readonly success?: () => Promise<boolean>;
  readonly failure?: () => Promise<boolean>;
}

/** How a protocol words the answers of the login tail (the decisions are shared, below). */
export interface LoginReplies {
  readonly tempfail: string;
  readonly failed: string;
  /** the user+IP limit refused the session (already logged by the router) */
  limit(reason: string): string;
  /** the backend could not start */
  readonly unavailable: string;
}

/**
 * The login tail IMAP and POP3 share: authenticate (one database read), then route the user to a
 * backend — on this node or the home node — and, once it runs, log the login and relay until the
 * session ends. `relaying` is called just before the relay takes the connection (the session
 * stops its pre-auth timers). Returns `failed` (a refusal: the caller counts it against
 * MAX_AUTH_FAILURES), `answered` (a temporary failure or a limit, answered: the session goes
 * on) or `relayed` (the session is over).
 */
export async function loginAndRelay(
  env: ProxyEnv,
  conn: ClientConn,
  st: LoginState,
  creds: Credentials,
  method: string,
  o: { readonly tag: string | null; readonly leftover: () => Buffer; readonly replies: LoginReplies; readonly relaying: () => void; readonly sasl?: SaslTails },
): Promise<'failed' | 'answered' | 'relayed'> {
  const r = await authenticate(env, conn, st, creds, method);
  if (r.kind === 'tempfail') {
    conn.write(o.replies.tempfail);
    return 'answered';
  }
  if (r.kind === 'failed') {
    if (!o.sasl?.failure || (await o.sasl.failure())) conn.write(o.replies.failed);
    return 'failed';
  }
  if (o.sasl?.success && !(await o.sasl.success())) {
    dropLoginAhead(conn);
    return 'answered';
  }
  const address = r.user.user.address;
  // the password bytes go to the router, which gives them to an external backend (upstream) only
  // (SCRAM and bearer tokens send no password: an upstream that needs one answers UNAVAILABLE)
  const credentials = creds.kind === 'password' && creds.password instanceof Uint8Array ? { credentials: { user: creds.user, password: creds.password } } : {};
  const rt = await route(env, st.proto, r.user, conn, st.sid, o.tag, o.leftover, { forward: true, deadline: r.deadline, ...credentials });
  if (!rt.ok && rt.refused === true) {
    // the upstream server refused them: the same answer, delay and penalty as a wrong password
    await refuse(env, conn, st, rt.reason);
    conn.write(o.replies.failed);
    return 'failed';
  }
  if (!rt.ok && rt.limit !== undefined) {
    conn.write(o.replies.limit(rt.reason));
    return 'answered';
  }
  if (!rt.ok) {
    st.lastOutcome = 'backend';
    env.log.log('error', `${st.proto}(${address})`, `Backend failure: ${rt.reason}:`, { rip: conn.peer.rip, session: st.sid });
    conn.write(o.replies.unavailable);
    return 'answered';
  }
  if (r.passthrough) {
    st.lastOutcome = 'ok';
    st.successes = (st.successes ?? 0) + 1;
    await env.penalty.success(conn.peer.rip, r.penalty);
  }
  logLogin(env, conn, st, address);
  o.relaying();
  await runSession(env, st.proto, address, st.sid, conn, rt.session, o.leftover());
  return 'relayed';
}

/**
 * A login refused before any credentials were looked at: plaintext is not allowed on this
 * connection (login.plaintext). Dovecot's line, which fail2ban's filters count; said the same
 * way for IMAP LOGIN and AUTHENTICATE and for POP3 USER and AUTH.
 */
export function logPlaintextRefused(env: ProxyEnv, conn: ClientConn, st: LoginState): void {
  env.log.log('info', `${st.proto}-login`, 'Aborted login (tried to use disallowed plaintext auth):', { rip: conn.peer.rip, lip: conn.peer.lip, session: st.sid });
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

