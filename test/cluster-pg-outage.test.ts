// PostgreSQL stopped while two nodes (A on 127.0.0.2, B on 127.0.0.3, nothing shared but the
// database) serve logins and deliveries, then started again: logins answer NO [UNAVAILABLE] /
// -ERR [SYS/TEMP], LMTP 451 4.3.0, `pigeon deliver` exits 75; both serves stay up, each logs one
// line when the database goes and one when it is back (not one per request or per duty); they
// recover with no restart, and every message that got a 250 is in its mailbox exactly once.
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { CLI } from './helpers/instance.js';
import { lmtpSend } from './helpers/cluster.js';
import { startPostgres } from './helpers/postgres.js';
import { requireProgram } from './helpers/programs.js';
import { DOMAIN, msg, twoNodes, imapLogin, pop3Login, mta, subjectCounts, notExactlyOnce, until, lines } from './helpers/pg-cluster.js';

// tap's per-file timeout: about 40 s alone (a server, two nodes, an outage); two suites at once
// on 2 cores make a file take 2-3 times as long
t.setTimeout(300_000);

const DOWN = /database: .*logins and deliveries get a temporary failure until it is back/;
const BACK = /database: database .* is available again/;

t.test('PostgreSQL stopped during logins and deliveries, then started again', async (t) => {
  if (!requireProgram(t, '/usr/lib/dovecot/imap', 'dovecot-imapd')) return;
  const pg = await startPostgres(t);
  if (!pg) return;
  const { A, B } = await twoNodes(t, pg.url);
  t.match(await imapLogin(B, `alice@${DOMAIN}`), /^a1 OK/, 'a login at B for alice (home A) works');
  t.notOk(readFileSync(`/proc/${A.child?.pid ?? 0}/cmdline`, 'utf8').includes('postgres'), 'serve\'s arguments carry no database URL (it reads pigeon.yaml)');

  const toAlice = mta(B, `alice@${DOMAIN}`, 'alice via B');
  const toBob = mta(A, `bob@${DOMAIN}`, 'bob via A');
  t.ok(await until(() => toAlice.accepted.length >= 2 && toBob.accepted.length >= 2), 'mail flows before the outage');

  await pg.stop('fast');
  t.match(await imapLogin(A, `alice@${DOMAIN}`), /^a1 NO \[UNAVAILABLE\]/, 'IMAP at A: NO [UNAVAILABLE]');
  t.match(await imapLogin(B, `alice@${DOMAIN}`), /^a1 NO \[UNAVAILABLE\]/, 'IMAP at B (a hand-off would follow): NO [UNAVAILABLE]');
  t.match(await pop3Login(A, `bob@${DOMAIN}`), /^-ERR \[SYS\/TEMP\]/, 'POP3: -ERR [SYS/TEMP]');
  const r = await lmtpSend(A, [`alice@${DOMAIN}`], msg('while down'));
  t.match(r[0], /^451 4\.3\.0 /, 'LMTP: 451 4.3.0');
  const d = spawnSync(process.execPath, [CLI, '-c', B.dir, 'deliver', `bob@${DOMAIN}`], { input: msg('pipe while down'), encoding: 'utf8' });
  t.equal(d.status, 75, `pigeon deliver exits 75 (${d.stdout.trim()})`);
  t.ok(await until(() => toAlice.deferred.length >= 3 && toBob.deferred.length >= 3), 'the MTAs keep getting deferrals');
  for (let i = 0; i < 5; i++) t.match(await imapLogin(A, `bob@${DOMAIN}`), /^a1 NO \[UNAVAILABLE\]/);
  t.equal(A.child?.exitCode ?? null, null, 'A is still running');
  t.equal(B.child?.exitCode ?? null, null, 'B is still running');
  // serve (one worker) logs the outage once; deliver and lmtp processes log their own
  const serveLines = (log: string): string => log.split('\n').filter((l) => !/\bdeliver\b|lmtp\[/.test(l)).join('\n');
  t.ok(await until(() => lines(serveLines(A.log()), DOWN) >= 1), 'A logs the outage');
  t.equal(lines(serveLines(A.log()), DOWN), 1, `A logs it once (${toBob.deferred.length} deferrals, 8 failed logins)`);
  t.ok(lines(A.log(), /node registry refresh failed/) <= 1, 'the registry refresh (every second) logs its failure at most once');

  const started = Date.now();
  await pg.start();
  t.ok(await until(async () => /^a1 OK/.test(await imapLogin(B, `alice@${DOMAIN}`)), 30_000), 'logins resume without a restart');
  const n = toAlice.accepted.length;
  t.ok(await until(() => toAlice.accepted.length > n + 1), 'deliveries resume');
  t.comment(`service back ${Date.now() - started} ms after the server's start`);
  t.ok(await until(() => lines(serveLines(A.log()), BACK) >= 1), 'A logs that the database is back');
  t.equal(lines(serveLines(A.log()), BACK), 1, 'once');
  t.ok(await until(() => lines(A.log(), /node registry refresh works again/) === lines(A.log(), /node registry refresh failed/)), 'and a failed duty says it works again');
  await Promise.all([toAlice.stop(), toBob.stop()]);
  t.same(notExactlyOnce(subjectCounts(A, 'alice'), toAlice.accepted), [], `all ${toAlice.accepted.length} accepted messages for alice exactly once (${toAlice.deferred.length} deferrals)`);
  t.same(notExactlyOnce(subjectCounts(B, 'bob'), toBob.accepted), [], `all ${toBob.accepted.length} accepted messages for bob exactly once (${toBob.deferred.length} deferrals)`);
  t.notOk(subjectCounts(A, 'alice').has('while down'), 'the deferred LMTP message was not stored');
  t.notOk(subjectCounts(B, 'bob').has('pipe while down'), 'nor the deferred pipe delivery');
});
