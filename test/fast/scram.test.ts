// Fast tier: SCRAM-SHA-256 (auth/scram.ts). RFC 7677's test vector through the server half of an
// exchange, Dovecot's and gsasl's stored keys verified as they were written by those programs,
// the gs2 header rules (no channel binding offered), and the refusals of malformed messages.
import t from 'tap';
import { randomBytes } from 'node:crypto';
import { ScramServer, ScramError, parseScram, scramHash } from '../../auth/scram.js';
import { hashPassword, parseHash, verifyPassword, scramRecordOf } from '../../auth/schemes.js';
import { isAppError } from '../../src/errors.js';

// RFC 7677 §3
const SALT = 'W22ZaJ0SNY7soEsUEjb6gQ==';
const CLIENT_FIRST = 'n,,n=user,r=rOprNGfwEbeRWgbNEkqO';
const SERVER_NONCE = '%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0';
const SERVER_FIRST = `r=rOprNGfwEbeRWgbNEkqO${SERVER_NONCE},s=${SALT},i=4096`;
const CLIENT_FINAL = `c=biws,r=rOprNGfwEbeRWgbNEkqO${SERVER_NONCE},p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=`;
const SERVER_FINAL = 'v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=';
const B = (s: string): Buffer => Buffer.from(s, 'latin1');
const FAKE = randomBytes(32);

async function pencilRecord() {
  const stored = `{SCRAM-SHA-256}${await scramHash(B('pencil'), 4096, Buffer.from(SALT, 'base64'))}`;
  const rec = scramRecordOf(stored);
  if (rec === null) throw new Error('not a SCRAM record');
  return { stored, rec };
}

t.test("RFC 7677's exchange: the server's messages are the RFC's, byte for byte", async (t) => {
  const { rec } = await pencilRecord();
  const s = new ScramServer();
  t.same(s.clientFirst(B(CLIENT_FIRST)).user, B('user'));
  t.equal(s.serverFirst(rec, FAKE, SERVER_NONCE).toString('latin1'), SERVER_FIRST);
  t.equal(s.clientFinal(B(CLIENT_FINAL)), true, "the RFC's proof is accepted");
  t.equal(s.serverFinal().toString('latin1'), SERVER_FINAL, "and the server signature is the RFC's");
});

t.test('a wrong proof, a changed nonce or channel-binding field, and a user without keys all fail', async (t) => {
  const { rec } = await pencilRecord();
  const run = (final: string, record: typeof rec | null = rec, first = CLIENT_FIRST): boolean | string => {
    const s = new ScramServer();
    s.clientFirst(B(first));
    s.serverFirst(record, FAKE, SERVER_NONCE);
    try {
      return s.clientFinal(B(final));
    } catch (e) {
      return e instanceof ScramError ? `refused: ${e.message}` : 'threw';
    }
  };
  const badProof = CLIENT_FINAL.replace('p=dHzb', 'p=dHzc');
  t.equal(run(badProof), false, 'one changed bit of the proof');
  t.match(run(CLIENT_FINAL.replace('r=rOpr', 'r=xOpr')), /refused: nonce/, 'a nonce that is not the combined one');
  t.match(run(CLIENT_FINAL.replace('c=biws', 'c=eSws')), /refused: channel binding/, "c= must repeat the client's gs2 header");
  t.equal(run(CLIENT_FINAL, null), false, 'no stored record (unknown user, or a hash that is not SCRAM): never true');
  t.throws(() => new ScramServer().serverFinal(), 'no server signature without a verified proof');
});

t.test('gs2 header: n and y accepted (no -PLUS offered), p= and a foreign authzid refused', async (t) => {
  const first = (m: string): string => {
    try {
      return new ScramServer().clientFirst(B(m)).user.toString('latin1');
    } catch (e) {
      return e instanceof ScramError ? `refused: ${e.message}` : 'threw';
    }
  };
  t.equal(first('y,,n=user,r=abc'), 'user', 'y: the client supports channel binding, the server offers none');
  t.equal(first('n,a=user,n=user,r=abc'), 'user', 'an authzid equal to the user');
  t.match(first('n,a=root,n=user,r=abc'), /refused: authorization identity/);
  t.match(first('p=tls-server-end-point,,n=user,r=abc'), /refused: channel binding requested/);
  t.match(first('n,,m=ext,n=user,r=abc'), /refused: mandatory extension/);
  t.match(first('n,,n=us=3Der=2C,r=abc'), 'us=er,', 'saslname escapes decoded');
  t.match(first('n,,n=us=er,r=abc'), /refused: malformed saslname/);
  t.match(first('x,,n=user,r=abc'), /refused: malformed gs2 header/);
  t.match(first('n,,n=,r=abc'), /refused/, 'an empty user');
  t.match(first('n,,'), /refused/, 'no attributes');
  t.match(first(''), /refused/, 'empty message');
});

