/**
 * The cluster admin CLI as a real process, for one database: `pigeon cert issue` on the CA holder,
 * a new node joining with `pigeon init --ca-from ISSUED_DIR --db SHARED`, and `pigeon node
 * list|disable|enable|remove` — exit codes, files and modes, what `node list` shows, and what the
 * shared database then holds. test/cluster-admin.test.ts runs these cases on a SQLite file,
 * test/cluster-admin-pg.test.ts on a private PostgreSQL server (test/helpers/postgres.ts).
 * Needs `npx tsc -p tsconfig.json` first (npm test does it).
 */
import t from 'tap';
import { X509Certificate } from 'node:crypto';
import { copyFileSync, existsSync, mkdirSync, readFileSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { issueHostCert, readKeyPair, writeKeyPair } from '../../certs/ca.js';
import { openStore } from '../../src/store.js';
import { runCli, type CliRun } from '../helpers/cli.js';
import { scratchDir } from '../helpers/instance.js';
import { havePostgres, startPostgres, type PgServer } from '../helpers/postgres.js';
import type { DbKind } from '../helpers/cluster.js';

export default function cases(kind: DbKind): void {
  // PostgreSQL missing: a failure naming the package (or a SKIP with PIGEON_TEST_ALLOW_MISSING=1)
  if (kind === 'postgres' && !havePostgres(t)) return;


  const day = 86400_000;

  function run(args: readonly string[], input = ''): CliRun {
    return runCli(args, { input });
  }

  interface NodeJson {
    name: string;
    state: string;
    health: string;
    peer_address: string | null;
    last_seen: string | null;
    cert_expires: string | null;
    fingerprint: string | null;
    next_fingerprint: string | null;
    users: number;
  }

  function nodes(inst: string): NodeJson[] {
    const r = run(['-c', inst, 'node', 'list', '--json']);
    if (r.code !== 0) throw new Error(`node list failed (${String(r.code)}): ${r.err}`);
    return JSON.parse(r.out) as NodeJson[];
  }

  function byName(ns: readonly NodeJson[], name: string): NodeJson | undefined {
    return ns.find((n) => n.name === name);
  }

  interface DbNode {
    name: string;
    fingerprint: string | null;
    next_fingerprint: string | null;
    state: string;
  }

  /** The nodes table as the shared database holds it, read past pigeon (sqlite3 file or psql). */
  function dbNodes(): DbNode[] {
    const sql = 'SELECT name, fingerprint, next_fingerprint, state FROM nodes ORDER BY name';
    if (pg !== null) {
      return pg
        .psql(sql, 'pigeon')
        .split('\n')
        .filter((l) => l !== '')
        .map((l) => {
          const [name = '', fingerprint = '', next = '', state = ''] = l.split('|');
          return { name, fingerprint: fingerprint === '' ? null : fingerprint, next_fingerprint: next === '' ? null : next, state };
        });
    }
    const db = new Database(shared, { readonly: true });
    try {
      return db.prepare<[], DbNode>(sql).all();
    } finally {
      db.close();
    }
  }

  /** A state no pigeon command makes: set in the database directly. */
  function setLastSeen(node: string, iso: string, peer: string): void {
    const sql = `UPDATE nodes SET last_seen = '${iso}', peer_address = '${peer}' WHERE name = '${node}'`;
    if (pg !== null) {
      pg.psql(sql, 'pigeon');
      return;
    }
    const raw = new Database(shared);
    try {
      raw.prepare(sql).run();
    } finally {
      raw.close();
    }
  }

  function certOf(file: string): X509Certificate {
    return new X509Certificate(readFileSync(file));
  }

  function mode(p: string): number {
    return statSync(p).mode & 0o777;
  }

  const root = scratchDir(t);
  const A = join(root, 'alpha'); // the CA holder
  // the shared database: A's SQLite file, or the PostgreSQL server's URL (set before the first test)
  let shared = join(A, 'pigeon.db');
  let pg: PgServer | null = null;
  const B = join(root, 'beta'); // joins with an issued certificate
  const OUT = join(root, 'issued-beta');
  const CA = ['-c', A];

  t.before(async () => {
    if (kind === 'postgres') {
      pg = await startPostgres(t);
      if (pg === null) throw new Error('the private PostgreSQL server did not start');
      shared = pg.url;
    }
    const r = run(kind === 'postgres' ? ['init', A, '--node', 'alpha', '--db', shared] : ['init', A, '--node', 'alpha']);
    if (r.code !== 0) throw new Error(`init alpha: ${r.err}`);
  });

  t.test('cert issue on the CA holder: three files, right modes, the certificate names the node, announced', async (t) => {
    const r = run([...CA, 'cert', 'issue', 'beta', '--out', OUT]);
    t.equal(r.code, 0, `cert issue exits 0 ${r.err}`);
    t.same(readdirSync(OUT).sort(), ['ca.crt', 'node.crt', 'node.key'], 'ca.crt, node.crt, node.key written');
    t.equal(mode(OUT), 0o700, 'the --out directory is created 0700');
    t.equal(mode(join(OUT, 'ca.crt')), 0o644, 'ca.crt 0644');
    t.equal(mode(join(OUT, 'node.crt')), 0o644, 'node.crt 0644');
    t.equal(mode(join(OUT, 'node.key')), 0o600, 'node.key 0600');
    t.equal(readFileSync(join(OUT, 'ca.crt'), 'utf8'), readFileSync(join(A, 'certs', 'ca.crt'), 'utf8'), 'ca.crt is the cluster CA');

    const cert = certOf(join(OUT, 'node.crt'));
    const ca = certOf(join(A, 'certs', 'ca.crt'));
    t.match(cert.subject, /(^|\n)CN=beta(\n|$)/, 'subject CN is the node name');
    t.match(cert.subjectAltName ?? '', /(^|, )DNS:beta(,|$)/, 'node name in the SAN');
    t.match(cert.subjectAltName ?? '', /DNS:localhost/, 'localhost in the SAN');
    t.ok(cert.checkIssued(ca) && cert.verify(ca.publicKey), 'signed by the cluster CA');
    t.equal(cert.ca, false, 'not a CA');
    const days = (Date.parse(cert.validTo) - Date.now()) / day;
    t.ok(days > 824 && days <= 825, `valid for the default 825 days (${days.toFixed(1)})`);
    t.notMatch(r.out, /PRIVATE KEY/, 'the key is not printed');
    t.match(r.out, `pigeon init NEWDIR --node beta --ca-from ${OUT} --db ${shared}`, 'says how the new node joins');

    const beta = byName(nodes(A), 'beta');
    t.equal(beta?.fingerprint, cert.fingerprint256, 'announced with the certificate fingerprint');
    t.equal(beta?.cert_expires, new Date(cert.validTo).toISOString(), 'with its expiry');
    t.equal(beta?.state, 'active');
    t.equal(beta?.health, 'never seen', 'not seen yet');
  });

  t.test('cert issue refuses to overwrite, bad --days, bad names', async (t) => {
    const before = ['ca.crt', 'node.crt', 'node.key'].map((f) => readFileSync(join(OUT, f), 'utf8'));
    const again = run([...CA, 'cert', 'issue', 'beta', '--out', OUT]);
    t.equal(again.code, 73, 'existing files: exit 73');
    t.match(again.err, /^pigeon: error: .*node\.crt.*already exist.*refusing to overwrite/m, 'names the files');
    t.same(['ca.crt', 'node.crt', 'node.key'].map((f) => readFileSync(join(OUT, f), 'utf8')), before, 'nothing overwritten');
    t.equal(dbNodes().find((n) => n.name === 'beta')?.next_fingerprint, null, 'nothing announced');

    for (const d of ['0', '3651', 'ten', '-5', '1.5']) {
      const r = run([...CA, 'cert', 'issue', 'gamma', '--out', join(root, `days-${d}`), '--days', d]);
      t.equal(r.code, 64, `--days ${d}: exit 64`);
      t.match(r.err, /--days: expected a whole number of days from 1 to 3650/);
      t.notOk(existsSync(join(root, `days-${d}`)), 'nothing written');
    }
    const bad = run([...CA, 'cert', 'issue', 'bad_name', '--out', join(root, 'bad-name')]);
    t.equal(bad.code, 64, 'invalid node name: exit 64');
    t.match(bad.err, /invalid node name "bad_name"/);
    t.notOk(existsSync(join(root, 'bad-name')), 'nothing written');
    t.notOk(byName(nodes(A), 'gamma'), 'no node announced by the failed attempts');
  });

  t.test('init --ca-from ISSUED_DIR --db SHARED: the node joins with that certificate', async (t) => {
    const r = run(['init', B, '--node', 'beta', '--ca-from', OUT, '--db', shared]);
    t.equal(r.code, 0, `init exits 0 ${r.err}`);
    t.equal(readFileSync(join(B, 'certs', 'node.crt'), 'utf8'), readFileSync(join(OUT, 'node.crt'), 'utf8'), 'the issued node.crt is this node\'s');
    t.equal(readFileSync(join(B, 'certs', 'node.key'), 'utf8'), readFileSync(join(OUT, 'node.key'), 'utf8'), 'with its key');
    t.equal(mode(join(B, 'certs', 'node.key')), 0o600, 'node.key 0600');
    t.equal(readFileSync(join(B, 'certs', 'ca.crt'), 'utf8'), readFileSync(join(A, 'certs', 'ca.crt'), 'utf8'), 'the cluster CA');
    t.notOk(existsSync(join(B, 'certs', 'ca.key')), 'no CA key on the joined node');
    t.notOk(existsSync(join(B, 'pigeon.db')), 'no database of its own');
    t.match(readFileSync(join(B, 'pigeon.yaml'), 'utf8'), `database: ${JSON.stringify(shared)}`, 'the shared database in its config');

    const fromA = nodes(A);
    const fromB = nodes(B);
    t.same(fromA.map((n) => n.name), ['alpha', 'beta'], 'both nodes registered');
    t.same(fromB, fromA, 'both instances see the same cluster');
    t.equal(byName(fromA, 'beta')?.fingerprint, certOf(join(OUT, 'node.crt')).fingerprint256, 'beta registered with the issued certificate');

    const noKey = run(['-c', B, 'cert', 'issue', 'gamma', '--out', join(root, 'from-beta')]);
    t.equal(noKey.code, 78, 'cert issue without the CA key: exit 78');
    t.match(noKey.err, `${join(B, 'certs', 'ca.key')}`, 'names the missing CA key file');
    t.match(noKey.err, /only the CA holder/, 'says only the CA holder can issue');
    t.notOk(existsSync(join(root, 'from-beta')), 'nothing written');
    t.notOk(byName(nodes(A), 'gamma'), 'nothing announced');
  });

  t.test('init refuses a name registered with another certificate, and leaves nothing behind', async (t) => {
    const before = dbNodes();
    const own = join(root, 'dup-own-ca');
    const r1 = run(['init', own, '--node', 'alpha', '--db', shared]);
    t.equal(r1.code, 78, 'another node named alpha (own CA): exit 78');
    t.match(r1.err, /node name alpha is already registered with another certificate/);
    t.notOk(existsSync(own), 'the new directory is removed');

    const viaCa = join(root, 'dup-via-ca');
    mkdirSync(viaCa); // an existing empty directory stays, empty
    const r2 = run(['init', viaCa, '--node', 'beta', '--ca-from', A, '--db', shared]);
    t.equal(r2.code, 78, 'another node named beta (certificate issued from the CA instance): exit 78');
    t.match(r2.err, /node name beta is already registered with another certificate/);
    t.same(readdirSync(viaCa), [], 'the existing directory is left empty');
    t.same(dbNodes(), before, 'the shared database is unchanged');

    const rel = join(root, 'relative-db');
    const r3 = run(['init', rel, '--node', 'theta', '--db', 'nosuchdir/pigeon.db']);
    t.equal(r3.code, 78, 'a --db whose directory does not exist: exit 78, not an internal error');
    t.match(r3.err, /directory .*nosuchdir does not exist \(a relative --db is relative to /);
    t.notOk(existsSync(rel), 'nothing created');
  });

  t.test('init --ca-from with a certificate that cannot be this node\'s: clear errors, nothing created', async (t) => {
    const wrongName = join(root, 'wrong-name');
    const r1 = run(['init', wrongName, '--node', 'delta', '--ca-from', OUT, '--db', shared]);
    t.equal(r1.code, 78, 'certificate for another node: exit 78');
    t.match(r1.err, /certificate names node "beta", expected "delta"/);
    t.match(r1.err, /pigeon cert issue delta --out DIR/, 'says how to get the right one');
    t.notOk(existsSync(wrongName), 'nothing created');

    // a node certificate from another cluster's CA next to this cluster's ca.crt
    const other = join(root, 'other-cluster');
    t.equal(run(['init', other, '--node', 'zeta']).code, 0, 'another cluster');
    const mixed = join(root, 'mixed');
    mkdirSync(mixed);
    copyFileSync(join(A, 'certs', 'ca.crt'), join(mixed, 'ca.crt'));
    copyFileSync(join(other, 'certs', 'node.crt'), join(mixed, 'node.crt'));
    copyFileSync(join(other, 'certs', 'node.key'), join(mixed, 'node.key'));
    const r2 = run(['init', join(root, 'mixed-node'), '--node', 'zeta', '--ca-from', mixed, '--db', shared]);
    t.equal(r2.code, 78, 'certificate from another CA: exit 78');
    t.match(r2.err, /was not issued by this cluster's CA/);
    t.notOk(existsSync(join(root, 'mixed-node')), 'nothing created');

    // an expired certificate from the right CA
    const ca = readKeyPair(join(A, 'certs', 'ca.crt'), join(A, 'certs', 'ca.key'));
    const expired = join(root, 'expired');
    mkdirSync(expired);
    copyFileSync(join(A, 'certs', 'ca.crt'), join(expired, 'ca.crt'));
    writeKeyPair(await issueHostCert(ca, 'epsilon', [], { notBefore: new Date(Date.now() - 10 * day), notAfter: new Date(Date.now() - day) }), join(expired, 'node.crt'), join(expired, 'node.key'));
    const r3 = run(['init', join(root, 'expired-node'), '--node', 'epsilon', '--ca-from', expired, '--db', shared]);
    t.equal(r3.code, 78, 'expired certificate: exit 78');
    t.match(r3.err, /certificate of epsilon expired on/);
    t.notOk(existsSync(join(root, 'expired-node')), 'nothing created');

    // node.key of another certificate
    const wrongKey = join(root, 'wrong-key');
    mkdirSync(wrongKey);
    copyFileSync(join(A, 'certs', 'ca.crt'), join(wrongKey, 'ca.crt'));
    copyFileSync(join(OUT, 'node.crt'), join(wrongKey, 'node.crt'));
    copyFileSync(join(A, 'certs', 'node.key'), join(wrongKey, 'node.key'));
    const r4 = run(['init', join(root, 'wrong-key-node'), '--node', 'beta', '--ca-from', wrongKey, '--db', shared]);
    t.equal(r4.code, 78, 'a key that is not the certificate\'s: exit 78');
    t.match(r4.err, /node\.key is not the private key of .*node\.crt/);
    t.notOk(existsSync(join(root, 'wrong-key-node')), 'nothing created');

    const empty = join(root, 'empty-ca-from');
    mkdirSync(empty);
    const r5 = run(['init', join(root, 'empty-node'), '--node', 'eta', '--ca-from', empty]);
    t.equal(r5.code, 78, 'a directory with neither: exit 78');
    t.match(r5.err, /needs either certs\/ca\.crt \+ certs\/ca\.key .* or ca\.crt \+ node\.crt \+ node\.key/);

    t.same(nodes(A).map((n) => n.name), ['alpha', 'beta'], 'no node registered by any of them');
  });

  t.test('node disable / enable', async (t) => {
    const d = run([...CA, 'node', 'disable', 'beta']);
    t.equal(d.code, 0, `disable exits 0 ${d.err}`);
    t.match(d.out, /node beta disabled: running nodes drop its peer links within about a second/);
    t.equal(byName(nodes(A), 'beta')?.state, 'disabled', 'state disabled');
    const text = run([...CA, 'node', 'list']);
    t.match(text.out, /^beta\s+disabled\s/m, 'the text list shows it disabled');
    const e = run([...CA, 'node', 'enable', 'beta']);
    t.equal(e.code, 0, `enable exits 0 ${e.err}`);
    t.match(e.out, /node beta enabled/);
    t.equal(byName(nodes(A), 'beta')?.state, 'active', 'state active again');
    const missing = run([...CA, 'node', 'disable', 'nosuch']);
    t.equal(missing.code, 68, 'unknown node: exit 68');
    t.match(missing.err, /no such node: nosuch/);
  });

  t.test('node list: columns, health, expiry warning, users, --json fields', async (t) => {
    // alpha heartbeats (as pigeon serve does); beta was seen an hour ago; a short certificate for gamma
    const store = await openStore(shared);
    try {
      const alpha = certOf(join(A, 'certs', 'node.crt'));
      await store.registerSelf({ name: 'alpha', fingerprint: alpha.fingerprint256, certExpires: new Date(alpha.validTo).toISOString(), peerAddress: '127.0.0.1:7001' }, { heartbeat: true });
    } finally {
      await store.close();
    }
    // beta was last seen an hour ago: a state no pigeon command makes, so set it in the file directly
    setLastSeen('beta', new Date(Date.now() - 3600_000).toISOString().replace(/\.\d+Z$/, 'Z'), '127.0.0.1:7002');
    const g = run([...CA, 'cert', 'issue', 'gamma', '--out', join(root, 'issued-gamma'), '--days', '10']);
    t.equal(g.code, 0, `cert issue --days 10 ${g.err}`);
    const days = (Date.parse(certOf(join(root, 'issued-gamma', 'node.crt')).validTo) - Date.now()) / day;
    t.ok(days > 9 && days <= 10, 'valid for 10 days');

    t.equal(run([...CA, 'domain', 'add', 'd.test']).code, 0);
    t.equal(run([...CA, 'user', 'add', 'x@d.test', '--home', 'beta']).code, 0, 'a user living on beta');

    const ns = nodes(A);
    t.same(ns.map((n) => n.name), ['alpha', 'beta', 'gamma']);
    for (const n of ns) t.same(Object.keys(n).sort(), ['cert_expires', 'fingerprint', 'health', 'last_seen', 'name', 'next_fingerprint', 'peer_address', 'state', 'users'], `${n.name}: the JSON fields`);
    t.match(byName(ns, 'alpha'), { state: 'active', health: 'up', peer_address: '127.0.0.1:7001', users: 0 }, 'alpha up, with its peer address');
    t.match(byName(ns, 'beta'), { state: 'active', health: 'down', peer_address: '127.0.0.1:7002', users: 1 }, 'beta down (last seen an hour ago), one user');
    t.match(byName(ns, 'gamma'), { health: 'never seen', last_seen: null, users: 0 }, 'gamma never seen');

    const text = run([...CA, 'node', 'list']);
    t.equal(text.code, 0);
    const lines = text.out.trimEnd().split('\n');
    t.match(lines[0], /^NAME\s+STATE\s+HEALTH\s+PEER\s+LAST SEEN\s+CERT EXPIRES\s+USERS$/, 'a header line');
    t.match(lines[1], /^alpha\s+active\s+up\s+127\.0\.0\.1:7001\s+\d{4}-\d\d-\d\dT\S+\s+\d{4}-\d\d-\d\d\s+0$/, 'alpha row');
    t.match(lines[2], /^beta\s+active\s+down\s+127\.0\.0\.1:7002\s+\S+\s+\d{4}-\d\d-\d\d\s+1$/, 'beta row: down, one user');
    t.match(lines[3], /^gamma\s+active\s+never seen\s+-\s+never\s+\d{4}-\d\d-\d\d \(expires in (9|10) days\)\s+0$/, 'gamma row: the expiry warning');
    t.notMatch(lines[1], /expires in/, 'no warning for a long-lived certificate');
  });

  t.test('cert issue for an existing node: the next certificate, current one kept', async (t) => {
    const oldFp = certOf(join(A, 'certs', 'node.crt')).fingerprint256;
    const out2 = join(root, 'reissue-alpha');
    const r = run([...CA, 'cert', 'issue', 'alpha', '--out', out2]);
    t.equal(r.code, 0, `re-issue exits 0 ${r.err}`);
    t.match(r.out, /and restart pigeon serve there/, 'says to install it and restart');
    t.match(r.out, `${join(out2, 'node.crt')} + ${join(out2, 'node.key')}`, 'names the files to install');
    const newFp = certOf(join(out2, 'node.crt')).fingerprint256;
    t.not(newFp, oldFp, 'a new certificate');
    const alpha = byName(nodes(A), 'alpha');
    t.equal(alpha?.fingerprint, oldFp, 'node list still shows the running certificate');
    t.equal(alpha?.next_fingerprint, newFp, 'and the new one as next');
    t.equal(dbNodes().find((n) => n.name === 'alpha')?.next_fingerprint, newFp, 'the database holds it as next_fingerprint');
    t.match(run([...CA, 'node', 'list']).out, /^alpha\s.*\[re-issued: restart pending\]/m, 'the text list says a restart is pending');

    // what `pigeon serve` does when it restarts with the new certificate
    const store = await openStore(shared);
    try {
      const x = certOf(join(out2, 'node.crt'));
      const reg = await store.registerSelf({ name: 'alpha', fingerprint: newFp, certExpires: new Date(x.validTo).toISOString(), peerAddress: null }, { heartbeat: true });
      t.equal(reg.promoted, true, 'the next certificate is promoted on registration');
    } finally {
      await store.close();
    }
    const after = byName(nodes(A), 'alpha');
    t.equal(after?.fingerprint, newFp, 'now the current certificate');
    t.equal(after?.next_fingerprint, null, 'no next one left');
  });

  t.test('node remove: refused while users live there; then revokes its certificate for good', async (t) => {
    const busy = run([...CA, 'node', 'remove', 'beta']);
    t.equal(busy.code, 65, 'remove with a user homed there: exit 65');
    t.match(busy.err, /node beta still holds 1 user mailbox/);
    t.ok(byName(nodes(A), 'beta'), 'beta is still there');

    t.equal(run([...CA, 'user', 'del', 'x@d.test']).code, 0, 'the user leaves');
    const r = run([...CA, 'node', 'remove', 'beta']);
    t.equal(r.code, 0, `remove exits 0 ${r.err}`);
    t.match(r.out, /node beta removed; 1 certificate\(s\) revoked/);
    t.notOk(byName(nodes(A), 'beta'), 'gone from node list');
    const missing = run([...CA, 'node', 'remove', 'beta']);
    t.equal(missing.code, 68, 'removing it again: exit 68');

    const back = join(root, 'beta-again');
    const again = run(['init', back, '--node', 'beta', '--ca-from', OUT, '--db', shared]);
    t.equal(again.code, 78, 'the removed node\'s certificate cannot join again: exit 78');
    t.match(again.err, /certificate was revoked when node beta was removed/);
    t.match(again.err, /pigeon cert issue beta --out DIR/, 'says how to come back');
    t.notOk(existsSync(back), 'nothing created');
    t.notOk(dbNodes().some((n) => n.name === 'beta'), 'no row for beta');

    // a fresh certificate lets it back in
    const fresh = join(root, 'issued-beta-2');
    t.equal(run([...CA, 'cert', 'issue', 'beta', '--out', fresh]).code, 0, 'a new certificate for beta');
    const rejoin = run(['init', join(root, 'beta-2'), '--node', 'beta', '--ca-from', fresh, '--db', shared]);
    t.equal(rejoin.code, 0, `beta rejoins with it ${rejoin.err}`);
    t.equal(byName(nodes(A), 'beta')?.fingerprint, certOf(join(fresh, 'node.crt')).fingerprint256);
  });
}
