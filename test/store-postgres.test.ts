// What only the PostgreSQL store has (the shared contract is test/store-contract.test.ts): the
// URL forms, where the password comes from and that it never shows, TLS modes, and the faults a
// network database has: stopped, silent, slow, failing over to a promoted standby. Every server
// is a private one (test/helpers/postgres.ts); the "silent server" is a loopback listener that
// never answers.
import t, { type Test } from 'tap';
import { inspect } from 'node:util';
import { createServer, type Socket } from 'node:net';
import { writeFileSync, chmodSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { AppError } from '../src/errors.js';
import type { ConfigStore, StoreChange } from '../src/store/types.js';
import { openPostgresStore, type PostgresStoreOptions } from '../src/store/postgres.js';
import { parsePgUrl, redactUrl } from '../src/store/pg-url.js';
import { createCa, issueHostCert } from '../certs/ca.js';
import { startPostgres, havePostgres, type PgServer } from './helpers/postgres.js';
import { scratchDir, ROOT } from './helpers/instance.js';

const SECRET = 'Zq7-s3cr3t-pw';

async function failure(p: Promise<unknown>): Promise<AppError> {
  try {
    await p;
  } catch (e) {
    if (e instanceof AppError) return e;
    throw e;
  }
  throw new Error('expected a failure, got success');
}

/** every text a failure could show: message, the inspected error (cause included) */
function texts(e: unknown): string {
  return `${String(e)}\n${inspect(e, { depth: 5 })}`;
}

async function open(t: Test, url: string, o: PostgresStoreOptions = {}): Promise<ConfigStore> {
  const s = await openPostgresStore(url, o);
  t.teardown(() => s.close());
  return s;
}

/** Retry `fn` until it succeeds or `ms` pass; each failed try must be a temporary AppError. */
async function untilWorks<T>(ms: number, fn: () => Promise<T>): Promise<{ value: T; tries: number }> {
  const end = Date.now() + ms;
  for (let tries = 1; ; tries++) {
    try {
      return { value: await fn(), tries };
    } catch (e) {
      if (!(e instanceof AppError) || !e.temporary || Date.now() > end) throw e;
    }
    await new Promise((r) => setTimeout(r, 100)); // pacing between tries, not a synchronisation
  }
}

/**
 * Until the store's LISTEN is in effect: a probe notification (user:probe@example.test) sent
 * through psql until the subscriber `seen` reports one; resolves false when none arrived after
 * `tries` probes. What the store tells subscribers when its LISTEN takes effect has been told
 * when this returns: the LISTEN's answer is handled no later than the probe that followed it
 * (the store's reaction to it is queued before the probe's wakes this loop).
 */
async function listening(pg: PgServer, seen: Promise<void>, tries = 100): Promise<boolean> {
  for (let i = 0; i < tries; i++) {
    pg.psql("SELECT pg_notify('pigeon_change', 'user:probe@example.test')", 'pigeon');
    // pacing between probes, not a synchronisation: the probe's arrival is the event
    if (await Promise.race([seen.then(() => true), new Promise<false>((r) => setTimeout(() => r(false), 100))])) return true;
  }
  return false;
}

/** the store's log lines as `level: text`; `back` resolves when it logs that notifications work again */
function listenLog(): { lines: string[]; back: Promise<void>; log: (level: string, m: string) => void } {
  const lines: string[] = [];
  let workAgain: () => void = () => undefined;
  const back = new Promise<void>((r) => (workAgain = r));
  const log = (level: string, m: string): void => {
    lines.push(`${level}: ${m}`);
    if (/change notifications work again/.test(m)) workAgain();
  };
  return { lines, back, log };
}

/** a subscriber recording every change; `probe` resolves at the first probe notification */
function recorder(s: ConfigStore): { changes: StoreChange[]; probe: Promise<void> } {
  const changes: StoreChange[] = [];
  let probed: () => void = () => undefined;
  const probe = new Promise<void>((r) => (probed = r));
  s.onChange((c) => {
    changes.push(c);
    if (c.kind === 'user' && c.address === 'probe@example.test') probed();
  });
  return { changes, probe };
}

t.test('the set-up line installs PostgreSQL (the servers these tests start)', async (t) => {
  const sh = readFileSync(join(ROOT, 'scripts', 'install-deps.sh'), 'utf8');
  t.match(sh, /^NEED="[^"]*\bpostgresql\b/m, 'in the package list');
  t.match(sh, /bin\/initdb .*missing="\$missing postgresql"/, 'and checked like dovecot');
});

