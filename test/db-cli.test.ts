// The mail admin's side of a PostgreSQL database, through the real CLI and a private server
// (test/helpers/postgres.ts) that wants a password: `init --db postgres://…` (the URL with its
// password written into pigeon.yaml, mode 0600, printed nowhere), `--db-password-file`,
// PGPASSFILE, `db status` / `db migrate` with schemas outside what this code runs on, and
// `db copy` from a populated SQLite instance (row counts, a non-empty target refused, the copy
// read back through a node that uses it).
import t, { type Test } from 'tap';
import { readFileSync, statSync, writeFileSync, chmodSync } from 'node:fs';
import { join } from 'node:path';
import { ImapFlow } from 'imapflow';
import { pigeon, scratchDir, serve, type Run } from './helpers/instance.js';
import { startPostgres } from './helpers/postgres.js';

// tap's per-file timeout: about 30 s alone (one server, ~40 CLI runs); two suites at once on 2
// cores make a file take 2-3 times as long
t.setTimeout(300_000);

// ':' '@' '/' '%' and '#' in a password: the characters a regex redaction gets wrong
const SECRET = 'Zq7:s3cr@t/p%w#x';

function noSecret(t: Test, r: Run, what: string): void {
  t.notOk(`${r.stdout}${r.stderr}`.includes(SECRET), `${what}: no password in the output`);
  t.notOk(`${r.stdout}${r.stderr}`.includes(encodeURIComponent(SECRET)), `${what}: not even percent-encoded`);
}

function ok(t: Test, r: Run, what: string): Run {
  t.equal(r.status, 0, `${what} exits 0${r.status === 0 ? '' : `: ${r.stderr}`}`);
  noSecret(t, r, what);
  return r;
}

