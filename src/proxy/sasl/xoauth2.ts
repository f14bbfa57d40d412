/**
 * NAME        src/proxy/sasl/xoauth2 — SASL XOAUTH2 (Google's format, which many clients speak)
 * DESCRIPTION `user=USER^Aauth=Bearer TOKEN^A^A`; a refusal gets the error challenge
 *             `{"status":"401","schemes":"bearer"}`, which the client answers with an empty line.
 *             The token is checked by auth/chain.ts (auth/oauth.ts); see src/proxy/sasl/oauth.ts.
 * SECURITY    A bearer token is a password while it lives: offered only where login.plaintext allows.
 */
import type { SaslMechanism } from './types.js';
import { parseXoauth2, startOAuth } from './oauth.js';

const xoauth2: SaslMechanism = {
  name: 'XOAUTH2',
  plaintext: true,
  start: (env, initial, step) => startOAuth('XOAUTH2', parseXoauth2, '{"status":"401","schemes":"bearer"}', env, initial, step),
};

export default xoauth2;
