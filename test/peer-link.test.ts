// The peer link's keys and its pool of spare links, with real nodes (`pigeon serve` on 127.0.0.N,
// one shared SQLite file), real TLS 1.3 between them, Dovecot behind and imapflow in front:
// - mixed keys: an EC-keyed node joins a cluster whose CA and first node are RSA, and an RSA node
//   joins a cluster whose CA is EC; sessions cross the link both ways;
// - the pool never hands a session a dead link: spares the home node closed while they waited
//   (its own idle limit is shorter than ours) cost nothing; a home node that is killed gives a
//   clean `NO [UNAVAILABLE]`, never a hang;
// - a disabled node's spares are closed by the next registry refresh, not when they expire.
import t from 'tap';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { makeNode, metrics, inboxAt, loginAnswer, until, type ClusterNode } from './helpers/cluster.js';
import { scratchDir } from './helpers/instance.js';
import { requireProgram } from './helpers/programs.js';
import { keyTypeOf } from '../certs/ca.js';

t.setTimeout(420_000);

const DOMAIN = 'example.test';

const count = (text: string, re: RegExp): number => text.match(new RegExp(re.source, 'g'))?.length ?? 0;
const pooled = async (n: ClusterNode, to: string): Promise<number> => (await metrics(n)).get(`pigeon_peer_links_pooled{to="${to}"}`) ?? 0;

for (const [caKey, joinerKey] of [
  ['rsa', 'ec'],
  ['ec', 'rsa'],
] as const) {
  t.test(`a ${joinerKey} node joins a cluster whose CA and first node are ${caKey}: sessions cross the link both ways`, async (t) => {
    if (!requireProgram(t, '/usr/lib/dovecot/imap', 'dovecot-imapd')) return;
    const base = scratchDir(t);
    const A = await makeNode(t, base, 'A', '127.0.0.2', null, null, '', ['--key', caKey]);
    const B = await makeNode(t, base, 'B', '127.0.0.3', join(base, 'A', 'pigeon.db'), A.dir, '', ['--key', joinerKey]);
    t.equal(keyTypeOf(readFileSync(join(A.dir, 'certs', 'ca.key'), 'utf8')), caKey, `the CA key is ${caKey}`);
    t.equal(keyTypeOf(readFileSync(join(A.dir, 'certs', 'node.key'), 'utf8')), caKey, `node A's key is ${caKey}`);
    t.equal(keyTypeOf(readFileSync(join(B.dir, 'certs', 'node.key'), 'utf8')), joinerKey, `node B joined with a ${joinerKey} key`);
    A.run(['domain', 'add', DOMAIN]);
    for (const [u, home] of [
      ['onb', 'B'],
      ['ona', 'A'],
    ] as const) {
      t.equal(A.run(['user', 'add', `${u}@${DOMAIN}`, '--password-stdin', '--home', home], 'secret\n').status, 0, `user ${u} added`);
    }
    await Promise.all([A.start(), B.start()]);
    t.equal(await inboxAt(A, `onb@${DOMAIN}`), 0, `a user on B logs in at A (A's ${caKey} key dials B's ${joinerKey} key)`);
    t.equal(await inboxAt(B, `ona@${DOMAIN}`), 0, `a user on A logs in at B (B's ${joinerKey} key dials A's ${caKey} key)`);
    t.equal((await metrics(A)).get('pigeon_peer_handoffs_received_total{kind="imap",result="accepted"}'), 1, 'A accepted the session from B');
    t.equal((await metrics(B)).get('pigeon_peer_handoffs_received_total{kind="imap",result="accepted"}'), 1, 'B accepted the session from A');
  });
}

