// TLS 1.3 session resumption on peer links (peer.resume_s, src/peer/link.ts), with real nodes
// (`pigeon serve` on 127.0.0.N, one shared SQLite file), Dovecot behind and imapflow in front:
// - after one full handshake, the next links from A to B resume its session (both nodes count
//   them: pigeon_peer_handshakes_total{side,kind}), and the sessions they carry work;
// - a resumed link is still checked against the registry: once A is disabled, B refuses A's next
//   link although it resumed (A counted it resumed; the client gets NO [UNAVAILABLE]); enabled
//   again, logins work again;
// - B restarted: its new process cannot read A's ticket, the next link is a full handshake and
//   the login works;
// - a node with peer.resume_s: 0 issues no tickets: every link to it is a full handshake;
// - a link refused for its certificate (none, or one from another CA) gets no session ticket;
// - a node with two workers: a ticket one worker issued resumes at the other (node:cluster gives
//   every worker the first one's ticket key), so both run sessions and still only the first link
//   was a full handshake.
import t, { type Test } from 'tap';
import { join } from 'node:path';
import { readFileSync } from 'node:fs';
import { connect as tlsConnect } from 'node:tls';
import { makeNode, metrics, inboxAt, loginAnswer, until, type ClusterNode } from './helpers/cluster.js';
import { scratchDir } from './helpers/instance.js';
import { requireProgram } from './helpers/programs.js';

t.setTimeout(300_000);

const DOMAIN = 'example.test';
/**
 * Wait until A's links to B are at rest: its pool holds pool_size (2) spares, so no refill is
 * under way, and B has counted every link A counted (B counts after its registry check, a moment
 * after A): only then are the two nodes' handshake counters comparable.
 */
async function atRest(A: ClusterNode, B: ClusterNode): Promise<boolean> {
  return until(async () => {
    const a = await metrics(A);
    const b = await metrics(B);
    const dialed = (a.get('pigeon_peer_handshakes_total{side="dialed",kind="full"}') ?? 0) + (a.get('pigeon_peer_handshakes_total{side="dialed",kind="resumed"}') ?? 0);
    const accepted = (b.get('pigeon_peer_handshakes_total{side="accepted",kind="full"}') ?? 0) + (b.get('pigeon_peer_handshakes_total{side="accepted",kind="resumed"}') ?? 0);
    return a.get('pigeon_peer_links_pooled{to="B"}') === 2 && dialed === accepted;
  });
}

/** pigeon_peer_handshakes_total of `n` for one side and kind */
async function handshakes(n: ClusterNode, side: 'dialed' | 'accepted', kind: 'full' | 'resumed'): Promise<number> {
  return (await metrics(n)).get(`pigeon_peer_handshakes_total{side="${side}",kind="${kind}"}`) ?? 0;
}

// spares would wait 60 s and B waits 120 s for their hand-off: no link closes on its own during the test
const CONF = 'peer:\n  handoff_timeout_s: 120\n  pool_idle_s: 60\n  pool_size: 2\n';

/** Nodes A (CA, database) and B (`bConf` added, `bWorkers` workers), a user on B, both running. */
async function twoNodes(t: Test, bConf = '', bWorkers = 1): Promise<{ A: ClusterNode; B: ClusterNode }> {
  const base = scratchDir(t);
  const A = await makeNode(t, base, 'A', '127.0.0.2', null, null, CONF);
  const B = await makeNode(t, base, 'B', '127.0.0.3', join(base, 'A', 'pigeon.db'), A.dir, CONF + bConf);
  A.run(['domain', 'add', DOMAIN]);
  t.equal(A.run(['user', 'add', `onb@${DOMAIN}`, '--password-stdin', '--home', 'B'], 'secret\n').status, 0, 'a user on B');
  await Promise.all([A.start(), B.start(bWorkers)]);
  return { A, B };
}

t.test('links resume the session of a full handshake, and are still checked against the registry', async (t) => {
  if (!requireProgram(t, '/usr/lib/dovecot/imap', 'dovecot-imapd')) return;
  const { A, B } = await twoNodes(t);

  // the pool holds 2 spares: 6 logins use them up and dial more, after the first full handshake
  for (let i = 0; i < 6; i++) t.equal(await inboxAt(A, `onb@${DOMAIN}`), 0, `login ${i + 1} at A, mailbox on B`);
  t.ok(await atRest(A, B), "A's pool to B is full and B counted every link A made");
  t.ok((await handshakes(A, 'dialed', 'resumed')) >= 4, 'A resumed most of its links to B');
  const full = await handshakes(A, 'dialed', 'full');
  t.ok(full >= 1 && full <= 2, `A made one full handshake with B (${full}; two links may have started at once)`);
  t.equal(await handshakes(B, 'accepted', 'resumed'), await handshakes(A, 'dialed', 'resumed'), 'B accepted as many resumed links as A made');
  t.equal(await handshakes(B, 'accepted', 'full'), full, 'and as many full ones');
  t.equal((await metrics(B)).get('pigeon_peer_handoffs_received_total{kind="imap",result="accepted"}'), 6, 'B ran all six sessions');

  // A disabled: B refuses A's links, resumed or not (B closes A's spares at its registry refresh)
  const refusedBefore = (await metrics(B)).get('pigeon_peer_links_refused_total{reason="registry"}') ?? 0;
  t.equal(A.run(['node', 'disable', 'A']).status, 0, 'node disable A');
  t.ok(await until(() => /Closing link from A: /.test(B.log())), "B closed A's spare links");
  const resumedBefore = await handshakes(A, 'dialed', 'resumed');
  t.match(await loginAnswer(A, `onb@${DOMAIN}`), /^a1 NO \[UNAVAILABLE\]/, 'A disabled: its user on B gets NO [UNAVAILABLE]');
  t.ok((await handshakes(A, 'dialed', 'resumed')) > resumedBefore, 'the refused link was a resumed one');
  t.ok(((await metrics(B)).get('pigeon_peer_links_refused_total{reason="registry"}') ?? 0) > refusedBefore, 'B refused it by the registry');
  t.match(B.log(), /Refused link from A: node A is disabled/, 'and logged why');
  t.equal(A.run(['node', 'enable', 'A']).status, 0, 'node enable A');
  t.ok(await until(async () => (await loginAnswer(A, `onb@${DOMAIN}`)).startsWith('a1 OK')), 'enabled again: the login works');

  // B restarted: a new process with a new ticket key, A's ticket is of no use there
  await B.stop('SIGTERM');
  await B.start();
  const fullBefore = await handshakes(A, 'dialed', 'full');
  const logFrom = A.log().length;
  t.equal(await inboxAt(A, `onb@${DOMAIN}`), 0, 'B restarted: the login at A works');
  t.ok((await handshakes(A, 'dialed', 'full')) > fullBefore, 'over a full handshake');
  t.notMatch(A.log().slice(logFrom), /did not answer the hand-off|Backend failure/, 'no session failed on the way');
});

