// Client-facing TLS apart from the cluster's: node A serves clients a certificate from a CA that
// has nothing to do with the cluster (a "public" one), plus a second name by SNI, while its peer
// links keep using the node certificate from the cluster CA (peer.cert/peer.key). Checked with
// node:tls as a client would (servername, CA verification) on imaps and on STARTTLS; a user homed
// on node B is read through A over imaps and STARTTLS, 3 MiB at a time, and neither daemon prints
// a MaxListenersExceededWarning; SIGHUP makes A serve a replaced SNI certificate.
import t from 'tap';
import { ImapFlow } from 'imapflow';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { connect as tlsConnect, type TLSSocket, type PeerCertificate } from 'node:tls';
import { connect } from 'node:net';
import { makeNode, type ClusterNode } from './helpers/cluster.js';
import { scratchDir, putMessage } from './helpers/instance.js';
import { requireProgram } from './helpers/programs.js';
import { createCa, issueHostCert, writeKeyPair } from '../certs/ca.js';

const BODY = `${'0123456789abcdefghijklmnopqrstuvwxyz'.repeat(2)}..\r\n`.repeat(40_000);
const MESSAGE = `From: bob@example.test\r\nTo: alice@example.test\r\nSubject: big\r\nMessage-ID: <big.tls@example.test>\r\n\r\n${BODY}`;

/** Wait until `what()` holds (a log line written by a daemon). */
async function until(what: () => boolean, ms = 60_000): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (!what() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
  return what();
}

/** The certificate a node shows a client that asks for `servername` (none: no SNI), verified against `ca`. */
async function served(socket: TLSSocket): Promise<{ cert: PeerCertificate; authorized: boolean; error: string | null }> {
  return new Promise((resolve, reject) => {
    socket.once('secureConnect', () => {
      resolve({ cert: socket.getPeerCertificate(), authorized: socket.authorized, error: socket.authorizationError ? String(socket.authorizationError) : null });
      socket.destroy();
    });
    socket.once('error', reject);
  });
}

function implicit(n: ClusterNode, ca: Buffer, servername: string | null): Promise<{ cert: PeerCertificate; authorized: boolean; error: string | null }> {
  return served(tlsConnect({ host: n.ip, port: n.ports['imaps'] ?? 0, ca: [ca], rejectUnauthorized: false, ...(servername ? { servername } : {}) }));
}

/** STARTTLS on the plain IMAP port, then the TLS handshake with `servername`. */
async function starttls(n: ClusterNode, ca: Buffer, servername: string): Promise<{ cert: PeerCertificate; authorized: boolean; error: string | null }> {
  const s = connect(n.ports['imap'] ?? 0, n.ip);
  let buf = '';
  let asked = false;
  await new Promise<void>((res, rej) => {
    s.on('data', (d: Buffer) => {
      buf += d.toString('latin1');
      if (!asked && buf.includes('\r\n')) {
        asked = true;
        s.write('s1 STARTTLS\r\n');
      }
      if (/s1 OK.*\r\n/.test(buf)) {
        s.removeAllListeners('data');
        res();
      }
    });
    s.once('error', rej);
  });
  return served(tlsConnect({ socket: s, ca: [ca], rejectUnauthorized: false, servername }));
}

