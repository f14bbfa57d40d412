// The parsed configuration next to pigeon.yaml (src/instance-parsed.ts): root and pigeon.yaml's
// owner write it, the mail user's `pigeon deliver` (pipe(8) user=mail) takes it instead of parsing
// the YAML, only from root (or pigeon.yaml's owner), not writable by others, not through a link,
// and only for exactly the texts the files have now. What a user checks: where the delivery
// logs (conf.d sets log.file), as the only effect the cache's content can have, and the file's
// owner and mode.
import t, { type Test } from 'tap';
import { spawnSync } from 'node:child_process';
import { appendFileSync, chmodSync, chownSync, existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT, cli, ok, need, makeInstance, maildirOf, files, msg, MAIL_UID, MAIL_GID } from './helpers/delivery-env.js';
import { scratchDir } from './helpers/instance.js';

const PIGEON = join(ROOT, 'dist', 'src', 'cli.cjs');
const PATH = `PATH=${process.env['PATH'] ?? '/usr/bin:/bin'}`;
const ALICE = 'alice@example.test';
const CACHE = '.pigeon.yaml.parsed.json';
const ROOT_ONLY = { skip: process.getuid?.() !== 0 ? 'needs root (the mail user reads what root wrote)' : false };

/**
 * An instance as pipe(8) user=mail uses it, laid out as README's pipe(8) section says: the
 * instance directory, pigeon.yaml (root:mail 0640) and conf.d root's; the SQLite database in a
 * directory of its own and the mail root the mail user's; deliveries log to logs/a.log.
 */
function mailInstance(t: Test): string {
  need('/usr/bin/setpriv', 'util-linux');
  const inst = makeInstance(scratchDir(t), [ALICE]);
  for (const d of ['db', 'logs']) {
    mkdirSync(join(inst, d));
    chownSync(join(inst, d), MAIL_UID, MAIL_GID);
  }
  for (const f of readdirSync(inst)) if (/^pigeon\.db/.test(f)) renameSync(join(inst, f), join(inst, 'db', f));
  writeFileSync(join(inst, 'conf.d', '10-db.yaml'), 'database: sqlite:db/pigeon.db\n');
  writeFileSync(join(inst, 'conf.d', '50-log.yaml'), 'log:\n  level: debug\n  file: logs/a.log\n');
  spawnSync('chown', ['-R', 'mail:mail', join(inst, 'db'), join(inst, 'mail')]);
  chownSync(join(inst, 'pigeon.yaml'), 0, MAIL_GID);
  chmodSync(join(inst, 'pigeon.yaml'), 0o640);
  return inst;
}

/** `pigeon deliver` as the mail user, in-process (no serve), as pipe(8) runs it. */
function deliverAsMail(t: Test, inst: string, subject: string): void {
  const r = spawnSync('setpriv', [`--reuid=${MAIL_UID}`, `--regid=${MAIL_GID}`, '--clear-groups', 'env', '-i', PATH, process.execPath, PIGEON, '-c', inst, 'deliver', '-f', 'bob@remote.test', '--', ALICE], {
    input: msg({ subject }),
    encoding: 'utf8',
    timeout: 120_000,
  });
  t.equal(r.status, 0, `delivered (${subject}): ${r.stdout}${r.stderr}`);
}

const LOGS = ['logs/a.log', 'logs/forged.log'] as const;
/** How many deliveries each log file records. */
function logged(inst: string): number[] {
  return LOGS.map((f) => {
    const p = join(inst, f);
    return existsSync(p) ? readFileSync(p, 'utf8').split('\n').filter((l) => /deliver\(alice@example\.test\): delivered/.test(l)).length : 0;
  });
}
/** Deliver one message as the mail user; the log files that recorded it. */
function deliverLogs(t: Test, inst: string, subject: string): string[] {
  const before = logged(inst);
  deliverAsMail(t, inst, subject);
  const after = logged(inst);
  return LOGS.filter((_, i) => (after[i] ?? 0) > (before[i] ?? 0));
}

