/**
 * NAME        auth/oauth — bearer tokens (JWT) for OAUTHBEARER and XOAUTH2, checked against a JWKS file
 * SYNOPSIS    pigeon.yaml:  oauth: { jwks_file: jwks.json, issuer: https://id.example.test,
 *                                   audience: mail, username_claim: email, clock_skew_s: 60 }
 * DESCRIPTION `createBearerVerifier` checks a token's signature with the node-local JWKS file
 *             (re-read when it changes) through `jose`, then `exp` (required), `nbf`, and, when
 *             configured, `iss` and `aud`, allowing `clock_skew_s` of clock difference. The user is
 *             the `username_claim` claim (a mail address). Only asymmetric algorithms are
 *             accepted (RS*, PS*, ES*, EdDSA): a JWKS holds public keys.
 * DIAGNOSTICS `tempfail` when the JWKS file cannot be read or parsed (never "wrong token"); `bad`
 *             with a short reason (expired, wrong audience, bad signature…) for the log.
 * SECURITY    The token is never logged, nor any part of it.
 */
import { readFile, stat } from 'node:fs/promises';
import { isAbsolute, join } from 'node:path';
import { createLocalJWKSet, jwtVerify, errors, type JSONWebKeySet } from 'jose';

export interface OAuthConfig {
  readonly jwks_file: string | null;
  readonly issuer: string | null;
  readonly audience: string | null;
  readonly username_claim: string;
  readonly clock_skew_s: number;
}

export type BearerVerdict =
  | { readonly kind: 'ok'; readonly user: string }
  | { readonly kind: 'bad'; readonly why: string }
  | { readonly kind: 'tempfail'; readonly detail: string };

export interface BearerVerifier {
  verify(token: string): Promise<BearerVerdict>;
}

const ALGORITHMS = ['RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512', 'ES256', 'ES384', 'ES512', 'EdDSA', 'Ed25519'];

function jwksPath(config: OAuthConfig, dir: string): string | null {
  if (config.jwks_file === null) return null;
  return isAbsolute(config.jwks_file) ? config.jwks_file : join(dir, config.jwks_file);
}

/**
 * `pigeon config test`: the JWKS file is readable JSON with at least one usable public key.
 * Returns the line to print and, when the file cannot work, the problem (logins with a token
 * would get NO [UNAVAILABLE]); a private key in the file is a warning.
 */
export async function checkJwksFile(config: OAuthConfig, dir: string): Promise<{ line: string; problem?: string; warning?: string }> {
  const file = jwksPath(config, dir);
  if (file === null) return { line: 'oauth: not configured (OAUTHBEARER and XOAUTH2 not offered)' };
  let set: JSONWebKeySet;
  try {
    set = JSON.parse(await readFile(file, 'utf8')) as JSONWebKeySet;
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    return { line: `oauth.jwks_file: ${file}`, problem: `oauth.jwks_file ${file}: ${code ?? 'not JSON'}; OAUTHBEARER/XOAUTH2 logins would get NO [UNAVAILABLE]` };
  }
  const keys = Array.isArray(set?.keys) ? set.keys : null;
  if (keys === null || keys.length === 0) return { line: `oauth.jwks_file: ${file}`, problem: `oauth.jwks_file ${file}: no "keys" array with a key in it` };
  try {
    createLocalJWKSet(set);
  } catch (e) {
    return { line: `oauth.jwks_file: ${file}`, problem: `oauth.jwks_file ${file}: not a JWKS (${e instanceof Error ? e.message : 'invalid'})` };
  }
  const secret = keys.some((k) => typeof k === 'object' && k !== null && ('d' in k || k.kty === 'oct'));
  return {
    line: `oauth.jwks_file: ${file}: ${keys.length} key(s); issuer ${config.issuer ?? '(any)'}, audience ${config.audience ?? '(any)'}, user from claim ${config.username_claim}`,
    ...(secret ? { warning: `oauth.jwks_file ${file} holds private or symmetric key material: it needs only the identity provider's public keys` } : {}),
  };
}

/** A verifier for this node's `oauth:` section, or null when no JWKS file is configured. */
export function createBearerVerifier(config: OAuthConfig, dir: string): BearerVerifier | null {
  const file = jwksPath(config, dir);
  if (file === null) return null;
  let cache: { mtimeMs: number; size: number; keys: ReturnType<typeof createLocalJWKSet> } | null = null;
  const keys = async (): Promise<ReturnType<typeof createLocalJWKSet>> => {
    const st = await stat(file);
    if (cache && cache.mtimeMs === st.mtimeMs && cache.size === st.size) return cache.keys;
    const set = JSON.parse(await readFile(file, 'utf8')) as JSONWebKeySet;
    cache = { mtimeMs: st.mtimeMs, size: st.size, keys: createLocalJWKSet(set) };
    return cache.keys;
  };
  return {
    async verify(token) {
      let k;
      try {
        k = await keys();
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        return { kind: 'tempfail', detail: `oauth.jwks_file ${file}: ${code ?? (e instanceof SyntaxError ? 'not JSON' : 'not a JWKS')}` };
      }
      try {
        const { payload } = await jwtVerify(token, k, {
          algorithms: ALGORITHMS,
          requiredClaims: ['exp'],
          clockTolerance: config.clock_skew_s,
          ...(config.issuer !== null ? { issuer: config.issuer } : {}),
          ...(config.audience !== null ? { audience: config.audience } : {}),
        });
        const user = payload[config.username_claim];
        if (typeof user !== 'string' || user === '') return { kind: 'bad', why: `token has no ${config.username_claim} claim` };
        return { kind: 'ok', user };
      } catch (e) {
        if (e instanceof errors.JWTExpired) return { kind: 'bad', why: 'token expired' };
        if (e instanceof errors.JWTClaimValidationFailed) return { kind: 'bad', why: `token claim ${e.claim} invalid` };
        if (e instanceof errors.JOSEError) return { kind: 'bad', why: `token refused (${e.code})` };
        return { kind: 'bad', why: 'token refused' };
      }
    },
  };
}
