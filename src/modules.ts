/**
 * NAME        src/modules — the typed contracts every module implements
 * DESCRIPTION One module per file, registered by name in src/registry.ts. A module knows only its
 *             own configuration (`settings` = its slice of the user's effective config).
 *             `AuthInstance` is what a login asks (auth/chain.ts builds it from the auth sources
 *             of auth/registry.ts, whose contract is auth/types.ts).
 */
import type { Json } from './settings.js';
import type { UserRecord } from './store.js';
import type { Effective } from './resolve.js';

/** A user after authentication: identity plus the resolved configuration, read once. */
export interface ResolvedUser {
  readonly user: UserRecord;
  readonly config: Effective;
}

/**
 * One authentication. `user` is text the session has checked (valid UTF-8, no CR/LF/NUL);
 * `password` is the bytes the client sent, never decoded: they go to the hash as they are.
 */
export interface AuthRequest {
  readonly user: string;
  readonly password: Uint8Array;
  readonly service: 'imap' | 'pop3' | 'test';
  readonly rip?: string;
  /** epoch ms: a locked database is waited for until then, then tempfail (default: one busy timeout from now) */
  readonly deadline?: number;
}

export type AuthResult =
  | { ok: true; user: ResolvedUser; warnings: string[] }
  | { ok: false; why: 'bad-credentials' | 'unknown-user' | 'disabled' }
  | { ok: false; why: 'tempfail'; detail: string };

export interface AuthInstance {
  authenticate(req: AuthRequest): Promise<AuthResult>;
}

/** A module's slice of the effective config: `{ key: value }` for `module.key`. */
export function slice(cfg: Effective, module: string): Record<string, Json> {
  const out: Record<string, Json> = {};
  const prefix = `${module}.`;
  for (const [k, v] of Object.entries(cfg)) if (k.startsWith(prefix)) out[k.slice(prefix.length)] = v.value;
  return out;
}