t.test('the pool never hands a session a dead link', async (t) => {
  if (!requireProgram(t, '/usr/lib/dovecot/imap', 'dovecot-imapd')) return;
  const base = scratchDir(t);
  // A keeps spares for 60 s; B drops a link that brings no hand-off within 2 s: B closes A's
  // spares long before A would
  const A = await makeNode(t, base, 'A', '127.0.0.2', null, null, 'peer:\n  handoff_timeout_s: 120\n  pool_idle_s: 60\n  pool_size: 3\n');
  const B = await makeNode(t, base, 'B', '127.0.0.3', join(base, 'A', 'pigeon.db'), A.dir, 'peer:\n  handoff_timeout_s: 2\n');
  A.run(['domain', 'add', DOMAIN]);
  t.equal(A.run(['user', 'add', `onb@${DOMAIN}`, '--password-stdin', '--home', 'B'], 'secret\n').status, 0);
  await Promise.all([A.start(), B.start()]);

  t.equal(await inboxAt(A, `onb@${DOMAIN}`), 0, 'a user on B logs in at A');
  t.ok(await until(async () => (await pooled(A, 'B')) > 0), 'A keeps spare links to B');
  // B closes them (its hand-off timeout); A's pool notices each close
  t.ok(await until(() => /Hand-off from A failed: no complete line within 2s/.test(B.log())), 'B closed an idle spare');
  t.ok(await until(async () => (await pooled(A, 'B')) === 0), "A's pool dropped the links B closed");
  const before = (await metrics(A)).get('pigeon_peer_handoffs_sent_total{kind="imap",result="ok"}') ?? 0;
  t.equal(await inboxAt(A, `onb@${DOMAIN}`), 0, 'the next login works');
  t.equal((await metrics(A)).get('pigeon_peer_handoffs_sent_total{kind="imap",result="ok"}'), before + 1, 'over a fresh link');
  t.notMatch(A.log(), /did not answer the hand-off|Backend failure/, 'no session was given a dead link');

  // the home node dies while A holds spares to it: a clean temporary failure, then it comes back
  t.ok(await until(async () => (await pooled(A, 'B')) > 0), 'A holds spares again');
  await B.stop('SIGKILL');
  t.match(await loginAnswer(A, `onb@${DOMAIN}`), /^a1 NO \[UNAVAILABLE\]/, 'B down: NO [UNAVAILABLE], no hang');
  t.equal(await pooled(A, 'B'), 0, 'no spare to a dead node is kept');
  await B.start();
  t.equal(await inboxAt(A, `onb@${DOMAIN}`), 0, 'B back: the user logs in at A again');
});

t.test("a disabled node's spare links are closed at the next registry refresh", async (t) => {
  if (!requireProgram(t, '/usr/lib/dovecot/imap', 'dovecot-imapd')) return;
  const base = scratchDir(t);
  // spares would wait 60 s (and B would wait 120 s for their hand-off): only the refresh closes them
  const conf = 'peer:\n  handoff_timeout_s: 120\n  pool_idle_s: 60\n  pool_size: 2\n';
  const A = await makeNode(t, base, 'A', '127.0.0.2', null, null, conf);
  const B = await makeNode(t, base, 'B', '127.0.0.3', join(base, 'A', 'pigeon.db'), A.dir, conf);
  A.run(['domain', 'add', DOMAIN]);
  t.equal(A.run(['user', 'add', `onb@${DOMAIN}`, '--password-stdin', '--home', 'B'], 'secret\n').status, 0);
  await Promise.all([A.start(), B.start()]);
  t.equal(await inboxAt(A, `onb@${DOMAIN}`), 0, 'a user on B logs in at A');
  t.ok(await until(async () => (await pooled(A, 'B')) === 2), 'A keeps pool_size (2) spare links to B');
  const unusedBefore = count(B.log(), /Link from A closed unused/);
  t.equal(A.run(['node', 'disable', 'B']).status, 0, 'node disable B');
  t.ok(await until(async () => (await pooled(A, 'B')) === 0, 30_000), "A closed its spares to B (well before they would expire)");
  t.ok(await until(() => count(B.log(), /Link from A closed unused/) >= unusedBefore + 2, 30_000), 'B saw both spares closed, unused');
  t.match(await loginAnswer(A, `onb@${DOMAIN}`), /^a1 NO \[UNAVAILABLE\]/, 'a user on the disabled node: NO [UNAVAILABLE]');
  t.equal(await pooled(A, 'B'), 0, 'and no new spare to it');
});
