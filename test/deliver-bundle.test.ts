// `pigeon deliver` without a running serve delivers in its own process; the `pigeon` command
// (dist/src/cli.cjs) then loads the delivery code from one CommonJS file that `npm run build`
// bundles, dist/src/deliver-inproc.cjs, compiled with the V8 code cache the build trained with a
// real delivery (src/launcher.ts, src/delivery/inproc-bundle.ts, scripts/bundle-deliver.mjs).
// What a user checks: the message, the exit code and the status line are as before, as the mail
// user (pipe(8)) and as root (by hand), with a delivery module named in the configuration (a
// dynamic import from inside the bundle); what the process loaded: the bundle with its cache, no
// module file of dist/, no second copy of pigeon's code.
import t, { type Test } from 'tap';
import { spawnSync } from 'node:child_process';
import { chmodSync, copyFileSync, existsSync, mkdirSync, readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT, cli, ok, need, makeInstance, setUser, maildirOf, files, msg, MAIL_UID, MAIL_GID } from './helpers/delivery-env.js';
import { scratchDir } from './helpers/instance.js';
import { loadRecorder, recordDir } from './helpers/load-recorder.js';
import { startPostgres } from './helpers/postgres.js';
import { BUILD_LINE, cacheFile } from '../src/delivery/inproc-bundle.js';

const PIGEON = join(ROOT, 'dist', 'src', 'cli.cjs');
const BUNDLE = join(ROOT, 'dist', 'src', 'deliver-inproc.cjs');
const PATH = `PATH=${process.env['PATH'] ?? '/usr/bin:/bin'}`;
const ALICE = 'alice@example.test';

/** An instance as pipe(8) user=mail needs it, with the example delivery module named in conf.d and a debug log. */
function mailInstance(t: Test): string {
  need('/usr/bin/setpriv', 'util-linux');
  const inst = makeInstance(scratchDir(t), [ALICE]);
  copyFileSync(join(ROOT, 'test', 'fixtures', 'delivery-add-header.mjs'), join(inst, 'delivery-add-header.mjs'));
  chmodSync(join(inst, 'delivery-add-header.mjs'), 0o644);
  mkdirSync(join(inst, 'conf.d'), { recursive: true });
  writeFileSync(join(inst, 'conf.d', '50-bundle.yaml'), 'modules:\n  delivery:\n    add-header: delivery-add-header.mjs\nlog:\n  level: debug\n  file: pigeon.log\n');
  writeFileSync(join(inst, 'pigeon.log'), '');
  setUser(inst, ALICE, 'add-header.enabled', 'true');
  setUser(inst, ALICE, 'add-header.value', 'added in the bundle');
  return inst;
}

/** Where a deliver as the mail user records what it loaded: a CommonJS preload and the ES module recorder's file. */
function recordDirs(t: Test): { rec: string; loaded: string; esm: string } {
  const { rec, files } = recordDir(t, ['loaded.json', 'esm.txt'], MAIL_UID, MAIL_GID);
  const [loaded = '', esm = ''] = files;
  // every script compiled through node:vm (the bundle: with or without its cache) and, at exit,
  // every file require() loaded
  writeFileSync(
    join(rec, 'preload.cjs'),
    `const vm = require('vm'); const S = vm.Script; const scripts = [];
vm.Script = class extends S { constructor(src, o) { super(src, o); scripts.push({ file: o && o.filename, given: o !== undefined && o.cachedData !== undefined, rejected: this.cachedDataRejected === true }); } };
process.on('exit', () => require('fs').writeFileSync(${JSON.stringify(loaded)}, JSON.stringify({ scripts, files: Object.keys(require.cache), builtins: process.moduleLoadList })));
`,
  );
  return { rec, loaded, esm };
}

interface Record {
  scripts: { file: string; given: boolean; rejected: boolean }[];
  files: string[];
  builtins: string[];
}

t.test('the build wrote the bundle and its code cache, named by the bundle\'s build ID', async (t) => {
  t.ok(existsSync(BUNDLE), `${BUNDLE} (npm run build)`);
  const id = BUILD_LINE.exec(readFileSync(BUNDLE, 'utf8').slice(0, 64))?.[1];
  t.match(id, /^[0-9a-f]{16}$/, 'the first line names the build');
  // every in-process delivery reads it as its source: all ASCII, so node decodes it to a one-byte string
  t.equal(/[^\x00-\x7f]/.exec(readFileSync(BUNDLE, 'latin1'))?.index, undefined, 'the bundle is all ASCII (no comments left in it)');
  t.ok(id !== undefined && statSync(cacheFile(BUNDLE, id)).size > 100_000, 'its cache: the functions of a delivery, not only the top level');
  t.same(
    readdirSync(join(ROOT, 'dist', 'src')).filter((f) => f.endsWith('.v8cache')),
    [`deliver-inproc.cjs.${id}.v8cache`],
    'no cache of an earlier build is left',
  );
});

