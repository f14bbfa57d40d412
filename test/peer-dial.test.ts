// The dialing side of a peer link, in this process against a real node (`pigeon serve` B on
// 127.0.0.x, its node certificate from the cluster CA that A's came from):
// - a link to B opens: B's certificate names B and is its registered one, and node:tls's legacy
//   certificate object of the whole chain is not built for it (src/peer/link.ts: the node's name
//   is read from the X509Certificate, ≈ 0.4 ms less on the event loop per link);
// - an address that answers with another node's certificate is refused, with both names, and no
//   link is kept: the name check still holds.
import t from 'tap';
import Database from 'better-sqlite3';
import { TLSSocket } from 'node:tls';
import { join } from 'node:path';
import { makeNode } from './helpers/cluster.js';
import { scratchDir } from './helpers/instance.js';
import { loadInstance } from '../src/instance.js';
import { openInstanceStore } from '../src/context.js';
import { createPeerContext } from '../src/peer/context.js';
import { openLink } from '../src/peer/link.js';

t.test('dialing a node: its certificate checked by name without the legacy chain object; another node’s certificate refused', async (t) => {
  const base = scratchDir(t);
  const A = await makeNode(t, base, 'a', '127.0.0.22', null, null);
  const B = await makeNode(t, base, 'b', '127.0.0.23', join(A.dir, 'pigeon.db'), A.dir);
  await makeNode(t, base, 'c', '127.0.0.24', join(A.dir, 'pigeon.db'), A.dir);
  await B.start(); // registers B's peer address
  // node c never runs; its registered address answers with B's certificate (a wrong DNS entry)
  const db = new Database(join(A.dir, 'pigeon.db'));
  db.prepare("UPDATE nodes SET peer_address = (SELECT peer_address FROM nodes WHERE name = 'b') WHERE name = 'c'").run();
  db.close();

  const instance = loadInstance(A.dir);
  const store = await openInstanceStore(instance);
  t.teardown(() => store.close());
  const ctx = createPeerContext(instance, store);

  const proto = TLSSocket.prototype;
  const legacy = proto.getPeerCertificate;
  let legacyCalls = 0;
  proto.getPeerCertificate = function (this: TLSSocket, detailed?: boolean) {
    legacyCalls++;
    return legacy.call(this, detailed as true);
  } as typeof legacy;
  t.teardown(() => {
    proto.getPeerCertificate = legacy;
  });

  const { sock, pooled } = await openLink(ctx, 'b', { pooled: false });
  t.equal(pooled, false, 'a fresh link');
  t.equal(sock.authorized, true, "B's chain verified against the cluster CA");
  // (dial() checked its name and registered fingerprint: node:tls stops returning the certificate
  // once a TLS 1.3 session ticket has arrived, so it is not read again here)
  t.equal(legacyCalls, 0, 'no legacy certificate object was built for the link');
  t.notOk(Object.hasOwn(sock, 'getPeerCertificate'), 'the socket has the prototype’s method again once the link is up');
  sock.destroy();

  const wrong = await openLink(ctx, 'c', { pooled: false }).then(
    () => null,
    (e: unknown) => e as Error & { code?: string },
  );
  t.ok(wrong, 'the link to c is refused');
  t.equal(wrong?.code, 'PEER_UNAVAILABLE');
  t.match(wrong?.message, /presented node b, expected c/, 'the error names both nodes');
});
