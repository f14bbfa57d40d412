/**
 * NAME        src/proxy/sasl/scram-sha-256 — SASL SCRAM-SHA-256 (RFC 5802, RFC 7677), server side
 * DESCRIPTION client-first (initial response or the answer to an empty challenge) → the shared
 *             login, whose deciding auth source runs the rest of the exchange against its stored
 *             hash (auth/verify.ts): server-first with the user's salt and iteration count,
 *             client-final with the proof. A user with no `{SCRAM-SHA-256}` hash, or an unknown
 *             one, gets a fake salt and fails at the proof like a wrong password, with the same
 *             delay. After a successful login the server signature goes out as one more
 *             challenge (`+ v=…`), which the client answers with an empty line; only then does the
 *             session go to the backend. Not a plaintext mechanism: offered without TLS too.
 *             No channel binding (-PLUS is not offered): gs2 flags `n` and `y` are accepted.
 * DIAGNOSTICS A malformed client message is a refused login (logged as `auth failed (…)`).
 * SECURITY    The password never crosses the wire; the proof is checked in constant time.
 */
import { randomBytes } from 'node:crypto';
import type { Ended, SaslMechanism } from './types.js';
import { ScramServer, ScramError } from '../../../auth/scram.js';
import { scramRecordOf } from '../../../auth/schemes.js';

/** Keys the fake salts of this process (an unknown user's salt stays the same while it runs). */
const FAKE_SECRET = randomBytes(32);

const scramSha256: SaslMechanism = {
  name: 'SCRAM-SHA-256',
  plaintext: false,
  async start(_env, initial, step) {
    const first = await step(initial, Buffer.alloc(0));
    if (!Buffer.isBuffer(first)) return { ended: first };
    const server = new ScramServer();
    let user: Buffer;
    try {
      user = server.clientFirst(first).user;
    } catch (e) {
      return { creds: { kind: 'malformed', why: e instanceof ScramError ? `SCRAM: ${e.message}` : 'SCRAM: malformed message', user: null } };
    }
    let ended: Ended | null = null;
    let proving = false;
    return {
      creds: {
        kind: 'password',
        user,
        password: {
          kind: 'exchange',
          mechanism: 'SCRAM-SHA-256',
          async prove(stored) {
            // one exchange per login: a second source asking again gets no second server-first
            if (proving) return false;
            proving = true;
            // an unusable or non-SCRAM hash: the exchange goes on with a fake salt (scramRecordOf
            // throws for an unusable hash; auth/verify.ts has refused that before calling)
            const rec = stored === null ? null : scramRecordOf(stored);
            const final = await step(null, server.serverFirst(rec, FAKE_SECRET));
            if (!Buffer.isBuffer(final)) {
              ended = final;
              return false;
            }
            try {
              return server.clientFinal(final);
            } catch (e) {
              if (e instanceof ScramError) return false;
              throw e;
            }
          },
        },
      },
      async success() {
        const answer = await step(null, server.serverFinal());
        // RFC 5802 §5: the client's answer to the server-final message is empty (any answer goes on)
        return Buffer.isBuffer(answer) ? null : answer;
      },
      async failure() {
        return ended;
      },
      ended: () => ended,
    };
  },
};

export default scramSha256;