t.test('without serve, as the mail user: delivered from the bundle with its code cache; no module file of dist/ loaded', async (t) => {
  const inst = mailInstance(t);
  spawnSync('chown', ['-R', 'mail:mail', inst]);
  const { rec, loaded, esm } = recordDirs(t);
  const register = loadRecorder(rec, esm);
  const body = 'bytes stay bytes: caf\xe9 \xff\x80\nsecond line\n';
  const r = spawnSync(
    'setpriv',
    [`--reuid=${MAIL_UID}`, `--regid=${MAIL_GID}`, '--clear-groups', 'env', '-i', PATH, process.execPath, '-r', join(rec, 'preload.cjs'), '--import', register, PIGEON, '-c', inst, 'deliver', '-f', 'bob@remote.test', '--', ALICE],
    { input: Buffer.from(msg({ subject: 'in-process', body }), 'latin1'), timeout: 120_000 },
  );
  t.equal(r.status, 0, `exit 0: ${String(r.stdout)}${String(r.stderr)}`);
  t.equal(String(r.stdout), '', 'no status line on success');
  const log = readFileSync(join(inst, 'pigeon.log'), 'utf8');
  t.match(log, new RegExp(`pigeon\\[${r.pid}\\]: deliver\\(alice@example\\.test\\): delivered`), 'delivered by the deliver process itself');
  const box = join(maildirOf(inst, ALICE), 'new');
  t.equal(files(box).length, 1, 'one copy');
  const stored = readFileSync(join(box, files(box)[0] ?? ''));
  t.match(stored.toString('latin1'), /^Return-Path: <bob@remote\.test>\nDelivered-To: alice@example\.test\nX-Pigeon-Example: added in the bundle\n/, 'envelope lines and the module\'s header (loaded by an import() inside the bundle)');
  t.ok(stored.subarray(stored.length - Buffer.byteLength(body, 'latin1')).equals(Buffer.from(body, 'latin1')), 'the body, byte for byte');
  t.equal(statSync(join(box, files(box)[0] ?? '')).uid, MAIL_UID, 'owned by the mail user');

  const rec2 = JSON.parse(readFileSync(loaded, 'utf8')) as Record;
  t.same(rec2.scripts, [{ file: BUNDLE, given: true, rejected: false }], 'one script compiled: the bundle, with its code cache, which V8 took');
  const ours = rec2.files.filter((f) => f.startsWith(`${ROOT}/dist/`) || f.startsWith(`${ROOT}/auth/`) || f.startsWith(`${ROOT}/src/`));
  t.same(ours, [PIGEON], 'of pigeon\'s files, require() loaded cli.cjs only');
  // a one-shot process counts nothing (src/metrics.ts countNothing): prom-client stays unloaded
  t.same(rec2.files.filter((f) => f.includes('/node_modules/prom-client/')), [], 'prom-client not loaded');
  // (the entry, cli.cjs, is resolved through the hook too: node's --import runs the main file through it)
  const esmUrls = readFileSync(esm, 'utf8').split('\n').filter((u) => u.startsWith('file:') && !u.startsWith(`file://${rec}/`) && u !== `file://${PIGEON}`);
  t.same(esmUrls, [`file://${join(inst, 'delivery-add-header.mjs')}`], 'the ES module loader loaded the configured module file only: no module file of dist/ (no second copy of pigeon\'s code)');

  // an unknown recipient: the one status line and 67, from the same code
  const r2 = spawnSync('setpriv', [`--reuid=${MAIL_UID}`, `--regid=${MAIL_GID}`, '--clear-groups', 'env', '-i', PATH, process.execPath, PIGEON, '-c', inst, 'deliver', '-f', 'bob@remote.test', '--', 'nobody@example.test'], {
    input: msg({ subject: 'unknown' }),
    encoding: 'utf8',
    timeout: 120_000,
  });
  t.equal(r2.status, 67, `an unknown user: 67 (${r2.stdout}${r2.stderr})`);
  t.equal(r2.stdout, '5.1.1 <nobody@example.test>: user unknown\n', 'the one status line');
});

