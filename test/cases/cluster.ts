// Three nodes on 127.0.0.2, .3 and .4 sharing one database, each a real `pigeon serve` with
// imap, pop3, lmtp, peer and metrics listeners and its own mail root served by the real Dovecot:
// a client at A reads a mailbox homed on C (imapflow and POP3) and C provably did no password check
// and no user read; mail delivered at A lands on C; many concurrent first deliveries for one new
// user split across the nodes make one mailbox; the fewest placement; a fourth node joins while
// the others run; a user moves while mail keeps arriving; and the faults: foreign CA, expired and
// wrong-key certificates, replayed/altered hand-offs, a user that does not live here, hop loops, a
// stalled hand-off, disabled and removed nodes, a name taken twice, a home node that dies.
// The cases, for one database: test/cluster.test.ts runs them on one SQLite file the nodes share,
// test/cluster-pg.test.ts on a private PostgreSQL server, where the nodes share nothing else
// (instance directories, mail roots and addresses are each node's own either way).
import t from 'tap';
import { ImapFlow } from 'imapflow';
import { readFileSync, readdirSync, existsSync, copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import { spawnSync } from 'node:child_process';
import { makeNode, metrics, wireTo, lmtpSend, clusterDb, type ClusterNode, type DbKind } from '../helpers/cluster.js';
import { pigeon, CLI, scratchDir } from '../helpers/instance.js';
import { requireProgram } from '../helpers/programs.js';
import { startCli } from '../helpers/cli.js';
import { courierBinaries } from '../helpers/backends.js';
import { createCa, issueHostCert, readKeyPair } from '../../certs/ca.js';
import { sealHandOff, newNonce, PEER_PROTOCOL, type HandOff } from '../../src/peer/protocol.js';

const DOMAIN = 'example.test';

// How long any single step may take before the test calls it a hang. Not a pace: every wait
// below ends on its event (a close, an answer, a log line); two suites at once on 2 cores make
// a step take seconds, which a bound of a few seconds turned into failures.
const BOUND_MS = 60_000;

function imap(n: ClusterNode, user: string, pass = 'secret'): ImapFlow {
  return new ImapFlow({ host: n.ip, port: n.ports['imap'] ?? 0, secure: false, doSTARTTLS: false, auth: { user, pass }, logger: false, emitLogs: false, connectionTimeout: BOUND_MS });
}

/** Log in at node `n` with imapflow and list the subjects in INBOX. */
async function subjectsAt(n: ClusterNode, user: string): Promise<string[]> {
  const c = imap(n, user);
  await c.connect();
  const lock = await c.getMailboxLock('INBOX');
  const subjects: string[] = [];
  for await (const m of c.fetch('1:*', { envelope: true })) subjects.push(m.envelope?.subject ?? '');
  lock.release();
  await c.logout();
  return subjects;
}

function mailFiles(n: ClusterNode, user: string): string[] {
  const d = join(n.dir, 'mail', DOMAIN, user.split('@')[0] ?? '');
  if (!existsSync(d)) return [];
  return ['new', 'cur'].flatMap((s) => (existsSync(join(d, s)) ? readdirSync(join(d, s)).map((f) => join(d, s, f)) : []));
}

function msg(subject: string, body = 'hello'): string {
  return `From: bob@example.test\r\nTo: someone@example.test\r\nSubject: ${subject}\r\nMessage-ID: <${subject.replace(/\W/g, '')}.${Math.random().toString(36).slice(2)}@test>\r\n\r\n${body}\r\n`;
}

function userRow(n: ClusterNode, address: string): { home: string | null; allocation: { path: string } | null } {
  const r = n.run(['user', 'show', address, '--json']);
  return JSON.parse(r.stdout) as { home: string | null; allocation: { path: string } | null };
}

/** A TLS link to a node's peer port with the given credentials (a test acting as a peer). */
async function rawLink(to: ClusterNode, cert: string | Buffer, key: string | Buffer, ca: Buffer): Promise<{ sock: TLSSocket | null; error: string | null }> {
  return new Promise((resolve) => {
    const sock = tlsConnect({ host: to.ip, port: to.peerPort, cert, key, ca, minVersion: 'TLSv1.3', checkServerIdentity: () => undefined });
    const t = setTimeout(() => {
      sock.destroy();
      resolve({ sock: null, error: 'timeout' });
    }, BOUND_MS);
    sock.once('secureConnect', () => {
      clearTimeout(t);
      resolve({ sock, error: null });
    });
    sock.once('error', (e) => {
      clearTimeout(t);
      resolve({ sock: null, error: e.message });
    });
  });
}

/** First line the peer answers (or null when it closes without one). */
function answer(sock: TLSSocket, ms = BOUND_MS): Promise<string | null> {
  return new Promise((resolve) => {
    let buf = '';
    const done = (v: string | null): void => {
      clearTimeout(t);
      resolve(v);
    };
    const t = setTimeout(() => done(null), ms);
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      buf += d;
      const nl = buf.indexOf('\n');
      if (nl >= 0) done(buf.slice(0, nl));
    });
    sock.once('close', () => done(buf.includes('\n') ? (buf.split('\n')[0] ?? null) : null));
    sock.on('error', () => undefined);
  });
}