t.test("the y flag's header is what c= must carry", async (t) => {
  const { rec } = await pencilRecord();
  const s = new ScramServer();
  s.clientFirst(B('y,,n=user,r=rOprNGfwEbeRWgbNEkqO'));
  s.serverFirst(rec, FAKE, SERVER_NONCE);
  t.throws(() => s.clientFinal(B(CLIENT_FINAL)), { name: 'ScramError', message: /channel binding/ }, "c=biws (n,,) does not match the y,, the client sent");
});

t.test('an unknown user gets the same fake salt every time, and the default iteration count', async (t) => {
  const salt = (user: string): string => {
    const s = new ScramServer();
    s.clientFirst(B(`n,,n=${user},r=abc`));
    return /s=([^,]+),i=(\d+)/.exec(s.serverFirst(null, FAKE).toString('latin1'))?.slice(1).join(' ') ?? '';
  };
  t.equal(salt('ghost'), salt('ghost'), 'stable per name');
  t.not(salt('ghost'), salt('other'), 'different per name');
  t.match(salt('ghost'), / 4096$/);
});

t.test("stored keys written by Dovecot and by gsasl verify, as {SCRAM-SHA-256} passwords", async (t) => {
  // `doveadm pw -s SCRAM-SHA-256 -p secret` (Dovecot 2.3.19) and `gsasl --mkpasswd -m SCRAM-SHA-256 -p secret` (GNU SASL 2.2.0)
  const dovecot = '{SCRAM-SHA-256}4096,uRSMVp+6FKSaQxXXc42BTA==,zdVtbdUNE+Q+e/A0OHIMFrPgMlXLIvi+0BM/m6zGxVg=,PrHUmDU912SWMgRgZOQhGb2iujAW33fCEwj9Vf8moc0=';
  const gsasl = '{SCRAM-SHA-256}65536,4nVUclAjwWhntuPd,SMVThr077ts3GG2thKv/NDgwU04Pmh2zs0wnPhn56Sg=,ucFCsweB1hewQFMarOkTCXEVzmROS/H9JXuyp4rxqHU=';
  for (const [who, h] of [['doveadm', dovecot], ['gsasl', gsasl]] as const) {
    t.equal(await verifyPassword(h, B('secret')), true, `${who}'s hash takes the right password`);
    t.equal(await verifyPassword(h, B('Secret')), false, `${who}'s hash refuses another`);
  }
  const mine = await hashPassword(B('secret'), 'SCRAM-SHA-256');
  t.match(mine, /^\{SCRAM-SHA-256\}4096,[A-Za-z0-9+/]{22}==,[A-Za-z0-9+/]{43}=,[A-Za-z0-9+/]{43}=$/, "pigeon pw's format is Dovecot's");
  t.equal(await verifyPassword(mine, B('secret')), true);
  t.equal(await verifyPassword(mine, B('secreT')), false);
  // bytes that are not UTF-8 are hashed as they are, and only those bytes verify
  const raw = await hashPassword(B('pass\xfe'), 'SCRAM-SHA-256');
  t.equal(await verifyPassword(raw, B('pass\xfe')), true);
  t.equal(await verifyPassword(raw, B('pass\xff')), false);
  // SASLprep (RFC 4013): a soft hyphen maps to nothing, as a SCRAM client maps it
  const prepped = await hashPassword(Buffer.from('pen\u00adcil', 'utf8'), 'SCRAM-SHA-256');
  t.equal(await verifyPassword(prepped, B('pencil')), true, 'SASLprep applied on both sides');
});

t.test('malformed and absurd stored keys are refused before any work, naming no secret', async (t) => {
  const code = (h: string): string => {
    try {
      parseHash(h);
      return 'accepted';
    } catch (e) {
      return isAppError(e) ? `${e.code}: ${e.message}` : 'threw';
    }
  };
  const key = Buffer.alloc(32, 1).toString('base64');
  t.equal(code(`{SCRAM-SHA-256}4096,c2FsdA==,${key},${key}`), 'accepted');
  t.match(code(`{SCRAM-SHA-256}100001,c2FsdA==,${key},${key}`), /^PASSWORD_COST: .*100001 iterations; at most 100000/);
  t.match(code(`{SCRAM-SHA-256}4096,c2FsdA==,${key}`), /^PASSWORD_SCHEME/, 'three fields');
  t.match(code(`{SCRAM-SHA-256}0,c2FsdA==,${key},${key}`), /^PASSWORD_SCHEME/, 'zero iterations');
  t.match(code(`{SCRAM-SHA-256}4096,c2FsdA==,c2hvcnQ=,${key}`), /^PASSWORD_SCHEME/, 'a key that is not 32 bytes');
  t.notMatch(code(`{SCRAM-SHA-256}4096,c2FsdA==,c2hvcnQ=,${key}`), key, 'the hash is not echoed');
  t.throws(() => parseScram('x', 10));
});