t.test('without serve, as the mail user, no module file configured: node:child_process, node:net, node:crypto and node:stream are not loaded, no package file compiled', async (t) => {
  // nothing is started and no socket opened (src/builtins.ts loads them on first use); the
  // instance above imports a module file, and node's ES module loader loads node:net itself
  need('/usr/bin/setpriv', 'util-linux');
  const inst = makeInstance(scratchDir(t), [ALICE]);
  spawnSync('chown', ['-R', 'mail:mail', inst]);
  const { rec, loaded } = recordDirs(t);
  const r = spawnSync(
    'setpriv',
    [`--reuid=${MAIL_UID}`, `--regid=${MAIL_GID}`, '--clear-groups', 'env', '-i', PATH, process.execPath, '-r', join(rec, 'preload.cjs'), PIGEON, '-c', inst, 'deliver', '-f', 'bob@remote.test', '--', ALICE],
    { input: msg({ subject: 'built-ins' }), timeout: 120_000 },
  );
  t.equal(r.status, 0, `exit 0: ${String(r.stdout)}${String(r.stderr)}`);
  t.equal(files(join(maildirOf(inst, ALICE), 'new')).length, 1, 'delivered');
  const got = JSON.parse(readFileSync(loaded, 'utf8')) as Record;
  t.same(got.scripts.map((x) => x.file), [BUNDLE], 'from the bundle');
  t.ok(got.builtins.includes('NativeModule fs'), 'the record has the built-ins');
  t.same(got.builtins.filter((m) => /^NativeModule (child_process|internal\/child_process|net|dgram)$/.test(m)), [], 'node:child_process and node:net not loaded');
  // the Maildir name's random part is Math.random's; the password schemes, SCRAM, the peer link
  // and the certificate checks take node:crypto when they run (src/builtins.ts)
  t.same(got.builtins.filter((m) => /^NativeModule (crypto|internal\/crypto\/.*)$/.test(m)), [], 'node:crypto not loaded');
  // only the stdio forker's duplex needs node:stream here, and makes its class on its first session
  t.same(got.builtins.filter((m) => /^NativeModule (stream|internal\/streams\/(duplex|readable|writable))$/.test(m)), [], 'node:stream not loaded');
  // better-sqlite3's and ipaddr.js's JavaScript come with the bundle (its code cache); only the addon is a file of its own
  t.same(
    got.files.filter((f) => f.includes('/node_modules/')),
    [join(ROOT, 'node_modules', 'better-sqlite3', 'build', 'Release', 'better_sqlite3.node')],
    'of node_modules, require() loaded better-sqlite3\'s addon only (by its path: no `bindings` search)',
  );
});

t.test('without serve, as root (by hand): the bundle delivers through the mail writer, the file is the mail user\'s', async (t) => {
  const inst = mailInstance(t);
  const r = spawnSync(process.execPath, [PIGEON, '-c', inst, 'deliver', '-f', 'bob@remote.test', '--', ALICE], { input: msg({ subject: 'as root' }), encoding: 'utf8', env: { PATH: process.env['PATH'] ?? '/usr/bin:/bin' }, timeout: 120_000 });
  t.equal(r.status, 0, `exit 0: ${r.stdout}${r.stderr}`);
  const box = join(maildirOf(inst, ALICE), 'new');
  t.equal(files(box).length, 1, 'one copy');
  const f = join(box, files(box)[0] ?? '');
  t.match(readFileSync(f, 'utf8'), /X-Pigeon-Example: added in the bundle\nFrom: bob@remote\.test\n/, 'the module ran');
  t.equal(statSync(f).uid, MAIL_UID, 'written as the mail user, not root');
  // the same instance through dist/'s module files (node dist/src/cli.js): the same result
  const r2 = cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg({ subject: 'module files' }));
  ok(r2, 'deliver through dist/src/cli.js');
  t.equal(files(box).length, 2, 'a second copy');
});

t.test('without serve, on PostgreSQL: the bundle carries the PostgreSQL store (one copy of pigeon\'s errors: a database that is down is 75 with its own status line)', async (t) => {
  const pg = await startPostgres(t);
  if (pg === null) return; // startPostgres failed the test, naming the package
  const dir = scratchDir(t);
  const inst = join(dir, 'inst');
  ok(cli(inst, ['init', inst, '--db', pg.url]), 'init --db postgres://');
  ok(cli(inst, ['domain', 'add', 'example.test']), 'domain add');
  ok(cli(inst, ['user', 'add', ALICE, '--password-stdin'], 'pw\n'), 'user add');
  const deliver = (subject: string) =>
    spawnSync(process.execPath, [PIGEON, '-c', inst, 'deliver', '-f', 'bob@remote.test', '--', ALICE], { input: msg({ subject }), encoding: 'utf8', env: { PATH: process.env['PATH'] ?? '/usr/bin:/bin' }, timeout: 120_000 });
  const r = deliver('on postgres');
  t.equal(r.status, 0, `exit 0: ${r.stdout}${r.stderr}`);
  const box = join(maildirOf(inst, ALICE), 'new');
  t.equal(files(box).length, 1, 'delivered');
  await pg.stop('fast');
  const down = deliver('database down');
  t.equal(down.status, 75, `the database down: 75, the MTA keeps the mail (${down.stdout}${down.stderr})`);
  t.match(down.stdout, /^4\.\d\.\d .*(database|PostgreSQL)/i, 'the status line names the database');
  t.notMatch(down.stdout, /internal error/, 'not an internal error: the bundle\'s PostgreSQL store throws the bundle\'s own AppError');
  t.equal(files(box).length, 1, 'no copy');
});
