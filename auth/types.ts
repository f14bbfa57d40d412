/**
 * NAME        auth/types — the contract of an auth source (a password source of `auth.chain`)
 * SYNOPSIS    pigeon.yaml:  auth: { chain: [database, passwd-file], passwd_file: /etc/dovecot/users }
 * DESCRIPTION An auth source is one file whose default export is an `AuthSource`, listed by name in
 *             auth/registry.ts (or, outside this tree, named in `auth.modules`). It knows only its
 *             own keys of the `auth:` section (`configKeys`; parsed once by `parseConfig`, which
 *             throws CONFIG_INVALID naming the key) and answers, asynchronously, whether a password
 *             is right for an address: `ok`, `bad` (it knows the user, the password is wrong),
 *             `unknown` (the next source of the chain decides) or `tempfail` (it cannot tell now:
 *             a file unreadable, a directory or service down — never "wrong password"). A source
 *             that verifies a stored hash does it with auth/verify.ts (at most 4 at once per
 *             process); one that binds to LDAP or calls an HTTP service fits the same way.
 *             The chain (auth/chain.ts) reads the user from the database once, asks the sources
 *             in order, pays a dummy verification when none knows the user, and provisions users
 *             that a `provisions` source authenticated.
 *             A SCRAM login brings no password but an exchange (src/modules.ts `Secret`), run
 *             against the stored hash by auth/verify.ts.
 * SECURITY    The password is the client's bytes, never decoded. A source never logs it, and puts
 *             no password or hash in a verdict's text.
 */
import type { Store, UserRecord } from '../src/store.js';
import type { PasswordSecret } from '../src/modules.js';

export type AuthVerdict =
  | { readonly kind: 'ok'; readonly warnings?: readonly string[] }
  | { readonly kind: 'bad' }
  | { readonly kind: 'unknown' }
  | { readonly kind: 'tempfail'; readonly detail: string };

export interface AuthSourceContext {
  /** the configuration database (a source may read it; the chain has already looked the user up) */
  readonly store: Store;
  /** the instance directory: relative paths in the source's keys are relative to it */
  readonly dir: string;
}

export interface AuthSourceInstance {
  /** may the chain add a user this source authenticated to the database (when its domain exists)? */
  readonly provisions: boolean;
  /**
   * `address` is normalised (lower-case domain, valid UTF-8); `password` is the client's bytes,
   * or an exchange (SCRAM) to run against the source's stored `{SCHEME}` hash
   * (auth/verify.ts `verifySecret` does both); `dbUser` is the database's record of the user,
   * null when it has none. A source that has no stored hash to offer an exchange answers
   * `unknown` for it.
   */
  authenticate(address: string, password: PasswordSecret, dbUser: UserRecord | null): Promise<AuthVerdict>;
}

export interface AuthSource<C = unknown> {
  readonly kind: 'auth';
  /** the name in `auth.chain` */
  readonly name: string;
  readonly summary: string;
  /** the keys of the `auth:` section this source owns (besides `chain` and `modules`) */
  readonly configKeys: readonly string[];
  /**
   * Its settings from the `auth:` section, defaults applied; `used`: it is in `auth.chain` (a key
   * it cannot work without may be missing only when it is not). Throws AppError CONFIG_INVALID
   * whose message starts with the key, e.g. `passwd_file: …`.
   */
  parseConfig(auth: Readonly<Record<string, unknown>>, used: boolean): C;
  create(config: C, ctx: AuthSourceContext): AuthSourceInstance;
}