t.test('clients see tls.cert (any CA) and tls.sni; peer links keep the node certificate', async (t) => {
  if (!requireProgram(t, '/usr/lib/dovecot/imap', 'dovecot-imapd')) return;
  const base = scratchDir(t);
  const A = await makeNode(t, base, 'A', '127.0.0.12', null, null);
  const B = await makeNode(t, base, 'B', '127.0.0.13', join(A.dir, 'pigeon.db'), A.dir);
  // A also listens for implicit TLS (lists replace: the whole list again, same peer port)
  writeFileSync(join(A.dir, 'conf.d', '55-listen.yaml'), `listen: ["imap=${A.ip}:0", "imaps=${A.ip}:0", "lmtp=${A.ip}:0", "peer=${A.ip}:${A.peerPort}", "metrics=${A.ip}:0"]\n`);
  const pub = await createCa('public-test');
  const pubCa = Buffer.from(pub.certPem);
  const clusterCa = readFileSync(join(A.dir, 'certs', 'ca.crt'));
  writeKeyPair(await issueHostCert(pub, 'mail.example.org', ['mail.example.org']), join(A.dir, 'mail.crt'), join(A.dir, 'mail.key'));
  writeKeyPair(await issueHostCert(pub, 'imap.example.net', ['imap.example.net']), join(A.dir, 'net.crt'), join(A.dir, 'net.key'));
  writeFileSync(join(A.dir, 'conf.d', '60-tls.yaml'), 'tls:\n  cert: mail.crt\n  key: mail.key\n  sni:\n    imap.example.net: { cert: net.crt, key: net.key }\n');
  A.run(['domain', 'add', 'example.test']);
  t.equal(A.run(['user', 'add', 'alice@example.test', '--password-stdin', '--home', 'B'], 'secret\n').status, 0);
  const ct = A.run(['config', 'test']);
  t.equal(ct.status, 0, `config test of A: OK (${ct.stderr})`);
  t.match(ct.stdout, /^tls: .*mail\.crt \(mail\.example\.org;/m);
  t.match(ct.stdout, /^peer: .*node\.crt \(node A from the cluster CA/m);
  await Promise.all([A.start(), B.start()]);

  await t.test('imaps and STARTTLS: the certificate for the name asked for, from the public CA', async (t) => {
    const byName = await implicit(A, pubCa, 'mail.example.org');
    t.equal(byName.cert.subject.CN, 'mail.example.org', 'imaps, SNI mail.example.org: tls.cert');
    t.ok(byName.authorized, `verified against the public CA (${byName.error ?? ''})`);
    const sni = await implicit(A, pubCa, 'imap.example.net');
    t.equal(sni.cert.subject.CN, 'imap.example.net', 'imaps, SNI imap.example.net: the tls.sni entry');
    t.ok(sni.authorized, 'verified against the public CA');
    t.equal((await implicit(A, pubCa, null)).cert.subject.CN, 'mail.example.org', 'no SNI: tls.cert');
    t.equal((await implicit(A, pubCa, 'other.example.com')).cert.subject.CN, 'mail.example.org', 'an unlisted name: tls.cert');
    const st = await starttls(A, pubCa, 'imap.example.net');
    t.equal(st.cert.subject.CN, 'imap.example.net', 'STARTTLS honours SNI too');
    t.ok(st.authorized, 'verified against the public CA');
    const node = await implicit(A, clusterCa, 'A');
    t.notOk(node.authorized, 'clients are not shown the node certificate of the cluster CA');
  });

  await t.test('a user homed on B, read at A over imaps and STARTTLS: the peer link works with the node certificate', async (t) => {
    const client = (secure: boolean, servername: string): ImapFlow =>
      new ImapFlow({
        host: A.ip,
        port: secure ? (A.ports['imaps'] ?? 0) : (A.ports['imap'] ?? 0),
        secure,
        doSTARTTLS: !secure,
        tls: { ca: [pubCa], servername },
        auth: { user: 'alice@example.test', pass: 'secret' },
        logger: false,
      } as ConstructorParameters<typeof ImapFlow>[0]);
    const first = client(true, 'mail.example.org');
    await first.connect();
    await first.logout();
    const show = JSON.parse(A.run(['user', 'show', 'alice@example.test', '--json']).stdout) as { home: string; allocation: { path: string } };
    t.equal(show.home, 'B', 'the mailbox lives on B');
    putMessage(show.allocation.path, MESSAGE);
    const sizes: number[] = [];
    for (let i = 0; i < 8; i++) {
      const c = client(i % 2 === 0, i % 4 < 2 ? 'mail.example.org' : 'imap.example.net');
      await c.connect();
      const lock = await c.getMailboxLock('INBOX');
      try {
        const m = await c.fetchOne('1', { source: true });
        sizes.push(m && m.source && m.source.toString('latin1') === MESSAGE ? m.source.length : -1);
      } finally {
        lock.release();
      }
      await c.logout();
    }
    t.same(sizes, Array(8).fill(MESSAGE.length), '8 sessions (imaps and STARTTLS, both names) fetched the 3 MiB message intact through the peer link');
    t.ok(await until(() => (A.log().match(/imap\(alice@example\.test\): Handed off to node B/g) ?? []).length >= 9), 'A handed every session to B');
    t.ok(await until(() => (B.log().match(/imap\(alice@example\.test\): Login: from=A, method=peer/g) ?? []).length >= 9), 'B accepted them from A (its certificate checks passed)');
    t.notMatch(A.startErr, /MaxListenersExceededWarning/, "A's stderr: no listener leak warning (client TLS socket, peer link)");
    t.notMatch(B.startErr, /MaxListenersExceededWarning/, "B's stderr: no listener leak warning (received link)");
  });

  await t.test('SIGHUP: a replaced SNI certificate is served without a restart, sessions keep working', async (t) => {
    const before = (await implicit(A, pubCa, 'imap.example.net')).cert.fingerprint256;
    writeKeyPair(await issueHostCert(pub, 'imap.example.net', ['imap.example.net']), join(A.dir, 'net2.crt'), join(A.dir, 'net2.key'));
    writeFileSync(join(A.dir, 'conf.d', '60-tls.yaml'), 'tls:\n  cert: mail.crt\n  key: mail.key\n  sni:\n    imap.example.net: { cert: net2.crt, key: net2.key }\n');
    const reloads = (A.log().match(/master: configuration reloaded/g) ?? []).length;
    A.child?.kill('SIGHUP');
    t.ok(await until(() => (A.log().match(/master: configuration reloaded/g) ?? []).length > reloads), 'A logged the reload');
    const after = await implicit(A, pubCa, 'imap.example.net');
    t.not(after.cert.fingerprint256, before, 'the new SNI certificate is served');
    t.equal(after.cert.fingerprint256, new (await import('node:crypto')).X509Certificate(readFileSync(join(A.dir, 'net2.crt'))).fingerprint256, 'it is net2.crt');
    t.equal((await implicit(A, pubCa, 'mail.example.org')).cert.subject.CN, 'mail.example.org', 'tls.cert unchanged');
  });
});
