/**
 * The instance configuration and its database as an admin meets them through the CLI:
 * pigeon.yaml errors name file:line:col and exit 78; conf.d drop-ins merge in lexical order; a
 * missing, read-only, foreign or locked database gets its own clear message and exit code.
 * (What `config test` checks beyond the files: config-test.test.ts.)
 * Needs `npx tsc -p tsconfig.json` first (npm test does it).
 */
import t from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import { chmodSync, existsSync, readFileSync, rmSync, writeFileSync, copyFileSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { loadInstance } from '../src/instance.js';

import { CLI_JS as CLI, cleanEnv, runCli, startCli, templateInstances, type CliRun } from './helpers/cli.js';

type Run = CliRun;
const run = runCli;
const runAsync = (args: readonly string[]): Promise<Run> => startCli(args);

const { root, template, instance } = templateInstances(t, ['--node', 'cfg1', '--listen', 'imap=127.0.0.1:1143']);

/** Replace one whole line of pigeon.yaml; returns its 1-based line number. */
function editLine(dir: string, line: string, replacement: string): number {
  const file = join(dir, 'pigeon.yaml');
  const lines = readFileSync(file, 'utf8').split('\n');
  const i = lines.indexOf(line);
  if (i < 0) throw new Error(`line ${JSON.stringify(line)} not in pigeon.yaml`);
  lines[i] = replacement;
  writeFileSync(file, lines.join('\n'));
  return i + 1;
}

function domains(dbFile: string): string[] {
  const db = new Database(dbFile, { readonly: true });
  try {
    return (db.prepare('SELECT name FROM domains ORDER BY name').all() as { name: string }[]).map((d) => d.name);
  } finally {
    db.close();
  }
}

t.test('the template instance is valid', async (t) => {
  const r = run(['-c', template, 'config', 'test']);
  t.equal(r.code, 0, `config test exits 0 ${r.err}`);
  t.match(r.out, /configuration OK/);
  t.equal(run(['-c', join(template, 'pigeon.yaml'), 'config', 'test']).code, 0, '-c FILE works as well as -c DIR');
  t.equal(run(['config', 'test'], { env: { PIGEON_CONFIG: template } }).code, 0, 'PIGEON_CONFIG selects the instance');
});

t.test('syntax errors: exit 78 with pigeon.yaml:LINE:COL', async (t) => {
  const cases: [string, string, number][] = [
    ['mail_user: mail: x', 'a nested mapping in a compact one', 12],
    ['mail_user: @mail', 'a reserved character', 12],
    ['\tmail_user: mail', 'a tab as indentation', 1],
  ];
  const prepared = cases.map(([bad, what, col]) => {
    const dir = instance();
    return { dir, what, col, line: editLine(dir, 'mail_user: mail', bad) };
  });
  const runs = await Promise.all(prepared.map((c) => runAsync(['-c', c.dir, 'domain', 'list'])));
  prepared.forEach(({ dir, what, col, line }, i) => {
    const r = runs[i] as Run;
    t.equal(r.code, 78, `${what}: exit 78`);
    t.match(r.err, `${join(dir, 'pigeon.yaml')}:${line}:${col}: syntax error`, `${what}: names pigeon.yaml:${line}:${col}`);
    t.equal(r.err.trim().split('\n').length, 1, `${what}: one line on stderr`);
  });
  const dir = instance();
  const line = editLine(dir, 'mail_user: mail', 'mail_user: mail\nmail_user: again');
  const r = run(['-c', dir, 'config', 'test']);
  t.equal(r.code, 78, 'a duplicate key: exit 78');
  t.match(r.err, `pigeon.yaml:${line + 1}:1:`, 'names the second occurrence');
});

t.test('unknown keys and wrong types: exit 78 naming file:line:col and the key', async (t) => {
  const cases: [string, string, string, number, RegExp][] = [
    ['mail_user: mail', 'mail_usr: mail', 'top-level typo', 1, /mail_usr: unknown key mail_usr/],
    ['  max_line: 8192', '  max_lien: 8192', 'nested typo', 3, /limits\.max_lien: unknown key max_lien/],
    ['  max_line: 8192', '  max_line: "x"', 'a string for a number', 13, /limits\.max_line: .*expected number/],
    ['  max_line: 8192', '  max_line: 10', 'a number below its minimum', 13, /limits\.max_line: .*>=512/],
    ['  level: info', '  level: loud', 'a value not in the list', 10, /log\.level: .*"debug"/],
  ];
  const prepared = cases.map(([from, to, what, col, msg]) => {
    const dir = instance();
    return { dir, what, col, msg, line: editLine(dir, from, to) };
  });
  const runs = await Promise.all(prepared.map((c) => runAsync(['-c', c.dir, 'domain', 'list'])));
  prepared.forEach(({ dir, what, col, msg, line }, i) => {
    const r = runs[i] as Run;
    t.equal(r.code, 78, `${what}: exit 78`);
    t.match(r.err, `${join(dir, 'pigeon.yaml')}:${line}:${col}: `, `${what}: pigeon.yaml:${line}:${col}`);
    t.match(r.err, msg, `${what}: names the key`);
  });
  // a wrong type written as a flow mapping, as in the issue
  const dir = instance();
  writeFileSync(join(dir, 'pigeon.yaml'), `${readFileSync(join(template, 'pigeon.yaml'), 'utf8').replace(/^limits:\n(  .*\n|\s*#.*\n)*/m, '')}limits: {max_line: "x"}\n`);
  const lines = readFileSync(join(dir, 'pigeon.yaml'), 'utf8').split('\n');
  const line = lines.indexOf('limits: {max_line: "x"}') + 1;
  t.ok(line > 0, 'flow mapping written');
  const r = run(['-c', dir, 'config', 'test']);
  t.equal(r.code, 78, 'limits: {max_line: "x"}: exit 78');
  t.match(r.err, `pigeon.yaml:${line}:20: limits.max_line:`, 'points at the value');
  const listen = instance();
  const l2 = editLine(listen, 'listen:', 'listen:\n  - "smtp=1.2.3.4:25"');
  const r2 = run(['-c', listen, 'config', 'test']);
  t.equal(r2.code, 78, 'a bad listener: exit 78');
  t.match(r2.err, new RegExp(`pigeon\\.yaml:${l2 + 1}:\\d+: listen\\.0: .*smtp`), 'names the listener line');
});

t.test('conf.d drop-ins merge in lexical order; an error names the drop-in', async (t) => {
  const dir = instance();
  copyFileSync(join(dir, 'pigeon.db'), join(dir, 'from-9.db'));
  copyFileSync(join(dir, 'pigeon.db'), join(dir, 'from-10.db'));
  // "9-..." sorts after "10-...": lexical, not numeric, so 9-last.yaml is merged last
  writeFileSync(join(dir, 'conf.d', '9-last.yaml'), 'database: sqlite:from-9.db\n');
  writeFileSync(join(dir, 'conf.d', '10-first.yaml'), 'database: from-10.db\nlimits:\n  max_line: 4096\nlisten: ["pop3=127.0.0.1:1110"]\n');
  writeFileSync(join(dir, 'conf.d', 'ignored.txt'), 'this: [is not yaml\n');
  const r = run(['-c', dir, 'config', 'test']);
  t.equal(r.code, 0, `config test exits 0 ${r.err}`);
  const ok = r.out.split('\n').find((l) => l.startsWith('configuration OK:')) ?? '';
  const files = ok.slice(ok.indexOf(':') + 1, ok.indexOf(';')).split(',').map((s) => s.trim());
  t.same(files, [join(dir, 'pigeon.yaml'), join(dir, 'conf.d', '10-first.yaml'), join(dir, 'conf.d', '9-last.yaml')], 'files read in lexical order; only *.yaml');
  t.match(r.out, `database ${join(dir, 'from-9.db')}`, 'the last drop-in wins');
  t.equal(run(['-c', dir, 'domain', 'add', 'dropin.test']).code, 0, 'commands use the merged database setting');
  t.same(domains(join(dir, 'from-9.db')), ['dropin.test'], 'written to the database named by the last drop-in');
  t.same(domains(join(dir, 'pigeon.db')), [], 'not to the one in pigeon.yaml');

  const inst = loadInstance(dir);
  t.equal(inst.config.limits.max_line, 4096, 'a drop-in sets a nested key');
  t.equal(inst.config.limits.preauth_timeout_s, 60, 'maps merge: the other keys of the map stay');
  t.same(inst.config.listen.map((l) => `${l.protocol}=${l.host}:${l.port}`), ['pop3=127.0.0.1:1110'], 'lists replace');

  writeFileSync(join(dir, 'conf.d', '50-bad.yaml'), '# a comment\nlimits:\n  max_line: "x"\n');
  const bad = run(['-c', dir, 'config', 'test']);
  t.equal(bad.code, 78, 'an error in a drop-in: exit 78');
  t.match(bad.err, `${join(dir, 'conf.d', '50-bad.yaml')}:3:13: limits.max_line`, 'names the drop-in file:line:col');
  writeFileSync(join(dir, 'conf.d', '50-bad.yaml'), 'limits: [\n');
  const syn = run(['-c', dir, 'config', 'test']);
  t.equal(syn.code, 78);
  t.match(syn.err, /50-bad\.yaml:\d+:\d+: syntax error/, 'a syntax error in a drop-in names it');
  writeFileSync(join(dir, 'conf.d', '50-bad.yaml'), 'nodes: x\n');
  const unk = run(['-c', dir, 'config', 'test']);
  t.equal(unk.code, 78);
  t.match(unk.err, /50-bad\.yaml:1:1: nodes: unknown key nodes/, 'an unknown key in a drop-in names it');
  // a path that is not UTF-8 (Latin-1 é): refused by file:line, never read as U+FFFD
  writeFileSync(join(dir, 'conf.d', '50-bad.yaml'), Buffer.concat([Buffer.from('# mail root\nmail_root: /srv/caf'), Buffer.from([0xe9]), Buffer.from('/mail\n')]));
  const enc = run(['-c', dir, 'config', 'test']);
  t.equal(enc.code, 78, `a drop-in that is not UTF-8: exit 78 ${enc.err}`);
  t.match(enc.err, `${join(dir, 'conf.d', '50-bad.yaml')}:2: not valid UTF-8`, 'names the file and line');
});

t.test('missing configuration: exit 78', async (t) => {
  const gone = join(root, 'no-such-instance');
  const r = run(['-c', gone, 'domain', 'list']);
  t.equal(r.code, 78, '-c to a missing instance');
  t.match(r.err, `${gone}: no such configuration file`);
  t.match(r.err, /pigeon init/, 'says how to make one');
  const e = run(['domain', 'list'], { env: { PIGEON_CONFIG: join(gone, 'pigeon.yaml') } });
  t.equal(e.code, 78, 'PIGEON_CONFIG to a missing file');
  t.match(e.err, 'no such configuration file');
  const empty = instance();
  rmSync(join(empty, 'pigeon.yaml'));
  t.equal(run(['-c', empty, 'domain', 'list']).code, 78, 'an instance directory without pigeon.yaml');
  const notMap = instance();
  writeFileSync(join(notMap, 'pigeon.yaml'), '- just\n- a list\n');
  const nm = run(['-c', notMap, 'domain', 'list']);
  t.equal(nm.code, 78, 'a file that is not a mapping');
  t.match(nm.err, 'pigeon.yaml:1:1:');
});

t.test('database missing, foreign or unsupported: exit 78 saying which', async (t) => {
  const dir = instance();
  const dbFile = join(dir, 'pigeon.db');
  rmSync(dbFile);
  const r = run(['-c', dir, 'domain', 'list']);
  t.equal(r.code, 78, 'deleted database file: 78');
  t.match(r.err, `database ${dbFile} does not exist`, 'names the file and says it is missing');
  t.equal(run(['-c', dir, 'domain', 'add', 'x.test']).code, 78, 'a write too');
  t.notOk(existsSync(dbFile), 'no empty database was created behind the admin\'s back');

  const moved = instance();
  editLine(moved, 'database: "sqlite:pigeon.db"', 'database: "sqlite:/nonexistent-dir/pigeon.db"');
  const m = run(['-c', moved, 'domain', 'list']);
  t.equal(m.code, 78, 'database in a missing directory: 78');
  t.match(m.err, '/nonexistent-dir/pigeon.db');

  const foreign = instance();
  writeFileSync(join(foreign, 'pigeon.db'), 'this is not a database, just some text that is long enough to be a header...\n'.repeat(20));
  const f = run(['-c', foreign, 'domain', 'list']);
  t.equal(f.code, 78, 'not an SQLite file: 78');
  t.match(f.err, /not a PigeonDeliver SQLite database/);

  const pg = instance();
  editLine(pg, 'database: "sqlite:pigeon.db"', 'database: "mysql://pigeon:secret@db.example.test/pigeon"');
  const p = run(['-c', pg, 'domain', 'list']);
  t.equal(p.code, 78, 'an unsupported database URL: 78');
  t.match(p.err, /expected sqlite:PATH, a path, or postgres:/);
  t.notMatch(p.err, /secret/, 'the password in the URL is not printed');
});

t.test('read-only database: exit 78 saying read-only, nothing written', async (t) => {
  // root writes through any file mode, so run the CLI as "nobody" on a copy it can read but not write
  const asRoot = process.getuid?.() === 0;
  const ids = asRoot ? { uid: Number(spawnSync('id', ['-u', 'nobody'], { encoding: 'utf8' }).stdout), gid: Number(spawnSync('id', ['-g', 'nobody'], { encoding: 'utf8' }).stdout) } : {};
  t.comment(asRoot ? `running the CLI as nobody (${ids.uid ?? ''}:${ids.gid ?? ''})` : 'running the CLI as this non-root user');
  for (const dirWritable of [false, true]) {
    const what = dirWritable ? 'file read-only, directory writable' : 'file and directory read-only';
    const dir = instance();
    const dbFile = join(dir, 'pigeon.db');
    chmodSync(join(dir, 'pigeon.yaml'), 0o644);
    chmodSync(dbFile, 0o444);
    chmodSync(dir, dirWritable ? 0o1777 : 0o555);
    t.teardown(() => chmodSync(dir, 0o755));
    const r = run(['-c', dir, 'domain', 'add', 'ro.test'], ids);
    t.equal(r.code, 78, `${what}: a write exits 78`);
    t.match(r.err, `database ${dbFile} is read-only`, `${what}: says which database and that it is read-only`);
    t.same(domains(dbFile), [], `${what}: nothing written`);
  }
});

t.test('locked database: a writer waits for the busy timeout, then exits 75', async (t) => {
  const dir = instance();
  const dbFile = join(dir, 'pigeon.db');
  const holder = new Database(dbFile);
  t.teardown(() => {
    if (holder.inTransaction) holder.prepare('ROLLBACK').run();
    holder.close();
  });
  holder.prepare('BEGIN EXCLUSIVE').run();
  const r = run(['-c', dir, 'domain', 'add', 'locked.test']);
  t.equal(r.code, 75, 'exit 75 (try again later)');
  t.match(r.err, `database ${dbFile} is locked`, 'says the database is locked');
  t.ok(r.ms >= 4500, `waited for the 5 s busy timeout first (${r.ms} ms)`);
  const rd = run(['-c', dir, 'domain', 'list']);
  t.equal(rd.code, 0, 'readers are not blocked by a writer (WAL)');
  // a command without a wait (its start-up alone takes seconds under load) + the 5 s timeout,
  // with room for the load to change between the two
  t.ok(r.ms < rd.ms + 5000 + 20_000, `and did not hang (${r.ms} ms; ${rd.ms} ms for a command that does not wait)`);
  holder.prepare('ROLLBACK').run();
  const w = run(['-c', dir, 'domain', 'add', 'locked.test']);
  t.equal(w.code, 0, 'once the lock is gone the same command succeeds');
  t.same(domains(dbFile), ['locked.test']);

  // a lock released while the writer waits: it succeeds without an error
  const dir2 = instance();
  const h2 = new Database(join(dir2, 'pigeon.db'));
  t.teardown(() => h2.close());
  h2.prepare('BEGIN EXCLUSIVE').run();
  const release = setTimeout(() => h2.prepare('ROLLBACK').run(), 1000);
  const child = await new Promise<{ code: number | null; err: string }>((resolve) => {
    const c = spawn(process.execPath, [CLI, '-c', dir2, 'domain', 'add', 'waited.test'], { env: cleanEnv() });
    let err = '';
    c.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
    c.on('close', (code) => resolve({ code, err }));
  });
  clearTimeout(release);
  t.equal(child.code, 0, `a writer that finds the lock released within the timeout succeeds ${child.err}`);
  t.same(domains(join(dir2, 'pigeon.db')), ['waited.test']);
});