t.test('URL forms', async (t) => {
  t.match(parsePgUrl('postgres://pigeon@db1.example.net/pigeon'), {
    hosts: [{ host: 'db1.example.net', port: 5432 }],
    socketDir: null,
    user: 'pigeon',
    password: null,
    database: 'pigeon',
    sslmode: 'prefer',
    targetSessionAttrs: 'any',
    where: 'postgres://pigeon@db1.example.net/pigeon',
  });
  const multi = parsePgUrl(`postgresql://pigeon:${SECRET}@db1.example.net,db2.example.net:5433,[::1]:6000/pigeon?target_session_attrs=read-write&connect_timeout=3`);
  t.match(multi, {
    hosts: [
      { host: 'db1.example.net', port: 5432 },
      { host: 'db2.example.net', port: 5433 },
      { host: '::1', port: 6000 },
    ],
    password: SECRET,
    targetSessionAttrs: 'read-write',
    connectTimeoutS: 3,
  });
  t.equal(multi.where, 'postgres://pigeon@db1.example.net,db2.example.net:5433,[::1]:6000/pigeon?target_session_attrs=read-write&connect_timeout=3');
  t.notMatch(multi.where, SECRET, 'where has no password');
  t.match(parsePgUrl('postgres:///pigeon?host=/run/postgresql'), { hosts: [], socketDir: '/run/postgresql', socketPort: 5432, database: 'pigeon', sslmode: 'disable' });
  t.match(parsePgUrl('postgres://%2Frun%2Fpostgresql:5433/pigeon'), { socketDir: '/run/postgresql', socketPort: 5433 });
  t.match(parsePgUrl('postgres:///pigeon'), { socketDir: '/var/run/postgresql' }, 'no host: Debian’s socket directory, as libpq');
  t.match(parsePgUrl('postgres://u%40x:p%3Aw%2B@h/d%20b'), { user: 'u@x', password: 'p:w+', database: 'd b' }, 'percent-decoding, + stays a plus');
  t.match(parsePgUrl('postgres://u@h/db?sslmode=verify-full&sslrootcert=/etc/ssl/ca.pem'), { sslmode: 'verify-full', sslrootcert: '/etc/ssl/ca.pem' });
  t.match(parsePgUrl('postgres://u@h/db?sslmode=verify-full&sslrootcert=system'), { sslmode: 'verify-full', sslrootcert: 'system' });
  t.match(parsePgUrl('postgres://u@h1,h2/db?port=5433'), { hosts: [{ port: 5433 }, { port: 5433 }] });
  const bad: [string, RegExp][] = [
    ['mysql://u@h/db', /postgres:\/\//],
    [`postgres://u:${SECRET}@h:99999/db`, /port "99999"/],
    [`postgres://u:${SECRET}@h/db?sslmode=maybe`, /sslmode "maybe"/],
    [`postgres://u:${SECRET}@h/db?sslmode=verify-ca`, /verify-ca needs sslrootcert/],
    [`postgres://u:${SECRET}@h/db?sslmode=verify-full`, /verify-full needs sslrootcert/],
    [`postgres://u:${SECRET}@h/db?target_session_attrs=writable`, /target_session_attrs "writable"/],
    [`postgres://u:${SECRET}@h/db?bogus=1`, /unknown parameter "bogus"/],
    [`postgres://u:${SECRET}@h,/tmp/db`, /cannot be mixed|not a host/],
    [`postgres://u:${SECRET}@h/db?host=/a,/b`, /only one unix socket/],
    [`postgres://u:${SECRET}@h/db?connect_timeout=soon`, /connect_timeout/],
    ['postgres://u:%zz@h/db', /malformed %-escape/],
    [`postgres:///db?host=/run/postgresql&sslmode=require`, /does not apply to a unix socket/],
  ];
  for (const [url, re] of bad) {
    let e: unknown = null;
    try {
      parsePgUrl(url);
    } catch (x) {
      e = x;
    }
    t.ok(e instanceof AppError && e.code === 'CONFIG_INVALID', `${redactUrl(url)}: CONFIG_INVALID`);
    t.match(String(e), re);
    t.notMatch(texts(e), SECRET, 'no password in the message');
  }
  t.equal(redactUrl(`postgres://u:${SECRET}@h/db?password=${SECRET}`), 'postgres://***@h/db?password=***');
});

t.test('a real server', async (t) => {
  if (!havePostgres(t)) return;
  const pg = await startPostgres(t, { password: SECRET });
  if (!pg) return;
  const tcp = `127.0.0.1:${pg.port}/pigeon`;
  const dir = scratchDir(t);

  t.test('password from the URL; a unix socket needs none here', async (t) => {
    const s = await open(t, `postgres://pigeon:${encodeURIComponent(SECRET)}@${tcp}`);
    t.same(await s.migrate(), { from: 0, to: 2 });
    t.notMatch(s.where, SECRET);
    const sock = await open(t, `postgres:///pigeon?host=${encodeURIComponent(pg.socketDir)}&port=${pg.port}&user=pigeon`);
    t.equal((await sock.schemaStatus()).version, 2, 'the socket form reaches the same database');
  });

  t.test('password file (database_password_file), and refusals', async (t) => {
    const file = join(dir, 'db.pw');
    writeFileSync(file, `${SECRET}\n`, { mode: 0o600 });
    const s = await open(t, `postgres://pigeon@${tcp}`, { passwordFile: file });
    t.equal((await s.schemaStatus()).version, 2);
    chmodSync(file, 0o604);
    const loose = await failure(openPostgresStore(`postgres://pigeon@${tcp}`, { passwordFile: file }));
    t.match(loose, { code: 'CONFIG_INVALID', message: /accessible to others/ });
    chmodSync(file, 0o600);
    t.match(await failure(openPostgresStore(`postgres://pigeon:${SECRET}@${tcp}`, { passwordFile: file })), { code: 'CONFIG_INVALID', message: /keep one/ });
    t.match(await failure(openPostgresStore(`postgres://pigeon@${tcp}`, { passwordFile: join(dir, 'missing') })), { code: 'CONFIG_INVALID', message: /cannot read \(ENOENT\)/ });
    // a rotated password is read at the next connection: no restart
    const wrong = join(dir, 'wrong.pw');
    writeFileSync(wrong, 'not-it\n', { mode: 0o600 });
    const w = await open(t, `postgres://pigeon@${tcp}`, { passwordFile: wrong });
    const e = await failure(w.listDomains());
    t.match(e, { code: 'CONFIG_INVALID', message: /password authentication failed/ });
    writeFileSync(wrong, `${SECRET}\n`);
    t.same(await w.listDomains(), [], 'the new password is used by the next connection');
  });

  t.test('PGPASSFILE (~/.pgpass format)', async (t) => {
    const file = join(dir, 'pgpass');
    writeFileSync(file, `# host:port:db:user:password\n127.0.0.1:${pg.port}:pigeon:pigeon:${SECRET.replace(/:/g, '\\:')}\n`, { mode: 0o600 });
    const old = process.env['PGPASSFILE'];
    process.env['PGPASSFILE'] = file;
    t.teardown(() => {
      if (old === undefined) delete process.env['PGPASSFILE'];
      else process.env['PGPASSFILE'] = old;
    });
    const s = await open(t, `postgres://pigeon@${tcp}`);
    t.equal((await s.schemaStatus()).version, 2);
  });

  t.test('the password never shows: wrong password, server down, log lines', async (t) => {
    const lines: string[] = [];
    const wrong = await open(t, `postgres://pigeon:${SECRET}x@${tcp}`, { log: (_l, m) => lines.push(m) });
    const e1 = await failure(wrong.getUser('a@example.test'));
    t.match(e1, { code: 'CONFIG_INVALID', exit: 78 });
    t.notMatch(texts(e1), SECRET);
    const down = await open(t, `postgres://pigeon:${SECRET}@127.0.0.1:1/pigeon`, { log: (_l, m) => lines.push(m) });
    const e2 = await failure(down.lookup('a@example.test'));
    t.match(e2, { code: 'DB_UNAVAILABLE', exit: 75, message: /connection refused/ });
    t.notMatch(texts(e2), SECRET);
    t.ok(lines.length > 0, 'the outage was logged');
    for (const l of lines) t.notMatch(l, SECRET, `log line without the password: ${l}`);
  });
});

t.test('TLS: sslmode and sslrootcert', async (t) => {
  if (!havePostgres(t)) return;
  const ca = await createCa('db-test');
  const other = await createCa('someone-else');
  // the certificate names "localhost" only: 127.0.0.1 passes verify-ca but not verify-full
  const pg = await startPostgres(t, { tls: await issueHostCert(ca, 'localhost') });
  if (!pg) return;
  const plain = await startPostgres(t);
  if (!plain) return;
  const dir = scratchDir(t);
  const caFile = join(dir, 'ca.pem');
  const otherFile = join(dir, 'other.pem');
  writeFileSync(caFile, ca.certPem);
  writeFileSync(otherFile, other.certPem);
  const ok = async (url: string): Promise<number> => (await (await open(t, url)).schemaStatus()).version;
  t.equal(await ok(`postgres://pigeon@localhost:${pg.port}/pigeon?sslmode=verify-full&sslrootcert=${caFile}`), 0, 'verify-full, the right CA and name');
  t.equal(await ok(`postgres://pigeon@127.0.0.1:${pg.port}/pigeon?sslmode=verify-ca&sslrootcert=${caFile}`), 0, 'verify-ca checks the chain only');
  t.equal(await ok(`postgres://pigeon@127.0.0.1:${pg.port}/pigeon?sslmode=require`), 0, 'require encrypts without checking');
  t.equal(await ok(`postgres://pigeon@127.0.0.1:${plain.port}/pigeon`), 0, 'prefer (the default) falls back to plain');
  t.equal(await ok(`postgres://pigeon@127.0.0.1:${plain.port}/pigeon?sslmode=disable`), 0);
  const refused: [string, RegExp][] = [
    [`postgres://pigeon@127.0.0.1:${pg.port}/pigeon?sslmode=verify-full&sslrootcert=${caFile}`, /certificate is not accepted/],
    [`postgres://pigeon@localhost:${pg.port}/pigeon?sslmode=verify-full&sslrootcert=${otherFile}`, /certificate is not accepted/],
    [`postgres://pigeon@127.0.0.1:${plain.port}/pigeon?sslmode=require`, /does not offer TLS/],
  ];
  for (const [url, re] of refused) {
    const e = await failure((await open(t, url)).schemaStatus());
    t.match(e, { code: 'CONFIG_INVALID', message: re }, url.replace(/^.*\?/, ''));
  }
  t.match(await failure(openPostgresStore(`postgres://pigeon@localhost/pigeon?sslmode=verify-full&sslrootcert=${join(dir, 'nope.pem')}`)), {
    code: 'CONFIG_INVALID',
    message: /sslrootcert .*nope\.pem: cannot read/,
  });
});

t.test('onChange: a change committed before the LISTEN takes effect is not lost (subscribers are told to re-read)', async (t) => {
  if (!havePostgres(t)) return;
  const pg = await startPostgres(t);
  if (!pg) return;
  const lines: string[] = [];
  const s = await open(t, pg.url, { log: (level, m) => lines.push(`${level}: ${m}`) });
  await s.migrate();
  const { changes, probe } = recorder(s);
  // another node joins right after this one subscribed. psql runs while this process waits for
  // it (spawnSync: no event of this process is handled meanwhile), so the commit is in before the
  // store's LISTEN connection is even opened: its NOTIFY reaches no one. On a loaded machine (or
  // during a fail-over, where the first LISTEN can take effect only on the promoted standby) the
  // window is this wide without any help.
  pg.psql("INSERT INTO nodes (name, peer_address, fingerprint, state, cert_expires) VALUES ('n2', '127.0.0.3:7000', 'BB', 'active', '2030-01-01T00:00:00Z')", 'pigeon');
  t.ok(await listening(pg, probe), 'notifications arrive');
  // (a notification that comes with the LISTEN's answer is handled before it: no order between them)
  t.ok(
    changes.some((c) => c.kind === 'nodes'),
    'once the LISTEN took effect, the subscriber was told to re-read the registry (where n2 is)',
  );
  t.equal((await s.getNode('n2'))?.peerAddress, '127.0.0.3:7000');
  t.same(lines, [], 'nothing logged: notifications never stopped');
});

t.test('outages: DB_UNAVAILABLE within the bound, one log line per change, recovery without a new store', async (t) => {
  if (!havePostgres(t)) return;
  const pg = await startPostgres(t);
  if (!pg) return;
  const lines: string[] = [];
  const s = await open(t, pg.url, { connectTimeoutMs: 1000, statementTimeoutMs: 800, log: (level, m) => lines.push(`${level}: ${m}`) });
  await s.migrate();
  await s.addDomain('example.test');
  await s.addUser('alice@example.test', 'h', null);
  const { changes, probe } = recorder(s);
  t.ok(await listening(pg, probe), 'notifications arrive before the outage');
  let relistened: () => void = () => undefined;
  const relisten = new Promise<void>((r) => (relistened = r));
  const back = /^info: .*change notifications work again/;
  s.onChange(() => {
    if (lines.some((l) => back.test(l))) relistened();
  });
  t.equal(lines.length, 0, 'nothing logged while all is well');
  const state = (): string[] => lines.filter((l) => !/change notifications/.test(l));

  t.test('server stopped', async (t) => {
    await pg.stop('fast');
    for (let i = 0; i < 20; i++) {
      const t0 = Date.now();
      const e = await failure(i % 2 ? s.lookup('alice@example.test') : s.setPassword('alice@example.test', 'h2'));
      t.equal(e.code, 'DB_UNAVAILABLE');
      t.ok(Date.now() - t0 < 2500, `answered in ${Date.now() - t0} ms`);
    }
    t.equal(lines.filter((l) => /unavailable/.test(l)).length, 1, 'one log line for the outage, not one per request');
    t.match(state()[0], /^error: database postgres:\/\/pigeon@127\.0\.0\.1:\d+\/pigeon unavailable: /);
    t.match(
      lines.filter((l) => /change notifications/.test(l)),
      [/^warn: database postgres:\/\/pigeon@127\.0\.0\.1:\d+\/pigeon: change notifications do not arrive \(the LISTEN connection closed\)/],
      'one line: notifications stopped',
    );
    const before = changes.length;
    await pg.start();
    const r = await untilWorks(10_000, () => s.lookup('alice@example.test'));
    t.equal(r.value?.user.address, 'alice@example.test', 'the same store object works again');
    t.match(state().at(-1), /^info: database .* is available again/);
    t.equal(state().length, 2, 'one line back up');
    await relisten;
    t.equal(lines.filter((l) => /change notifications/.test(l)).length, 2, 'and one when notifications work again');
    t.same(changes.slice(before).filter((c) => c.kind === 'nodes').length, 1, 'subscribers were told once to re-read after the listener reconnected');
  });

  t.test('a slow server: the statement timeout answers', async (t) => {
    const psql = pg.session(t);
    psql.send("BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE; SELECT 'locked';");
    await psql.until(/^locked$/);
    const t0 = Date.now();
    const e = await failure(s.lookup('alice@example.test'));
    const ms = Date.now() - t0;
    t.match(e, { code: 'DB_UNAVAILABLE', message: /statement timeout/ });
    // the server cancels at 800 ms; the client re-sends a statement that failed before it was
    // bound once (a re-prepare), and its query timeout (800 + 3000 ms) bounds it all
    t.ok(ms >= 700 && ms < 3800, `after the 800 ms statement timeout, within the 3800 ms query timeout (${ms} ms)`);
    psql.send('ROLLBACK;');
    await psql.close();
    t.equal((await s.lookup('alice@example.test'))?.user.address, 'alice@example.test');
  });
});

t.test('a LISTEN connection whose server process is terminated (pg_terminate_backend): listened again, subscribers told to re-read', async (t) => {
  if (!havePostgres(t)) return;
  const pg = await startPostgres(t);
  if (!pg) return;
  const { lines, back, log } = listenLog();
  const s = await open(t, pg.url, { log });
  await s.migrate();
  const { changes, probe } = recorder(s);
  t.ok(await listening(pg, probe), 'notifications arrive');
  const before = changes.length;
  t.equal(pg.psql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = 'pigeon' AND query IN ('LISTEN pigeon_change', 'SELECT 1 AS listen_check')", 'pigeon').trim(), '1');
  await back;
  t.match(lines, [/^warn: .*change notifications do not arrive \(the LISTEN connection closed\)/, /^info: .*change notifications work again/]);
  t.equal(lines.length, 2, 'one line each way, and the database was never down');
  t.ok(
    changes.slice(before).some((c) => c.kind === 'nodes'),
    'subscribers were told to re-read',
  );
  const again = recorder(s);
  t.ok(await listening(pg, again.probe), 'notifications arrive again');
});

t.test('a LISTEN connection whose server stops answering without closing is noticed, listened again, and what changed meanwhile re-read', async (t) => {
  if (!havePostgres(t)) return;
  const pg = await startPostgres(t);
  if (!pg) return;
  const { lines, back, log } = listenLog();
  // checked every 300 ms; the query timeout 2 s, then the cancel timeout 1 s (the connect timeout)
  const s = await open(t, pg.url, { connectTimeoutMs: 1000, statementTimeoutMs: 1000, queryTimeoutMs: 2000, listenCheckMs: 300, log });
  await s.migrate();
  const { changes, probe } = recorder(s);
  t.ok(await listening(pg, probe), 'notifications arrive');
  const pids = pg.psql("SELECT pid FROM pg_stat_activity WHERE datname = 'pigeon' AND query IN ('LISTEN pigeon_change', 'SELECT 1 AS listen_check')", 'pigeon').trim().split('\n');
  t.equal(pids.length, 1, 'one LISTEN connection');
  const pid = Number(pids[0]);
  // its server process hangs: the connection stays open and nothing answers (as behind a
  // partition that drops packets, where TCP alone notices nothing for minutes)
  process.kill(pid, 'SIGSTOP');
  let stopped = true;
  const resume = (): void => {
    if (stopped) process.kill(pid, 'SIGCONT'); // it sees its client gone and ends
    stopped = false;
  };
  t.teardown(resume);
  const t0 = Date.now();
  const before = changes.length;
  // a node joins meanwhile: its NOTIFY goes to the hung process only
  pg.psql("INSERT INTO nodes (name, peer_address, fingerprint, state, cert_expires) VALUES ('n2', '127.0.0.3:7000', 'BB', 'active', '2030-01-01T00:00:00Z')", 'pigeon');
  await back;
  const ms = Date.now() - t0;
  resume();
  // 0.3 + 2 + 1 s, and a reconnect; generous for two suites at once on 2 cores
  t.ok(ms < 10_000, `noticed and listening again after ${ms} ms`);
  t.match(
    lines,
    [/^warn: database .*: change notifications do not arrive \(the LISTEN connection closed\)/, /^info: database .*: change notifications work again/],
    'one line when they stopped, one when they work again',
  );
  t.equal(lines.length, 2, 'and nothing else: the database itself was never down');
  t.ok(
    changes.slice(before).some((c) => c.kind === 'nodes'),
    'subscribers were told to re-read the registry (where n2 is)',
  );
  t.equal((await s.getNode('n2'))?.peerAddress, '127.0.0.3:7000');
  const again = recorder(s);
  t.ok(await listening(pg, again.probe), 'notifications arrive again');
});

t.test('a silent server: the connect timeout answers', async (t) => {
  const held: Socket[] = [];
  const silent = createServer((c) => void held.push(c)); // accepts, never says a word
  await new Promise<void>((r) => silent.listen(0, '127.0.0.1', () => r()));
  t.teardown(
    () =>
      new Promise<void>((r) => {
        for (const c of held) c.destroy();
        silent.close(() => r());
      }),
  );
  const port = (silent.address() as { port: number }).port;
  const s = await open(t, `postgres://pigeon:${SECRET}@127.0.0.1:${port}/pigeon?sslmode=disable`, { connectTimeoutMs: 700 });
  const t0 = Date.now();
  const e = await failure(s.lookup('a@example.test'));
  const ms = Date.now() - t0;
  t.match(e, { code: 'DB_UNAVAILABLE', message: /connect timeout/ });
  t.ok(ms >= 600 && ms < 3000, `within the 700 ms connect timeout (${ms} ms)`);
  t.notMatch(texts(e), SECRET);
});

t.test('fail-over: primary stopped, standby promoted, the same store follows within 10 s', async (t) => {
  if (!havePostgres(t)) return;
  const primary = await startPostgres(t);
  if (!primary) return;
  const standby = await primary.addStandby();
  // synchronous replication: every acknowledged commit is on the standby too
  primary.psql("ALTER SYSTEM SET synchronous_standby_names = '*'");
  primary.psql("ALTER SYSTEM SET synchronous_commit = 'remote_apply'");
  primary.psql('SELECT pg_reload_conf()');
  primary.psql('CREATE TABLE sync_probe (x int); DROP TABLE sync_probe', 'pigeon'); // waits until the standby applies
  const url = `postgres://pigeon@127.0.0.1:${primary.port},127.0.0.1:${standby.port}/pigeon?target_session_attrs=read-write`;
  const lines: string[] = [];
  const s = await open(t, url, { connectTimeoutMs: 1000, log: (level, m) => lines.push(`${level}: ${m}`) });
  await s.migrate();
  await s.addDomain('example.test');
  const u = await s.addUser('alice@example.test', '{PLAIN}pw', null);
  t.ok(await s.casAllocation(u.id, u.version, 'n1', { format: 'maildir', path: '/m/alice', node: 'n1' }));
  const { changes, probe } = recorder(s);
  await s.registerSelf({ name: 'n1', fingerprint: 'AA', certExpires: '2030-01-01T00:00:00Z', peerAddress: null }, { heartbeat: true });
  // the first LISTEN in effect on the primary: what follows is the loss of a working one
  t.ok(await listening(primary, probe), 'notifications arrive before the fail-over');
  t.ok(
    changes.some((c) => c.kind === 'nodes'),
    'told to re-read once the LISTEN took effect',
  );
  const back = /^info: .*change notifications work again/;
  let relistened: () => void = () => undefined;
  const relisten = new Promise<void>((r) => (relistened = r));
  s.onChange(() => {
    if (lines.some((l) => back.test(l))) relistened();
  });
  const before = changes.length;

  const t0 = Date.now();
  await primary.stop('immediate');
  const during = await failure(s.lookup('alice@example.test'));
  t.equal(during.code, 'DB_UNAVAILABLE', 'while no primary exists: a temporary failure');
  await standby.promote();
  const r = await untilWorks(10_000, () => s.addUser('bob@example.test', null, null));
  const ms = Date.now() - t0;
  t.ok(ms < 10_000, `writes work again ${ms} ms after the primary stopped (${r.tries} tries)`);
  t.match(await s.lookup('alice@example.test'), { user: { password: '{PLAIN}pw', allocation: { path: '/m/alice' } } }, 'everything acknowledged before is there');
  t.equal((await s.getUser('bob@example.test'))?.address, 'bob@example.test');
  t.equal(standby.psql("SELECT count(*) FROM users WHERE address = 'bob@example.test'", 'pigeon').trim(), '1', 'written to the promoted standby');
  await relisten;
  t.ok(
    changes.slice(before).some((c) => c.kind === 'nodes'),
    'subscribers were told to re-read after the fail-over',
  );
  const bob = new Promise<void>((r) => s.onChange((c) => c.kind === 'user' && c.address === 'bob@example.test' && r()));
  await s.setPassword('bob@example.test', '{PLAIN}b');
  await bob;
  t.pass('a change on the promoted standby is notified: the LISTEN is on it');
  t.equal(lines.filter((l) => /unavailable/.test(l)).length, 1, 'one outage line');
  t.match(lines.filter((l) => !/change notifications/.test(l)).at(-1), /available again/);
  t.match(
    lines.filter((l) => /change notifications/.test(l)),
    [/^warn: .*change notifications do not arrive \(the LISTEN connection closed\)/, back],
    'one line when notifications stopped, one when they work again',
  );
  t.equal(lines.filter((l) => /change notifications/.test(l)).length, 2, 'not one per attempt');
});
