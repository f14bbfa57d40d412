/**
 * NAME        src/proxy/sasl/login — SASL LOGIN (draft-murchison-sasl-login)
 * DESCRIPTION Two prompts, `Username:` and `Password:` (src/proxy/login.ts `saslCredentials`).
 * SECURITY    The password crosses the wire: offered only where login.plaintext allows.
 */
import type { SaslMechanism } from './types.js';
import { saslCredentials } from '../login.js';

const login: SaslMechanism = {
  name: 'LOGIN',
  plaintext: true,
  async start(_env, initial, step) {
    const x = await saslCredentials('LOGIN', initial, (i, prompt) => step(i, Buffer.from(prompt, 'base64')));
    return 'ended' in x ? { ended: x.ended } : { creds: x.creds };
  },
};

export default login;
