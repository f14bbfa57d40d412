// certOutOfDate (certs/verify.ts): what the peer link checks again on a resumed TLS session,
// whose full handshake's date check it would otherwise inherit (src/peer/link.ts, Resumption).
import t from 'tap';
import { X509Certificate } from 'node:crypto';
import { createCa, issueHostCert } from '../../certs/ca.js';
import { certOutOfDate } from '../../certs/verify.js';

t.test('a host certificate inside, before and after its dates', async (t) => {
  const ca = await createCa('test');
  const day = 86_400_000;
  const now = Date.now();
  const valid = new X509Certificate((await issueHostCert(ca, 'b')).certPem);
  const expired = new X509Certificate((await issueHostCert(ca, 'b', [], { notBefore: new Date(now - 3 * day), notAfter: new Date(now - day) })).certPem);
  const early = new X509Certificate((await issueHostCert(ca, 'b', [], { notBefore: new Date(now + day), notAfter: new Date(now + 3 * day) })).certPem);
  t.equal(certOutOfDate(valid), null, 'valid now: nothing to say');
  t.match(certOutOfDate(expired), /^certificate of b expired on \d{4}-/, 'expired: says since when');
  t.match(certOutOfDate(early), /^certificate of b is not valid before \d{4}-/, 'not yet valid: says from when');
  t.match(certOutOfDate(valid, now + 900 * day), /expired/, 'the same certificate 900 days on (825 days by default): expired');
});