t.test('a node with peer.resume_s: 0 takes full handshakes only', async (t) => {
  if (!requireProgram(t, '/usr/lib/dovecot/imap', 'dovecot-imapd')) return;
  const { A, B } = await twoNodes(t, '  resume_s: 0\n');
  for (let i = 0; i < 4; i++) t.equal(await inboxAt(A, `onb@${DOMAIN}`), 0, `login ${i + 1} at A, mailbox on B`);
  t.ok(await until(async () => (await handshakes(B, 'accepted', 'full')) >= 4), 'B accepted a full handshake per link');
  t.equal(await handshakes(B, 'accepted', 'resumed'), 0, 'and no resumed one');
  t.equal(await handshakes(A, 'dialed', 'resumed'), 0, 'A resumed none');
});

t.test('the workers of one node share the ticket key: a link resumes at either', async (t) => {
  if (!requireProgram(t, '/usr/lib/dovecot/imap', 'dovecot-imapd')) return;
  const { A, B } = await twoNodes(t, '', 2);
  // the kernel gives each new link to one of B's two workers: log in until both ran a session
  // from A (their log lines carry their pids), within a bound
  const workersSeen = (): Set<string> => new Set([...B.log().matchAll(/pigeon\[(\d+)\]: imap\(onb@[^)]*\): Login: from=A/g)].map((m) => m[1] ?? ''));
  let logins = 0;
  while (workersSeen().size < 2 && logins < 60) {
    t.equal(await inboxAt(A, `onb@${DOMAIN}`), 0, `login ${++logins} at A, mailbox on B`);
  }
  t.equal(workersSeen().size, 2, `both of B's workers ran sessions from A (${logins} logins)`);
  t.ok(await atRest(A, B), "A's pool to B is full and B counted every link A made");
  const full = await handshakes(A, 'dialed', 'full');
  t.ok(full >= 1 && full <= 2, `A made one full handshake (${full}; two links may have started at once)`);
  t.equal(await handshakes(B, 'accepted', 'full'), full, 'B accepted no other: links resumed at either worker');
  t.ok((await handshakes(B, 'accepted', 'resumed')) >= logins - 2, 'the rest were resumed');
});

/** One TLS 1.3 link to a peer listener as a stranger would open it: any session ticket it got, and how many bytes came before the close. */
async function strangerLink(ip: string, port: number, creds: { cert: Buffer; key: Buffer } | null): Promise<{ ticket: Buffer | null; bytes: number }> {
  const s = tlsConnect({ host: ip, port, rejectUnauthorized: false, minVersion: 'TLSv1.3', maxVersion: 'TLSv1.3', ...(creds ?? {}) });
  let ticket: Buffer | null = null;
  let bytes = 0;
  s.on('session', (x: Buffer) => (ticket ??= x));
  s.on('data', (d: Buffer) => (bytes += d.length));
  s.on('error', () => undefined);
  await new Promise<void>((res) => s.once('close', () => res()));
  return { ticket, bytes };
}

t.test('a link refused for its certificate gets no session ticket to resume', async (t) => {
  const base = scratchDir(t);
  const A = await makeNode(t, base, 'A', '127.0.0.2', null, null, CONF);
  // X: a node of another cluster (its own CA); never started, only its certificate is used
  const X = await makeNode(t, base, 'X', '127.0.0.4', null, null);
  const foreign = { cert: readFileSync(join(X.dir, 'certs', 'node.crt')), key: readFileSync(join(X.dir, 'certs', 'node.key')) };
  await A.start();
  const refusals = (): number => A.log().match(/Refused link \(certificate: /g)?.length ?? 0;
  for (const [who, creds] of [
    ['no certificate', null],
    ['a certificate of another CA', foreign],
  ] as const) {
    const before = refusals();
    const one = await strangerLink(A.ip, A.peerPort, creds);
    t.equal(one.bytes, 0, `${who}: the link is closed without a word`);
    t.ok(await until(() => refusals() > before), `${who}: refused for its certificate`);
    // the listener closes it before node:tls writes the tickets OpenSSL made at the end of the
    // handshake (OpenSSL would report a resumed session without a certificate as verified; the
    // listener wants a certificate and its registry entry anyway)
    t.equal(one.ticket, null, `${who}: no session ticket reached it: nothing to resume`);
  }
  t.equal((await handshakes(A, 'accepted', 'full')) + (await handshakes(A, 'accepted', 'resumed')), 0, 'no handshake counted as accepted');
});