/** A cache made from the files' real texts but whose parsed conf.d file sends the log elsewhere. */
function forge(inst: string, raws: (r: Record<string, unknown>[]) => void = (r) => ((r[2] as { log: { file: string } }).log.file = 'logs/forged.log')): void {
  const p = join(inst, CACHE);
  const c = JSON.parse(readFileSync(p, 'utf8')) as { raws: Record<string, unknown>[] };
  raws(c.raws);
  writeFileSync(p, JSON.stringify(c));
  chownSync(p, 0, MAIL_GID);
  chmodSync(p, 0o640);
}

t.test('a root command writes the parsed files next to pigeon.yaml, readable as pigeon.yaml is', ROOT_ONLY, async (t) => {
  const inst = mailInstance(t);
  ok(cli(inst, ['user', 'list']), 'user list');
  const p = join(inst, CACHE);
  const st = statSync(p);
  t.equal(st.uid, 0, 'owned by root');
  t.equal(st.gid, MAIL_GID, "with pigeon.yaml's group");
  t.equal(st.mode & 0o777, 0o640, "pigeon.yaml's mode (the conf.d file is world-readable)");
  const c = JSON.parse(readFileSync(p, 'utf8')) as { files: { path: string; text: string }[]; raws: unknown[] };
  t.same(
    c.files.map((f) => f.path),
    [join(inst, 'pigeon.yaml'), join(inst, 'conf.d', '10-db.yaml'), join(inst, 'conf.d', '50-log.yaml')],
    'the files in the order they merge',
  );
  t.equal(c.files[2]?.text, readFileSync(join(inst, 'conf.d', '50-log.yaml'), 'utf8'), 'with their text');
  t.same(c.raws[2], { log: { level: 'debug', file: 'logs/a.log' } }, 'and what they parse to');

  // a file only root may read: so may the cache
  writeFileSync(join(inst, 'conf.d', '60-secret.yaml'), 'log:\n  level: debug\n');
  chmodSync(join(inst, 'conf.d', '60-secret.yaml'), 0o600);
  ok(cli(inst, ['user', 'list']), 'user list');
  t.equal(statSync(p).mode & 0o777, 0o600, 'a conf.d file readable by root only: the cache too');

  // pigeon.yaml's group changes, nothing else: so does the cache's
  spawnSync('rm', ['-f', join(inst, 'conf.d', '60-secret.yaml')]);
  ok(cli(inst, ['user', 'list']), 'user list');
  t.equal(statSync(p).gid, MAIL_GID, "pigeon.yaml's group again");
  chownSync(join(inst, 'pigeon.yaml'), 0, 0);
  ok(cli(inst, ['user', 'list']), 'user list');
  t.equal(statSync(p).gid, 0, "pigeon.yaml now root's group: the cache's too (the mail group reads neither)");
});

