/**
 * NAME        src/proxy/sasl/registry — SASL mechanisms by name, and the ones a session offers
 * DESCRIPTION Each mechanism is one file (src/proxy/sasl/*.ts) listed here. `mechanismsFor`
 *             gives what a session may use now: the node's list (src/proxy/sasl/names.ts, from
 *             pigeon.yaml `sasl.mechanisms` and `oauth`), without the plaintext ones (PLAIN,
 *             LOGIN, OAUTHBEARER, XOAUTH2) where login.plaintext forbids them on this connection.
 *             A mechanism that is not offered is refused as unsupported.
 * SEE ALSO    src/proxy/imap-session.ts, src/proxy/pop3-session.ts
 */
import type { ProxyEnv } from '../env.js';
import type { ClientConn } from '../conn.js';
import type { Ended, SaslMechanism, SaslStep, SaslTail } from './types.js';
import { offeredMechanisms, type MechanismName } from './names.js';
import { plaintextAllowed, type Credentials, type SaslTails } from '../login.js';
import plain from './plain.js';
import login from './login.js';
import scramSha256 from './scram-sha-256.js';
import oauthbearer from './oauthbearer.js';
import xoauth2 from './xoauth2.js';

const MECHANISMS: ReadonlyMap<MechanismName, SaslMechanism> = new Map([plain, login, scramSha256, oauthbearer, xoauth2].map((m) => [m.name, m]));

/** The node's mechanisms, in its order: `usable` false for a plaintext one that this connection may not use now. */
export function mechanismsFor(env: ProxyEnv, conn: ClientConn): { readonly mechanism: SaslMechanism; readonly usable: boolean }[] {
  const clear = plaintextAllowed(env, conn);
  const out: { mechanism: SaslMechanism; usable: boolean }[] = [];
  for (const name of offeredMechanisms(env.instance.config)) {
    const m = MECHANISMS.get(name);
    if (m) out.push({ mechanism: m, usable: clear || !m.plaintext });
  }
  return out;
}

/** The mechanism of this name if the node offers it (usable or not on this connection), else null. */
export function offeredMechanism(env: ProxyEnv, conn: ClientConn, name: string): { readonly mechanism: SaslMechanism; readonly usable: boolean } | null {
  return mechanismsFor(env, conn).find((m) => m.mechanism.name === name) ?? null;
}

/** A mechanism's credentials for the shared login, the tails it runs there, and how the client ended it (if it did). */
export interface SaslLogin {
  readonly creds: Credentials;
  readonly tails: SaslTails;
  /** the verdict when the client ended the command inside the login (cancel, EOF), else null */
  over(): Ended | null;
}

/** Run a mechanism's first rounds; `{ ended }` when the client ended the command before any login. */
export async function startMechanism(m: SaslMechanism, env: ProxyEnv, initial: string | null, step: SaslStep): Promise<SaslLogin | { readonly ended: Ended }> {
  const x = await m.start(env, initial, step);
  if (!('creds' in x)) return { ended: x.ended };
  let over: Ended | null = null;
  const tail = (f: SaslTail | undefined): (() => Promise<boolean>) | undefined =>
    f &&
    (async () => {
      const e = await f();
      if (e === null) return true;
      over = e;
      return false;
    });
  const success = tail(x.success);
  const failure = tail(x.failure);
  return {
    creds: x.creds,
    tails: { ...(success ? { success } : {}), ...(failure ? { failure } : {}) },
    over: () => over ?? x.ended?.() ?? null,
  };
}
