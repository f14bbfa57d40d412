/**
 * NAME        src/proxy/sasl/names — the SASL mechanisms a node may offer, and which it offers
 * SYNOPSIS    pigeon.yaml:  sasl: { mechanisms: [PLAIN, LOGIN, SCRAM-SHA-256] }
 *                           oauth: { jwks_file: jwks.json, issuer: …, audience: …, username_claim: email }
 * DESCRIPTION Mechanisms are offered before the user is known, so the list is node-wide (pigeon.yaml).
 *             Unset (null): PLAIN, LOGIN and SCRAM-SHA-256, plus OAUTHBEARER and XOAUTH2 when
 *             `oauth.jwks_file` is set. An explicit list is offered in its order; an OAuth
 *             mechanism in it needs `oauth.jwks_file` (checked when the file is loaded).
 *             Kept free of imports so that the configuration schema can use it.
 * SEE ALSO    src/proxy/sasl/registry.ts (the mechanisms themselves)
 */

export const MECHANISM_NAMES = ['PLAIN', 'LOGIN', 'SCRAM-SHA-256', 'OAUTHBEARER', 'XOAUTH2'] as const;
export type MechanismName = (typeof MECHANISM_NAMES)[number];
export const OAUTH_MECHANISMS: readonly MechanismName[] = ['OAUTHBEARER', 'XOAUTH2'];

/** The mechanisms this node offers, in order, from pigeon.yaml's `sasl.mechanisms` and `oauth.jwks_file`. */
export function offeredMechanisms(config: { readonly sasl: { readonly mechanisms: readonly MechanismName[] | null }; readonly oauth: { readonly jwks_file: string | null } }): readonly MechanismName[] {
  if (config.sasl.mechanisms !== null) return config.sasl.mechanisms;
  return config.oauth.jwks_file !== null ? ['PLAIN', 'LOGIN', 'SCRAM-SHA-256', 'OAUTHBEARER', 'XOAUTH2'] : ['PLAIN', 'LOGIN', 'SCRAM-SHA-256'];
}