t.test('PostgreSQL from init to db status, migrate and copy', async (t) => {
  const pg = await startPostgres(t, { password: SECRET });
  if (!pg) return;
  const base = scratchDir(t);
  const bare = `postgres://pigeon@127.0.0.1:${pg.port}/pigeon`;

  await t.test('init --db with the password in the URL: pigeon.yaml 0600, the password printed nowhere', async (t) => {
    const dir = join(base, 'a');
    const r = ok(t, pigeon(null, ['init', dir, '--node', 'mx1', '--db', pg.url]), 'init');
    t.match(r.stdout, `database: ${bare}`, 'init names the database without its password');
    t.equal(statSync(join(dir, 'pigeon.yaml')).mode & 0o777, 0o600, 'pigeon.yaml is the owner\'s only');
    t.ok(readFileSync(join(dir, 'pigeon.yaml'), 'utf8').includes(encodeURIComponent(SECRET)), 'the URL (with its password) is in pigeon.yaml');
    ok(t, pigeon(dir, ['domain', 'add', 'example.test']), 'domain add');
    ok(t, pigeon(dir, ['user', 'add', 'alice@example.test', '--password-stdin'], 'alice-pw\n'), 'user add');
    const c = ok(t, pigeon(dir, ['config', 'test']), 'config test');
    t.match(c.stdout, bare, 'config test names the database');
    const s = ok(t, pigeon(dir, ['db', 'status']), 'db status');
    t.match(s.stdout, /engine: +PostgreSQL \d+.*\(primary\)/, 'engine and role');
    t.match(s.stdout, new RegExp(`connected: +127\\.0\\.0\\.1:${pg.port} as pigeon, database pigeon`), 'the server reached');
    t.match(s.stdout, /schema: +version (\d+); this pigeon runs on \d+\.\.\1: current/, 'schema current');
    const j = JSON.parse(ok(t, pigeon(dir, ['db', 'status', '--json']), 'db status --json').stdout) as { role: string; usable: boolean; url: string };
    t.match(j, { role: 'primary', usable: true, url: bare });
    const m = ok(t, pigeon(dir, ['db', 'migrate']), 'db migrate');
    t.match(m.stdout, /nothing to do/, 'a current schema: nothing to do');
  });

  await t.test('a wrong password: a clear error without either password', async (t) => {
    const dir = join(base, 'a');
    const yaml = join(dir, 'conf.d', '90-wrong.yaml');
    writeFileSync(yaml, `database: ${JSON.stringify(`postgres://pigeon:${encodeURIComponent('wr:ng@pw')}@127.0.0.1:${pg.port}/pigeon`)}\n`);
    const r = pigeon(dir, ['user', 'list']);
    t.not(r.status, 0, 'refused');
    t.match(r.stderr, /password|authentication/i, 'says why');
    t.notOk(r.stderr.includes('wr:ng') || r.stderr.includes('wr%3Ang'), 'without the wrong password');
    noSecret(t, r, 'user list');
    writeFileSync(yaml, '{}\n');
  });

  await t.test('--db-password-file: no password in the URL or in pigeon.yaml; a file others can read is refused', async (t) => {
    const dir = join(base, 'b');
    const pw = join(base, 'db-password');
    writeFileSync(pw, `${SECRET}\n`, { mode: 0o644 });
    chmodSync(pw, 0o644);
    const bad = pigeon(null, ['init', dir, '--node', 'mx2', '--db', bare, '--db-password-file', pw]);
    t.not(bad.status, 0, 'a world-readable password file is refused');
    t.match(bad.stderr, /others|mode|0600/i, 'saying why');
    noSecret(t, bad, 'refused init');
    chmodSync(pw, 0o600);
    ok(t, pigeon(null, ['init', dir, '--node', 'mx2', '--db', bare, '--db-password-file', pw]), 'init with a password file');
    const yaml = readFileSync(join(dir, 'pigeon.yaml'), 'utf8');
    t.notOk(yaml.includes(encodeURIComponent(SECRET)) || yaml.includes(SECRET), 'no password in pigeon.yaml');
    t.match(yaml, `database_password_file: ${JSON.stringify(pw)}`, 'the file is named');
    const u = ok(t, pigeon(dir, ['user', 'list']), 'user list through the password file');
    t.match(u.stdout, 'alice@example.test', 'the shared database: a user added by the first node');
  });

  await t.test('PGPASSFILE (libpq\'s ~/.pgpass format)', async (t) => {
    const dir = join(base, 'c');
    const pgpass = join(base, 'pgpass');
    writeFileSync(pgpass, `127.0.0.1:${pg.port}:pigeon:pigeon:${SECRET.replace(/[:\\]/g, '\\$&')}\n`, { mode: 0o600 });
    const env = { ...process.env, PGPASSFILE: pgpass };
    const r = pigeon(null, ['init', dir, '--node', 'mx3', '--db', bare], undefined, env);
    ok(t, r, 'init with PGPASSFILE');
    t.match(ok(t, pigeon(dir, ['node', 'list'], undefined, env), 'node list').stdout, /mx1[\s\S]*mx2[\s\S]*mx3/, 'three nodes in one database');
    const without = pigeon(dir, ['node', 'list'], undefined, { ...process.env, PGPASSFILE: join(base, 'none') });
    t.equal(without.status, 78, 'without any password: a configuration error (78)');
    t.match(without.stderr, /password/i, 'naming the password');
  });

  await t.test('a unix-socket URL', async (t) => {
    const dir = join(base, 'd');
    const url = `postgres:///pigeon?host=${encodeURIComponent(pg.socketDir)}&port=${pg.port}&user=pigeon`;
    ok(t, pigeon(null, ['init', dir, '--node', 'mx4', '--db', url]), 'init on the socket (trust)');
    t.match(ok(t, pigeon(dir, ['db', 'status']), 'db status').stdout, `unix socket ${pg.socketDir}/.s.PGSQL.${pg.port}`, 'reached over the socket');
  });

  await t.test('schema outside what this pigeon runs on: refused with what to do; db migrate on an empty database', async (t) => {
    const dir = join(base, 'a');
    const latest = Number(/version (\d+);/.exec(pigeon(dir, ['db', 'status']).stdout)?.[1]);
    pg.psql(`INSERT INTO pigeon_schema (version) VALUES (${latest + 1})`, 'pigeon');
    const s = pigeon(dir, ['db', 'status']);
    t.equal(s.status, 78, 'db status: 78');
    t.match(s.stdout, `version ${latest + 1}; this pigeon runs on`, 'shows the version');
    t.match(s.stdout, /newer than this pigeon understands: upgrade pigeon/, 'says what to do');
    const u = pigeon(dir, ['user', 'list']);
    t.equal(u.status, 78, 'an admin command refuses');
    t.match(u.stderr, /newer than this pigeon understands/);
    const sv = pigeon(dir, ['serve', '--workers', '1']);
    t.equal(sv.status, 78, 'serve refuses to start');
    t.match(sv.stderr, /newer than this pigeon understands/);
    pg.psql(`DELETE FROM pigeon_schema WHERE version > ${latest}`, 'pigeon');
    pg.psql('UPDATE pigeon_schema SET version = -version WHERE version >= 2', 'pigeon');
    const old = pigeon(dir, ['user', 'list']);
    t.equal(old.status, 78, 'older than usable: refused');
    t.match(old.stderr, /older than this pigeon can use[^\n]*pigeon db migrate/);
    pg.psql('UPDATE pigeon_schema SET version = -version WHERE version < 0', 'pigeon');
    t.equal(pigeon(dir, ['user', 'list']).status, 0, 'back in range: works');

    pg.psql('CREATE DATABASE empty');
    writeFileSync(join(dir, 'conf.d', '90-empty.yaml'), `database: ${JSON.stringify(pg.url.replace(/\/pigeon$/, '/empty'))}\n`);
    const e = pigeon(dir, ['db', 'status']);
    t.equal(e.status, 78, 'an empty database: 78');
    t.match(e.stdout, /version 0;.*no schema yet: run "pigeon db migrate"/);
    const m = ok(t, pigeon(dir, ['db', 'migrate']), 'db migrate');
    t.match(m.stdout, new RegExp(`schema version 0 → ${latest}`));
    t.match(ok(t, pigeon(dir, ['db', 'status']), 'db status after migrate').stdout, /: current/);
    writeFileSync(join(dir, 'conf.d', '90-empty.yaml'), '{}\n');
  });

  await t.test('db copy: a populated SQLite instance to PostgreSQL, verified; a non-empty target refused', async (t) => {
    const dir = join(base, 'lite');
    ok(t, pigeon(null, ['init', dir, '--node', 'lite1']), 'init (SQLite)');
    ok(t, pigeon(dir, ['domain', 'add', 'example.org']), 'domain add');
    ok(t, pigeon(dir, ['domain', 'add', 'other.org']), 'domain add');
    for (const u of ['a@example.org', 'b@example.org', 'c@other.org']) ok(t, pigeon(dir, ['user', 'add', u, '--password-stdin'], `pw-${u}\n`), `user add ${u}`);
    ok(t, pigeon(dir, ['user', 'disable', 'b@example.org']), 'user disable');
    ok(t, pigeon(dir, ['config', 'set', 'mailstore.quota', '7000', '--domain', 'example.org']), 'config set (domain)');
    ok(t, pigeon(dir, ['config', 'set', 'mailstore.quota', '3000', '--user', 'a@example.org']), 'config set (user)');
    const d = pigeon(dir, ['deliver', 'a@example.org'], 'From: x@example.net\r\nSubject: before the copy\r\n\r\nhi\r\n');
    t.equal(d.status, 0, `a message delivered before the copy (its mailbox allocated) ${d.stdout}`);
    pg.psql('CREATE DATABASE copied');
    const dst = pg.url.replace(/\/pigeon$/, '/copied');
    const c = ok(t, pigeon(null, ['db', 'copy', `sqlite:${join(dir, 'pigeon.db')}`, dst]), 'db copy');
    t.match(c.stdout, /^domains +2 row\(s\)$/m, 'row counts per table: domains');
    t.match(c.stdout, /^users +3 row\(s\)$/m, 'users');
    t.match(c.stdout, /^settings +2 row\(s\)$/m, 'settings');
    t.match(c.stdout, /^nodes +1 row\(s\)$/m, 'nodes');
    t.match(c.stdout, /^revoked +0 row\(s\)$/m, 'revoked');
    t.match(c.stdout, /copied and verified: 8 row\(s\) in 5 tables/, 'verified before it says done');
    const again = pigeon(null, ['db', 'copy', `sqlite:${join(dir, 'pigeon.db')}`, dst]);
    t.equal(again.status, 73, 'a non-empty target: refused (73)');
    t.match(again.stderr, /not empty|already|row/i, 'saying why');
    noSecret(t, again, 'refused copy');

    // the SQLite instance moves to the server: its pigeon.yaml names the copy
    writeFileSync(join(dir, 'conf.d', '90-pg.yaml'), `database: ${JSON.stringify(dst)}\n`);
    t.match(ok(t, pigeon(dir, ['db', 'status']), 'db status on the copy').stdout, /PostgreSQL/);
    const show = JSON.parse(ok(t, pigeon(dir, ['user', 'show', 'b@example.org', '--json']), 'user show').stdout) as { state: string };
    t.equal(show.state, 'disabled', 'the flag came along');
    const quota = (u: string): unknown => (JSON.parse(ok(t, pigeon(dir, ['config', 'show', u, '--json']), `config show ${u}`).stdout) as Record<string, unknown>)['mailstore.quota'];
    t.equal(quota('a@example.org'), 3000, 'user setting');
    t.equal(quota('b@example.org'), 7000, 'domain setting');
    t.equal(quota('c@other.org'), 0, 'another domain: the default');
    const auth = pigeon(dir, ['auth', 'test', 'a@example.org'], 'pw-a@example.org\n');
    t.equal(auth.status, 0, `the password hash came along: ${auth.stdout}${auth.stderr}`);
    t.match(auth.stdout, 'auth succeeded');
    t.equal(pigeon(dir, ['auth', 'test', 'a@example.org'], 'wrong\n').status, 77, 'and a wrong password still fails (77)');

    // the cluster suite's read check on the copy: a client logs in at the node, now on the
    // server, and reads the message delivered before the copy (the allocation came along)
    writeFileSync(join(dir, 'conf.d', '91-listen.yaml'), 'listen:\n  - "imap=127.0.0.1:0"\nlog:\n  file: pigeon.log\n');
    const s = await serve(t, { dir, run: (a, i) => pigeon(dir, a, i), addUser: () => undefined });
    const client = new ImapFlow({ host: '127.0.0.1', port: s.ports['imap'] ?? 0, secure: false, doSTARTTLS: false, auth: { user: 'a@example.org', pass: 'pw-a@example.org' }, logger: false });
    await client.connect();
    const lock = await client.getMailboxLock('INBOX');
    const subjects: string[] = [];
    for await (const m of client.fetch('1:*', { envelope: true })) subjects.push(m.envelope?.subject ?? '');
    lock.release();
    await client.logout();
    t.same(subjects, ['before the copy'], 'IMAP through serve on the copy reads the mail delivered before it');
    const lmtpLess = pigeon(dir, ['deliver', 'a@example.org'], 'From: x@example.net\r\nSubject: after the copy\r\n\r\nhi\r\n');
    t.equal(lmtpLess.status, 0, 'and deliveries go on into the same mailbox');
  });
});
