/**
 * NAME        src/proxy/sasl/oauthbearer — SASL OAUTHBEARER (RFC 7628)
 * DESCRIPTION `n,a=USER,^Ahost=…^Aport=…^Aauth=Bearer TOKEN^A^A` (the authzid may be absent: the user
 *             is then the token's username claim); a refusal gets the error challenge
 *             `{"status":"invalid_token","schemes":"bearer"}`, which the client answers with ^A.
 *             The token is checked by auth/chain.ts (auth/oauth.ts); see src/proxy/sasl/oauth.ts.
 * SECURITY    A bearer token is a password while it lives: offered only where login.plaintext allows.
 */
import type { SaslMechanism } from './types.js';
import { parseOauthbearer, startOAuth } from './oauth.js';

const oauthbearer: SaslMechanism = {
  name: 'OAUTHBEARER',
  plaintext: true,
  start: (env, initial, step) => startOAuth('OAUTHBEARER', parseOauthbearer, '{"status":"invalid_token","schemes":"bearer"}', env, initial, step),
};

export default oauthbearer;