t.test("the mail user's delivery takes it only from root, not writable by others, not through a link, for exactly these texts", ROOT_ONLY, async (t) => {
  const inst = mailInstance(t);
  ok(cli(inst, ['user', 'list']), 'user list (writes the cache)');
  t.same(deliverLogs(t, inst, 'genuine'), ['logs/a.log'], 'the configured log');
  t.equal(files(join(maildirOf(inst, ALICE), 'new')).length, 1, 'delivered');

  // what the delivery takes from the cache: a forged one (root's, right texts) shows it
  forge(inst);
  t.same(deliverLogs(t, inst, 'forged, root'), ['logs/forged.log'], "root's cache of these very texts is what the delivery used");

  const p = join(inst, CACHE);
  chownSync(p, MAIL_UID, MAIL_GID);
  t.same(deliverLogs(t, inst, 'forged, mail-owned'), ['logs/a.log'], "a cache the mail user owns is ignored: the YAML is parsed");

  chownSync(p, 0, MAIL_GID);
  chmodSync(p, 0o660);
  t.same(deliverLogs(t, inst, 'forged, group-writable'), ['logs/a.log'], 'a group-writable cache is ignored');

  chmodSync(p, 0o640);
  renameSync(p, join(inst, 'elsewhere.json'));
  symlinkSync(join(inst, 'elsewhere.json'), p);
  t.same(deliverLogs(t, inst, 'forged, through a link'), ['logs/a.log'], 'a link is not followed');

  spawnSync('rm', ['-f', p]);
  renameSync(join(inst, 'elsewhere.json'), p);
  t.same(deliverLogs(t, inst, 'forged again'), ['logs/forged.log'], '(the same file in place again is taken)');

  appendFileSync(join(inst, 'conf.d', '50-log.yaml'), '# edited\n');
  t.same(deliverLogs(t, inst, 'edited'), ['logs/a.log'], 'a file edited since: its text differs, the YAML is parsed');

  writeFileSync(join(inst, 'conf.d', '40-more.yaml'), 'log:\n  level: debug\n');
  ok(cli(inst, ['user', 'list']), 'user list (rewrites the cache)');
  forge(inst, (r) => ((r[3] as { log: { file: string } }).log.file = 'logs/forged.log'));
  writeFileSync(join(inst, 'conf.d', '45-new.yaml'), '{}\n');
  t.same(deliverLogs(t, inst, 'new file'), ['logs/a.log'], 'a conf.d file added since: the YAML is parsed');

  t.equal(files(join(maildirOf(inst, ALICE), 'new')).length, 8, 'every message delivered');
});

t.test('a cached configuration this code refuses is parsed from the YAML again; root never reads the cache and rewrites a wrong one', ROOT_ONLY, async (t) => {
  const inst = mailInstance(t);
  ok(cli(inst, ['user', 'list']), 'user list (writes the cache)');
  forge(inst, (r) => ((r[2] as { log: { file: unknown } }).log.file = 5));
  t.same(deliverLogs(t, inst, 'invalid cache'), ['logs/a.log'], 'an invalid parsed form: the YAML decides');

  forge(inst);
  const before = logged(inst);
  const r = spawnSync(process.execPath, [PIGEON, '-c', inst, 'deliver', '-f', 'bob@remote.test', '--', ALICE], { input: msg({ subject: 'as root' }), encoding: 'utf8', env: { PATH: process.env['PATH'] ?? '/usr/bin:/bin' }, timeout: 120_000 });
  t.equal(r.status, 0, `delivered as root: ${r.stdout}${r.stderr}`);
  t.same(logged(inst).map((n, i) => n - (before[i] ?? 0)), [1, 0], 'root parses the YAML itself');
  const c = JSON.parse(readFileSync(join(inst, CACHE), 'utf8')) as { raws: unknown[] };
  t.same(c.raws[2], { log: { level: 'debug', file: 'logs/a.log' } }, 'and writes what it parsed over the forged cache');
});

t.test('an instance directory the mail user may write: root writes no parsed configuration there, and deliveries parse the YAML', ROOT_ONLY, async (t) => {
  const inst = mailInstance(t);
  t.ok(existsSync(join(inst, CACHE)), "(root's commands while the directory was root's wrote one)");
  rmSync(join(inst, CACHE));
  chownSync(inst, MAIL_UID, MAIL_GID);
  ok(cli(inst, ['user', 'list']), 'user list');
  t.notOk(existsSync(join(inst, CACHE)), 'no file written by root into a directory the mail user may change');
  chownSync(inst, 0, 0);
  chmodSync(inst, 0o775);
  ok(cli(inst, ['user', 'list']), 'user list');
  t.notOk(existsSync(join(inst, CACHE)), 'nor into a group-writable one');
  t.same(deliverLogs(t, inst, 'no cache'), ['logs/a.log'], 'delivered, from the YAML');
});
