// A primary with a streaming standby (pg_basebackup -R), two nodes on the multi-host URL
// `postgres://…@primary,standby/pigeon?target_session_attrs=read-write`: the primary is stopped
// while MTAs deliver, the standby promoted, and logins and deliveries resume within 10 s of the
// promotion without restarting a node; every message that got a 250 is in its mailbox exactly once.
import t from 'tap';
import { startPostgres } from './helpers/postgres.js';
import { requireProgram } from './helpers/programs.js';
import { DOMAIN, twoNodes, imapLogin, mta, subjectCounts, notExactlyOnce, until } from './helpers/pg-cluster.js';

// tap's per-file timeout: about 40 s alone (two servers, two nodes); two suites at once on 2
// cores make a file take 2-3 times as long
t.setTimeout(300_000);

const RESUME_MS = 10_000;

t.test('the primary stops, the standby is promoted: service resumes within 10 s, nothing lost or doubled', async (t) => {
  if (!requireProgram(t, '/usr/lib/dovecot/imap', 'dovecot-imapd')) return;
  const primary = await startPostgres(t);
  if (!primary) return;
  const standby = await primary.addStandby();
  const url = `postgres://pigeon@127.0.0.1:${primary.port},127.0.0.1:${standby.port}/pigeon?target_session_attrs=read-write`;
  const { A, B } = await twoNodes(t, url);
  t.match(A.run(['db', 'status']).stdout, `127.0.0.1:${primary.port}`, 'db status: connected to the primary');
  const toAlice = mta(B, `alice@${DOMAIN}`, 'alice via B');
  const toBob = mta(A, `bob@${DOMAIN}`, 'bob via A');
  t.ok(await until(() => toAlice.accepted.length >= 2 && toBob.accepted.length >= 2), 'mail flows before the failover');

  await primary.stop('immediate');
  t.match(await imapLogin(A, `alice@${DOMAIN}`), /^a1 NO \[UNAVAILABLE\]/, 'no primary: NO [UNAVAILABLE] (the standby is read-only)');
  await standby.promote();
  const promoted = Date.now();
  const loginBack = until(async () => /^a1 OK/.test(await imapLogin(B, `alice@${DOMAIN}`)), 60_000).then((ok) => (ok ? Date.now() - promoted : -1));
  const a0 = toAlice.accepted.length;
  const b0 = toBob.accepted.length;
  const mailBack = until(() => toAlice.accepted.length > a0 && toBob.accepted.length > b0, 60_000).then((ok) => (ok ? Date.now() - promoted : -1));
  const [login, mail] = await Promise.all([loginBack, mailBack]);
  t.ok(login >= 0 && login <= RESUME_MS, `logins resume ${login} ms after the promotion (≤ ${RESUME_MS})`);
  t.ok(mail >= 0 && mail <= RESUME_MS, `deliveries at both nodes resume ${mail} ms after the promotion (≤ ${RESUME_MS})`);
  t.equal(A.child?.exitCode ?? null, null, 'A was not restarted');
  t.equal(B.child?.exitCode ?? null, null, 'B was not restarted');
  const st = A.run(['db', 'status']).stdout;
  t.match(st, `connected:  127.0.0.1:${standby.port} as pigeon`, 'db status: connected to the promoted standby');
  t.match(st, /\(primary\)/, 'now a primary');
  t.equal(A.run(['user', 'add', `carol@${DOMAIN}`, '--password-stdin', '--home', 'B'], 'secret\n').status, 0, 'writes work on the new primary');
  t.match(await imapLogin(A, `carol@${DOMAIN}`), /^a1 OK/, 'a user added after the failover logs in at the other node');
  await Promise.all([toAlice.stop(), toBob.stop()]);
  t.same(notExactlyOnce(subjectCounts(A, 'alice'), toAlice.accepted), [], `all ${toAlice.accepted.length} accepted messages for alice exactly once (${toAlice.deferred.length} deferrals)`);
  t.same(notExactlyOnce(subjectCounts(B, 'bob'), toBob.accepted), [], `all ${toBob.accepted.length} accepted messages for bob exactly once (${toBob.deferred.length} deferrals)`);
});
