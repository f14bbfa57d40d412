/**
 * NAME        src/proxy/sasl/oauth — what OAUTHBEARER and XOAUTH2 share: message parsing, the login
 * DESCRIPTION The two mechanisms (src/proxy/sasl/oauthbearer.ts, xoauth2.ts) differ only in their
 *             message and error challenge. OAUTHBEARER: `gs2-header ^A host=… ^A port=… ^A
 *             auth=Bearer TOKEN ^A ^A`, the user in the gs2 authzid (`n,a=user,`) or, when absent,
 *             in the token. XOAUTH2: `user=USER ^A auth=Bearer TOKEN ^A ^A`. The token goes to the shared login as a bearer
 *             secret: auth/chain.ts checks it against `oauth:` (auth/oauth.ts) and that it names the
 *             user. A refusal, after the failure delay, is RFC 7628's error challenge (a JSON
 *             status), which the client answers (`^A` or an empty line), then NO.
 *             Offered only when `oauth.jwks_file` is set (src/proxy/sasl/names.ts).
 * SECURITY    A bearer token is a password for as long as it lives: plaintext mechanisms, offered
 *             only where login.plaintext allows; the token is never logged.
 */
import { decodeJwt } from 'jose';
import type { Ended, SaslStart, SaslStep } from './types.js';
import type { ProxyEnv } from '../env.js';

export type OAuthMessage = { readonly user: Buffer | null; readonly token: string | null };

const SEP = 0x01;

/** The `key=value` fields of a message between ^A separators; null when it does not end in ^A^A. */
function fields(b: Buffer): Map<string, Buffer> | null {
  if (b.length < 2 || b[b.length - 1] !== SEP || b[b.length - 2] !== SEP) return null;
  const out = new Map<string, Buffer>();
  let start = 0;
  const end = b.length - 2;
  while (start < end) {
    let e = b.indexOf(SEP, start);
    if (e < 0 || e > end) e = end;
    const f = b.subarray(start, e);
    const eq = f.indexOf(0x3d);
    if (eq <= 0) return null;
    const k = f.subarray(0, eq).toString('latin1');
    if (out.has(k)) return null;
    out.set(k, f.subarray(eq + 1));
    start = e + 1;
  }
  return out;
}

/** `Bearer TOKEN` (scheme case-insensitive) → the token, as text of JWT characters; else null. */
function bearerToken(auth: Buffer | undefined): string | null {
  const m = auth === undefined ? null : /^Bearer ([A-Za-z0-9._~+/-]+=*)$/i.exec(auth.toString('latin1'));
  return m?.[1] ?? null;
}

/** The user a token names (not yet verified: the chain checks the token and this name). */
function tokenUser(token: string, claim: string): Buffer | null {
  try {
    const v = decodeJwt(token)[claim];
    return typeof v === 'string' && v !== '' ? Buffer.from(v, 'utf8') : null;
  } catch {
    return null;
  }
}

/** RFC 5801 saslname (`=2C`, `=3D`). */
function saslName(b: Buffer): Buffer | null {
  const s = b.toString('latin1');
  if (/=(?!2C|3D)/.test(s)) return null;
  return Buffer.from(s.replace(/=2C/g, ',').replace(/=3D/g, '='), 'latin1');
}

/** The user and token of an OAUTHBEARER message; null for a malformed one. */
export function parseOauthbearer(msg: Buffer): OAuthMessage | null {
  const c1 = msg.indexOf(0x2c);
  const c2 = c1 < 0 ? -1 : msg.indexOf(0x2c, c1 + 1);
  if (c1 < 0 || c2 < 0 || msg[c2 + 1] !== SEP) return null;
  const flag = msg.subarray(0, c1).toString('latin1');
  if (flag !== 'n' && flag !== 'y') return null;
  const authz = msg.subarray(c1 + 1, c2);
  let user: Buffer | null = null;
  if (authz.length > 0) {
    if (authz[0] !== 0x61 || authz[1] !== 0x3d) return null;
    user = saslName(authz.subarray(2));
    if (user === null || user.length === 0) return null;
  }
  const f = fields(msg.subarray(c2 + 2));
  if (f === null) return null;
  return { user, token: bearerToken(f.get('auth')) };
}

export function parseXoauth2(msg: Buffer): OAuthMessage | null {
  const f = fields(msg);
  if (f === null) return null;
  const user = f.get('user');
  return { user: user !== undefined && user.length > 0 ? Buffer.from(user) : null, token: bearerToken(f.get('auth')) };
}

/** One OAuth login: the client's message, the bearer secret for the shared login, the error challenge on refusal. */
export async function startOAuth(
  name: 'OAUTHBEARER' | 'XOAUTH2',
  parse: (m: Buffer) => OAuthMessage | null,
  errorJson: string,
  env: ProxyEnv,
  initial: string | null,
  step: SaslStep,
): Promise<SaslStart> {
  const msg = await step(initial, Buffer.alloc(0));
  if (!Buffer.isBuffer(msg)) return { ended: msg };
  let ended: Ended | null = null;
  // after the failure delay: the error challenge; the client's answer (^A or empty) ends the exchange
  const failure = async (): Promise<Ended | null> => {
    const answer = await step(null, Buffer.from(errorJson, 'utf8'));
    if (!Buffer.isBuffer(answer)) ended = answer;
    return ended;
  };
  const p = parse(msg);
  if (p === null) return { creds: { kind: 'malformed', why: `${name}: malformed message`, user: null }, failure };
  if (p.token === null) return { creds: { kind: 'malformed', why: `${name}: no bearer token`, user: p.user }, failure };
  const user = p.user ?? tokenUser(p.token, env.instance.config.oauth.username_claim);
  if (user === null) return { creds: { kind: 'malformed', why: `${name}: no user in the message or the token`, user: null }, failure };
  return { creds: { kind: 'password', user, password: { kind: 'bearer', token: p.token } }, failure, ended: () => ended };
}
