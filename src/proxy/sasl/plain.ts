/**
 * NAME        src/proxy/sasl/plain — SASL PLAIN (RFC 4616)
 * DESCRIPTION One message, authzid NUL authcid NUL password (src/proxy/login.ts
 *             `saslCredentials`); an authorization identity other than the user is refused.
 * SECURITY    The password crosses the wire: offered only where login.plaintext allows.
 */
import type { SaslMechanism } from './types.js';
import { saslCredentials } from '../login.js';

const plain: SaslMechanism = {
  name: 'PLAIN',
  plaintext: true,
  async start(_env, initial, step) {
    const x = await saslCredentials('PLAIN', initial, (i, prompt) => step(i, Buffer.from(prompt, 'base64')));
    return 'ended' in x ? { ended: x.ended } : { creds: x.creds };
  },
};

export default plain;