/** Poll until `what()` holds (a log line, a state): the event itself, bounded only against a hang. */
async function until(what: () => boolean | Promise<boolean>, ms = BOUND_MS): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (!(await what()) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
  return what();
}

/** `p` settles within BOUND_MS: true; else false (a hang, reported as a failure, not a tap timeout). */
function within(p: Promise<unknown>): Promise<boolean> {
  return Promise.race([p.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), BOUND_MS).unref())]);
}

/** A peer's first answer on a fresh link with these credentials (null when TLS itself failed). */
async function linkAnswer(to: ClusterNode, cert: string | Buffer, key: string | Buffer, ca: Buffer): Promise<string | null> {
  const l = await rawLink(to, cert, key, ca);
  if (!l.sock) return null;
  const a = await answer(l.sock);
  l.sock.destroy();
  return a;
}

export default function cases(kind: DbKind): void {
  t.test(`cluster of three nodes (${kind})`, async (t) => {
    if (!requireProgram(t, '/usr/lib/dovecot/imap', 'dovecot-imapd')) return;
    if (!requireProgram(t, '/usr/lib/dovecot/pop3', 'dovecot-pop3d')) return;
    const base = scratchDir(t);
    const shared = await clusterDb(t, kind, base);
    if (!shared) return;
    const A = await makeNode(t, base, 'A', '127.0.0.2', shared.first, null);
    const db = shared.db;
    const B = await makeNode(t, base, 'B', '127.0.0.3', db, A.dir);
    const C = await makeNode(t, base, 'C', '127.0.0.4', db, A.dir);
    const caPem = readFileSync(join(A.dir, 'certs', 'ca.crt'));
    const clusterCa = readKeyPair(join(A.dir, 'certs', 'ca.crt'), join(A.dir, 'certs', 'ca.key'));
    const aCert = readFileSync(join(A.dir, 'certs', 'node.crt'));
    const aKey = readFileSync(join(A.dir, 'certs', 'node.key'));
    A.run(['domain', 'add', DOMAIN]);
    for (const [u, home] of [
      ['alice', 'C'],
      ['bob', 'B'],
      ['anna', 'A'],
      ['race', null],
      ['fewest', null],
      ['mover', 'C'],
      ['cora', 'B'],
    ] as const) {
      const r = A.run(['user', 'add', `${u}@${DOMAIN}`, '--password-stdin', ...(home ? ['--home', home] : [])], 'secret\n');
      t.equal(r.status, 0, `user ${u} added`);
    }
    A.run(['config', 'set', '--domain', DOMAIN, 'mailstore.creator', 'cas']);
    await Promise.all([A.start(), B.start(), C.start()]);

    await t.test('every node registered itself and is up', async (t) => {
      const r = A.run(['node', 'list', '--json']);
      const ns = JSON.parse(r.stdout) as { name: string; health: string; peer_address: string }[];
      t.same(
        ns.map((n) => [n.name, n.health, n.peer_address]),
        [
          ['A', 'up', `127.0.0.2:${A.peerPort}`],
          ['B', 'up', `127.0.0.3:${B.peerPort}`],
          ['C', 'up', `127.0.0.4:${C.peerPort}`],
        ],
      );
    });

    await t.test('mail delivered at A for a user homed on C lands in C\'s Maildir, after C stored it', async (t) => {
      const r = await lmtpSend(A, [`alice@${DOMAIN}`], msg('first for alice', 'stored on C'));
      t.match(r[0], /^250 2\.0\.0 /, 'A answers 250 once C has stored it');
      const files = mailFiles(C, 'alice@example.test');
      t.equal(files.length, 1, 'one message in C/mail/example.test/alice');
      t.match(readFileSync(files[0] ?? '', 'utf8'), /Delivered-To: alice@example\.test[\s\S]*stored on C/);
      t.equal(mailFiles(A, 'alice@example.test').length + mailFiles(B, 'alice@example.test').length, 0, 'nothing on A or B');
      t.match(userRow(A, 'alice@example.test').allocation?.path ?? '', /\/C\/mail\/example\.test\/alice$/, 'allocation recorded on C');
      const d = spawnSync(process.execPath, [CLI, '-c', B.dir, 'deliver', '-f', 'carol@example.test', `alice@${DOMAIN}`], { input: msg('via pigeon deliver at B'), encoding: 'utf8' });
      t.equal(d.status, 0, `pigeon deliver at B exits 0 (${d.stderr})`);
      t.equal(mailFiles(C, 'alice@example.test').length, 2, 'the pipe delivery at B also landed on C');
    });

    await t.test('a client at A reads alice\'s mailbox on C (imapflow, POP3); C did no password check and no user read', async (t) => {
      const before = await metrics(C);
      const subjects = await subjectsAt(A, `alice@${DOMAIN}`);
      t.same(subjects.sort(), ['first for alice', 'via pigeon deliver at B']);
      const w = await wireTo(A.ip, A.ports['pop3'] ?? 0);
      await w.until(/^\+OK/m);
      w.write(`USER alice@${DOMAIN}\r\nPASS secret\r\n`);
      t.match(await w.until(/Logged in/), /\+OK Logged in/);
      w.write('STAT\r\n');
      t.match(await w.until(/\+OK \d+/), /\+OK 2 /, 'POP3 STAT through A shows C\'s two messages');
      w.write('RETR 1\r\n');
      t.match(await w.until(/\r\n\.\r\n/), /stored on C/);
      w.write('QUIT\r\n');
      await w.waitClosed();
      const after = await metrics(C);
      // two logins (IMAP, POP3), and no read for either. C may read alice's row once for another
      // reason: its change poll (once a second) sees the allocation recorded by the delivery above,
      // and for a user with a live session on C it reads the row to see whether a move began
      // (src/proxy/live.ts watchMoves); whether that poll falls during these sessions is timing
      const reads = (after.get('pigeon_db_user_reads_total') ?? 0) - (before.get('pigeon_db_user_reads_total') ?? 0);
      t.ok(reads <= 1, `C read no user for the two logins (${reads} read(s), at most the one its change poll makes)`);
      t.equal(after.get('pigeon_password_checks_total') ?? 0, 0, 'C checked no password');
      t.equal((after.get('pigeon_peer_handoffs_received_total{kind="imap",result="accepted"}') ?? 0) - (before.get('pigeon_peer_handoffs_received_total{kind="imap",result="accepted"}') ?? 0), 1);
      t.equal((after.get('pigeon_peer_handoffs_received_total{kind="pop3",result="accepted"}') ?? 0) - (before.get('pigeon_peer_handoffs_received_total{kind="pop3",result="accepted"}') ?? 0), 1);
      t.ok(((await metrics(A)).get('pigeon_password_checks_total') ?? 0) >= 2, 'A did the password checks');
      t.match(A.log(), /imap\(alice@example\.test\): Handed off to node C/);
      t.match(C.log(), /imap\(alice@example\.test\): Login: from=A, method=peer/);
      t.notMatch(C.log() + A.log(), /secret/, 'no password in any log');
    });

    await t.test('a user on Courier at B, reached at A: the home node starts its own backend', async (t) => {
      const bin = courierBinaries();
      if (!requireProgram(t, bin.imapd, 'courier-imap (.deb unpacked by scripts/install-deps.sh)')) return;
      if (!requireProgram(t, '/usr/libexec/gam_server', 'gamin')) return;
      for (const k of ['imap.backend', 'pop3.backend']) t.equal(A.run(['config', 'set', '--user', `cora@${DOMAIN}`, k, 'courier']).status, 0);
      t.match((await lmtpSend(C, [`cora@${DOMAIN}`], msg('for cora on courier')))[0], /^250/);
      t.equal(mailFiles(B, `cora@${DOMAIN}`).length, 1, 'stored on B');
      const subjects = await subjectsAt(A, `cora@${DOMAIN}`);
      t.same(subjects, ['for cora on courier'], 'read through A, served by Courier on B');
      t.match(B.log(), /imap\(cora@example\.test\): Login: from=A, method=peer/);
    });

    await t.test('many concurrent first deliveries for one new user, split across nodes: one mailbox', async (t) => {
      const nodes = [A, B, C];
      const sends = Array.from({ length: 30 }, (_, i) => lmtpSend(nodes[i % 3] as ClusterNode, [`race@${DOMAIN}`], msg(`race ${i}`)));
      const replies = (await Promise.all(sends)).map((r) => r[0] ?? '');
      t.same(replies.filter((r) => !r.startsWith('250')), [], 'all 30 accepted');
      const row = userRow(A, `race@${DOMAIN}`);
      t.ok(row.home, `home decided: ${String(row.home)}`);
      const counts = nodes.map((n) => mailFiles(n, `race@${DOMAIN}`).length);
      t.same(counts.filter((c) => c > 0), [30], `all 30 messages in one mailbox (per node: ${counts.join(', ')})`);
      for (const n of nodes) {
        if (n.name === row.home) continue;
        t.notOk(existsSync(join(n.dir, 'mail', DOMAIN, 'race')), `no leftover allocation on ${n.name}`);
      }
    });

    await t.test('placement "fewest": a new user is allocated on the node with the fewest users', async (t) => {
      const perNode = new Map<string, number>();
      for (const u of JSON.parse(A.run(['user', 'list', DOMAIN, '--json']).stdout) as { home: string | null }[]) if (u.home) perNode.set(u.home, (perNode.get(u.home) ?? 0) + 1);
      const expect = ['A', 'B', 'C'].sort((x, y) => (perNode.get(x) ?? 0) - (perNode.get(y) ?? 0) || x.localeCompare(y))[0];
      t.equal(A.run(['config', 'set', '--user', `fewest@${DOMAIN}`, 'mailstore.placement', 'fewest']).status, 0);
      const r = await lmtpSend(A, [`fewest@${DOMAIN}`], msg('placed'));
      t.match(r[0], /^250/);
      t.equal(userRow(A, `fewest@${DOMAIN}`).home, expect, `placed on ${String(expect)} (users per node before: ${JSON.stringify([...perNode])})`);
      const holder = [A, B, C].find((n) => n.name === expect) as ClusterNode;
      t.equal(mailFiles(holder, `fewest@${DOMAIN}`).length, 1, 'and the message is there');
    });

    await t.test('peer link faults', async (t) => {
      const aliceHandOff = (over: Partial<HandOff> = {}): HandOff => ({
        proto: PEER_PROTOCOL,
        kind: 'imap',
        from: 'A',
        to: 'C',
        user: { id: 1, address: `alice@${DOMAIN}`, domain: DOMAIN, domainId: 1, state: 'active', home: 'C', allocation: null, version: 1, created: '', movingTo: null },
        config: {},
        client: { rip: '192.0.2.1', rport: 1, lip: '192.0.2.2', lport: 143, tls: false },
        session: 'testsession0001',
        tag: 'a1',
        hops: 1,
        nonce: newNonce(),
        ts: Date.now(),
        deliver: null,
        move: null,
        ...over,
      });

      await t.test('a certificate from another CA: TLS refused, logged', async (t) => {
        const other = await createCa('elsewhere');
        const kp = await issueHostCert(other, 'A', ['127.0.0.2']);
        const l = await rawLink(C, kp.certPem, kp.keyPem, caPem);
        const got = l.sock ? await answer(l.sock) : null;
        t.notOk(got?.includes('"ok":true'), `no link (${l.error ?? String(got)})`);
        t.ok(await until(() => /Refused link \(certificate: UNABLE_TO_VERIFY/.test(C.log())), 'C logs the refused TLS link');
      });

      await t.test('an expired certificate from the cluster CA: refused', async (t) => {
        const kp = await issueHostCert(clusterCa, 'A', [], { notBefore: new Date(Date.now() - 10 * 86400_000), notAfter: new Date(Date.now() - 86400_000) });
        const l = await rawLink(C, kp.certPem, kp.keyPem, caPem);
        const got = l.sock ? await answer(l.sock) : null;
        t.notOk(got?.includes('"ok":true'), `no link (${l.error ?? String(got)})`);
        t.ok(await until(() => /Refused link \(certificate: CERT_HAS_EXPIRED/.test(C.log())), 'C logs the expired certificate');
      });

      await t.test('a registered name with the wrong key: refused with a reason', async (t) => {
        const kp = await issueHostCert(clusterCa, 'B', []);
        const l = await rawLink(C, kp.certPem, kp.keyPem, caPem);
        t.ok(l.sock, 'TLS itself succeeds (same CA)');
        const got = l.sock ? await answer(l.sock) : null;
        t.match(got, /"ok":false.*does not match its registered fingerprint/);
        t.match(C.log(), /Refused link from B: certificate of B does not match/);
      });

      await t.test('a replayed hand-off (another TLS session) and an altered one: refused', async (t) => {
        const first = await rawLink(C, aCert, aKey, caPem);
        if (!first.sock) throw new Error(first.error ?? 'no link');
        const line = sealHandOff(first.sock, aliceHandOff());
        first.sock.write(line);
        t.match(await answer(first.sock), /"ok":true/, 'the genuine hand-off is accepted');
        first.sock.destroy();
        const second = await rawLink(C, aCert, aKey, caPem);
        if (!second.sock) throw new Error(second.error ?? 'no link');
        second.sock.write(line);
        t.match(await answer(second.sock), /"ok":false,"code":"bad-mac"/, 'the same bytes on another TLS session are refused');
        const third = await rawLink(C, aCert, aKey, caPem);
        if (!third.sock) throw new Error(third.error ?? 'no link');
        const sealed = JSON.parse(sealHandOff(third.sock, aliceHandOff()).toString()) as { body: string; mac: string };
        const altered = { body: sealed.body.replace('"tag":"a1"', '"tag":"a2"'), mac: sealed.mac };
        third.sock.write(`${JSON.stringify(altered)}\n`);
        t.match(await answer(third.sock), /"code":"bad-mac"/, 'an altered body is refused');
        const nonce = newNonce();
        const fourth = await rawLink(C, aCert, aKey, caPem);
        const fifth = await rawLink(C, aCert, aKey, caPem);
        if (!fourth.sock || !fifth.sock) throw new Error('no link');
        fourth.sock.write(sealHandOff(fourth.sock, aliceHandOff({ nonce, kind: 'pop3', tag: null })));
        t.match(await answer(fourth.sock), /"ok":true/);
        fourth.sock.destroy();
        fifth.sock.write(sealHandOff(fifth.sock, aliceHandOff({ nonce, kind: 'pop3', tag: null })));
        t.match(await answer(fifth.sock), /"code":"replay"/, 'a nonce used once is refused, even re-sealed');
        fifth.sock.destroy();
        const stale = await rawLink(C, aCert, aKey, caPem);
        if (!stale.sock) throw new Error('no link');
        stale.sock.write(sealHandOff(stale.sock, aliceHandOff({ ts: Date.now() - 120_000 })));
        t.match(await answer(stale.sock), /"code":"stale"/, 'a hand-off two minutes old is refused');
      });

      await t.test('a hand-off for a user who does not live here, a hop loop, a lying sender, a mailbox outside the mail root', async (t) => {
        const cases: [Partial<HandOff>, RegExp][] = [
          [{ user: { ...aliceHandOff().user, address: `bob@${DOMAIN}`, home: 'B' } }, /"code":"not-home"/],
          [{ hops: 8 }, /"code":"hops"/],
          [{ from: 'B' }, /"code":"sender"/],
          [{ to: 'B' }, /"code":"addressee"/],
          [{ user: { ...aliceHandOff().user, allocation: { format: 'maildir', path: '/etc/pigeon-test-nowhere', node: 'C' } } }, /"code":"allocation"/],
        ];
        for (const [over, re] of cases) {
          const l = await rawLink(C, aCert, aKey, caPem);
          if (!l.sock) throw new Error('no link');
          l.sock.write(sealHandOff(l.sock, aliceHandOff(over)));
          t.match(await answer(l.sock), re);
        }
        t.match(C.log(), /Refused hand-off from A: hops: hop count 8 outside 1\.\.7/, 'the loop is logged');
        const l = await rawLink(C, aCert, aKey, caPem);
        if (!l.sock) throw new Error('no link');
        l.sock.write('{"body":"not json"\n');
        t.match(await answer(l.sock), /"ok":false/, 'garbage is refused, not a crash');
      });

      await t.test('a peer that stalls mid-hand-off is cut off after peer.handoff_timeout_s', async (t) => {
        const l = await rawLink(C, aCert, aKey, caPem);
        if (!l.sock) throw new Error('no link');
        l.sock.write('{"body":"{\\"proto\\":');
        const start = Date.now();
        const closed = await within(
          new Promise<void>((res) => {
            l.sock?.once('close', () => res());
            l.sock?.resume();
          }),
        );
        const ms = Date.now() - start;
        t.ok(closed, `closed after ${ms} ms (peer.handoff_timeout_s is 10)`);
        t.ok(await until(() => /Hand-off from A failed: no complete line within 10s/.test(C.log())), 'C logs why');
        const c = imap(A, `alice@${DOMAIN}`);
        await c.connect();
        t.ok(c.authenticated, 'C still serves');
        await c.logout();
      });
    });

    await t.test('a fourth node joins while the others run', async (t) => {
      const out = join(base, 'd-cert');
      const issued = A.run(['cert', 'issue', 'D', '--out', out]);
      t.equal(issued.status, 0, issued.stderr);
      const D = await makeNode(t, base, 'D', '127.0.0.5', db, out);
      await D.start();
      t.equal(A.run(['user', 'add', `dave@${DOMAIN}`, '--password-stdin', '--home', 'D'], 'secret\n').status, 0);
      t.match((await lmtpSend(B, [`dave@${DOMAIN}`], msg('hello dave')))[0], /^250 2\.0\.0 /, 'B delivers to D without a restart');
      const c = imap(A, `dave@${DOMAIN}`);
      await c.connect();
      const st = await c.status('INBOX', { messages: true });
      await c.logout();
      t.equal(st ? st.messages : -1, 1, 'a client at A reads dave\'s mailbox on D');
      const ns = JSON.parse(A.run(['node', 'list', '--json']).stdout) as { name: string; health: string }[];
      t.same(ns.find((n) => n.name === 'D')?.health, 'up');

      await t.test('disabling a node closes its links at once and refuses new ones; enabling restores', async (t) => {
        const c = imap(A, `alice@${DOMAIN}`);
        await c.connect();
        const closed = new Promise<void>((res) => c.once('close', () => res()));
        t.equal(D.run(['node', 'disable', 'A']).status, 0);
        t.ok(await within(closed), 'the session A had relayed to C was cut');
        t.match(C.log(), /Closing link from A: node A is disabled/);
        const again = imap(A, `alice@${DOMAIN}`);
        await t.rejects(again.connect(), 'a new login at A for a user on C fails while A is disabled');
        t.match(A.log(), /Backend failure: node C refused the hand-off \(refused\)|Backend failure: .*A is disabled/);
        t.equal(D.run(['node', 'enable', 'A']).status, 0);
        // C notices when it re-reads the registry (each second): log in until it has
        const back = await until(async () => {
          const c = imap(A, `alice@${DOMAIN}`);
          const ok = await c.connect().then(
            () => c.authenticated === true,
            () => false,
          );
          if (ok) await c.logout();
          return ok;
        });
        t.ok(back, 'after enable, A reaches C again');
      });

      await t.test('a removed node that comes back is refused', async (t) => {
        const user = A.run(['user', 'del', `dave@${DOMAIN}`]);
        t.equal(user.status, 0);
        await D.stop();
        const rm = A.run(['node', 'remove', 'D']);
        t.equal(rm.status, 0, rm.stderr);
        const r = await D.startFails();
        t.equal(r.code, 78, 'serve on the removed node exits 78');
        t.match(r.stderr, /revoked when node D was removed/);
        // the others re-read the registry each second: link until C has
        let got: string | null = null;
        await until(async () => /revoked/.test((got = await linkAnswer(C, readFileSync(join(D.dir, 'certs', 'node.crt')), readFileSync(join(D.dir, 'certs', 'node.key')), caPem)) ?? ''));
        t.match(got, /"ok":false.*revoked/, 'its certificate is refused on the peer link');
      });
    });

    await t.test('two nodes with one name: the second refuses to start', async (t) => {
      const E = await makeNode(t, base, 'E', '127.0.0.6', db, A.dir);
      const yaml = readFileSync(join(E.dir, 'pigeon.yaml'), 'utf8').replace(/^node: "E"$/m, 'node: "B"');
      spawnSync('sh', ['-c', `cat > ${join(E.dir, 'pigeon.yaml')}`], { input: yaml });
      const r = await E.startFails();
      t.equal(r.code, 78);
      t.match(r.stderr, /certificate names node "E", expected "B"/);
      const other = join(base, 'F');
      const init = pigeon(null, ['init', other, '--node', 'B', '--db', db, '--ca-from', A.dir]);
      t.equal(init.status, 78, 'init of a second B is refused');
      t.match(init.stderr, /already registered with another certificate/);
    });

    await t.test('moving a user while mail keeps arriving loses nothing', async (t) => {
      for (let i = 0; i < 5; i++) t.match((await lmtpSend(A, [`mover@${DOMAIN}`], msg(`before ${i}`)))[0], /^250/);
      t.equal(mailFiles(C, `mover@${DOMAIN}`).length, 5);
      const session = imap(C, `mover@${DOMAIN}`);
      await session.connect();
      const ended = new Promise<void>((res) => session.once('close', () => res()));
      let stop = false;
      let sent = 5;
      const deferred: string[] = [];
      const sender = (async () => {
        let i = 0;
        while (!stop) {
          const subject = `during ${i++}`;
          // an MTA: retry a deferred message until it is accepted
          for (;;) {
            const r = (await lmtpSend(A, [`mover@${DOMAIN}`], msg(subject)))[0] ?? '';
            if (r.startsWith('250')) break;
            deferred.push(r);
            await new Promise((res) => setTimeout(res, 300)); // the MTA's retry pace, not a wait for anything
          }
          sent++;
        }
      })();
      // not spawnSync: the "MTA" above keeps delivering while the move runs. The settle time (the
      // user is marked moving, deliveries defer) is long enough for the MTA to hit it under load
      const moving = startCli(['-c', A.dir, 'user', 'move', `mover@${DOMAIN}`, '--to', 'B', '--settle', '10']);
      t.ok(await until(() => deferred.length > 0), 'a delivery during the move was deferred');
      const mv = await moving;
      t.equal(mv.code, 0, mv.err);
      t.match(mv.out, /moved mover@example\.test from C to B/);
      const sentAtMove = sent;
      t.ok(await until(() => sent > sentAtMove + 1), 'deliveries go on after the move');
      stop = true;
      await sender;
      t.ok(await within(ended), 'the session on the old home was ended');
      t.ok(deferred.length > 0 && deferred.every((d) => /^4\d\d 4\.2\.0 .*being moved/.test(d)), `deliveries during the copy were deferred (4.2.0), ${deferred.length} times`);
      t.equal(userRow(A, `mover@${DOMAIN}`).home, 'B');
      const c = imap(A, `mover@${DOMAIN}`);
      await c.connect();
      const st = await c.status('INBOX', { messages: true });
      await c.logout();
      t.equal(st ? st.messages : -1, sent, `all ${sent} messages are in the mailbox on B, read through A`);
      t.equal(mailFiles(B, `mover@${DOMAIN}`).length, sent);
    });

    await t.test('re-issuing a node certificate before expiry: both accepted until the node restarts with the new one', async (t) => {
      const out = join(base, 'b-reissue');
      const r = A.run(['cert', 'issue', 'B', '--out', out, '--days', '10']);
      t.equal(r.status, 0, r.stderr);
      const oldCert = readFileSync(join(B.dir, 'certs', 'node.crt'));
      const oldKey = readFileSync(join(B.dir, 'certs', 'node.key'));
      const bobAtA = async (): Promise<number> => {
        const c = imap(A, `bob@${DOMAIN}`);
        await c.connect();
        const st = await c.status('INBOX', { messages: true });
        await c.logout();
        return st ? (st.messages ?? -1) : -1;
      };
      t.equal(await bobAtA(), 0, 'B still serves with its current certificate');
      copyFileSync(join(out, 'node.crt'), join(B.dir, 'certs', 'node.crt'));
      copyFileSync(join(out, 'node.key'), join(B.dir, 'certs', 'node.key'));
      await B.stop();
      await B.start();
      t.match(B.startErr, /node B now uses its re-issued certificate/);
      t.match(B.startErr, /certificate expires in 9 days; re-issue it/, 'a warning while expiry is near');
      t.equal(await bobAtA(), 0, 'A reaches B with the new certificate');
      t.match((await lmtpSend(C, [`bob@${DOMAIN}`], msg('to bob after re-issue')))[0], /^250/, 'and C delivers to B');
      // every node re-reads the registry each second: link until C has
      let got: string | null = null;
      await until(async () => /registered fingerprint/.test((got = await linkAnswer(C, oldCert, oldKey, caPem)) ?? ''));
      t.match(got, /"ok":false.*does not match its registered fingerprint/, 'the replaced certificate is no longer accepted');
    });

    await t.test('the home node dies mid-session and stays down: clear temporary failures, A keeps serving', async (t) => {
      const c = imap(A, `alice@${DOMAIN}`);
      await c.connect();
      const closed = new Promise<void>((res) => c.once('close', () => res()));
      await C.stop('SIGKILL');
      t.ok(await within(closed), 'the client at A is disconnected');
      const w = await wireTo(A.ip, A.ports['imap'] ?? 0);
      await w.until(/^\* OK/m);
      w.write(`a1 LOGIN alice@${DOMAIN} secret\r\n`);
      t.match(await w.until(/^a1 /m, BOUND_MS), /a1 NO \[UNAVAILABLE\]/, 'IMAP login for a user on C: NO [UNAVAILABLE]');
      w.write('a2 LOGOUT\r\n');
      const p = await wireTo(A.ip, A.ports['pop3'] ?? 0);
      await p.until(/^\+OK/m);
      p.write(`USER alice@${DOMAIN}\r\nPASS secret\r\n`);
      t.match(await p.until(/^-ERR/m, BOUND_MS), /-ERR \[SYS\/TEMP\]/, 'POP3: -ERR [SYS/TEMP]');
      p.write('QUIT\r\n');
      t.ok(
        await until(() => /imap-login: Disconnected \(internal failure, 1 successful auths in \d+ secs\): user=<alice@example\.test>/.test(A.log()) && /pop3-login: Disconnected \(internal failure/.test(A.log())),
        'the right password with an unreachable home is logged as an internal failure',
      );
      t.notMatch(A.log(), /Disconnected \(auth failed[^\n]*user=<alice@example\.test>/, 'never as "auth failed" (fail2ban would ban a real user)');
      const r = await lmtpSend(A, [`alice@${DOMAIN}`], msg('while C is down'));
      t.match(r[0], /^4\d\d 4\.4\.1 .*node C/, 'LMTP: temporary failure, the MTA retries');
      const d = spawnSync(process.execPath, [CLI, '-c', A.dir, 'deliver', `alice@${DOMAIN}`], { input: msg('pipe while C is down'), encoding: 'utf8' });
      t.equal(d.status, 75, 'pigeon deliver exits 75 (EX_TEMPFAIL)');
      const anna = imap(A, `anna@${DOMAIN}`);
      await anna.connect();
      t.ok(anna.authenticated, 'a user homed on A still logs in at A');
      await anna.logout();
      await C.start();
      t.match((await lmtpSend(A, [`alice@${DOMAIN}`], msg('after C is back')))[0], /^250/, 'once C is back, mail flows again');
    });
  });
}
