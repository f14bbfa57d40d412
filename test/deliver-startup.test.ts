// What `pigeon deliver` loads: pipe(8) starts one process per message, so a delivery to a local
// mailbox must load the delivery code only — not commander and the admin command tree, not the
// password hash libraries, not the peer link (node certificate, TLS) nor the LMTP server. A resolve hook
// (node's module.register) records every module the process resolves, and at exit every node
// built-in it loaded (`builtin:NAME`, from process.moduleLoadList: require() of a built-in passes
// no resolve hook).
import t from 'tap';
import { join } from 'node:path';
import { readFileSync, writeFileSync, readdirSync, chownSync, statSync, mkdirSync, cpSync, symlinkSync, rmSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { CLI, ROOT, makeInstance, maildirOf, files, msg, MAIL_UID, MAIL_GID } from './helpers/delivery-env.js';
import { scratchDir } from './helpers/instance.js';
import { loadRecorder } from './helpers/load-recorder.js';

t.setTimeout(240_000);

const ALICE = 'alice@example.test';

/** Run `pigeon -c inst ARGS` with a resolve hook; the exit, the output and every URL resolved. */
function deliverTraced(dir: string, inst: string, args: readonly string[], input: string): { code: number | null; out: string; loaded: string[] } {
  const log = join(dir, `loaded-${Math.random().toString(36).slice(2)}.txt`);
  writeFileSync(log, '');
  const register = loadRecorder(dir, log);
  const r = spawnSync(process.execPath, ['--import', register, CLI, '-c', inst, ...args], { input });
  return { code: r.status, out: r.stdout.toString() + r.stderr.toString(), loaded: readFileSync(log, 'utf8').split('\n').filter(Boolean) };
}

t.test('a local delivery loads the delivery code only', async (t) => {
  const dir = scratchDir(t);
  const inst = makeInstance(dir);
  const r = deliverTraced(dir, inst, ['deliver', '-f', 'bob@remote.test', '-a', ALICE, '--', ALICE], msg({ subject: 'traced' }));
  t.equal(r.code, 0, r.out);
  t.equal(r.out, '', 'no output on success');
  t.equal(files(join(maildirOf(inst, ALICE), 'new')).length, 1, 'delivered');
  t.ok(
    r.loaded.some((u) => u.endsWith('/dist/src/delivery/deliver.js')),
    'the hook saw the delivery code (it records what the process loads)',
  );
  const unwanted: [RegExp, string][] = [
    [/\/node_modules\/(commander|@commander-js)\//, 'commander'],
    [/\/dist\/src\/commands\//, 'the command tree'],
    [/\/node_modules\/@node-rs\//, 'the password hash libraries'],
    [/\/dist\/src\/peer\/(context|deliver|link)\.js$/, 'the peer link'],
    [/\/node_modules\/@peculiar\//, 'the X.509 library'],
    [/\/node_modules\/smtp-server\//, 'the LMTP server'],
    // checked only when a password is: SASLprep's Unicode tables
    [/\/node_modules\/@mongodb-js\/saslprep\//, 'saslprep'],
    // the registries' self-check needs the listen forker's entry, not the serve daemon
    [/\/dist\/forkers\/listen\.js$/, 'the serve daemon (forkers/listen)'],
    // node:tls only for a TLS connection (upstream backend, peer link), node:http for the metrics server
    [/^builtin:(tls|_tls_wrap|http|_http_server)$/, 'node:tls and node:http'],
    // CommonJS loaded with require(): node 20's ESM import of ipaddr.js alone costs ≈ 35 ms CPU
    [/\/node_modules\/ipaddr\.js\//, 'ipaddr.js through an ESM import'],
  ];
  for (const [re, what] of unwanted) {
    t.same(
      r.loaded.filter((u) => re.test(u)),
      [],
      `${what} not loaded`,
    );
  }
});

t.test('help, usage errors and the dovecot-lda flags still go through commander, with its texts', async (t) => {
  const dir = scratchDir(t);
  const inst = makeInstance(dir, [ALICE, 'carol@example.test']);
  const help = deliverTraced(dir, inst, ['deliver', '--help'], '');
  t.equal(help.code, 0);
  t.match(help.out, /Exit status \(sysexits\)/, 'deliver --help prints the command help');
  const bad = deliverTraced(dir, inst, ['deliver', '-x', ALICE], msg());
  t.equal(bad.code, 75, 'a bad command line is a temporary failure (pipe(8) must not bounce)');
  t.equal(bad.out, "4.3.5 bad deliver command line: unknown option '-x'\n", "commander's message, one line");
  t.same(files(join(maildirOf(inst, ALICE), 'new')), [], 'nothing delivered');
  // -d twice, -e, -m for a folder that does not exist (INBOX), --from=, recipient after --
  const lda = deliverTraced(dir, inst, ['deliver', '--from=bob@remote.test', '-e', '-m', 'Nope', '-d', ALICE, '-d', 'carol@example.test'], msg({ subject: 'lda flags' }));
  t.equal(lda.code, 0, lda.out);
  t.equal(files(join(maildirOf(inst, ALICE), 'new')).length, 1, 'first -d delivered');
  t.equal(files(join(maildirOf(inst, 'carol@example.test'), 'new')).length, 1, 'second -d delivered');
  t.notOk(lda.loaded.some((u) => /\/node_modules\/(commander|@commander-js)\//.test(u)), 'a plain dovecot-lda command line needs no commander');
  const none = deliverTraced(dir, inst, ['deliver', '-f', 'bob@remote.test'], msg());
  t.equal(none.code, 75);
  t.match(none.out, /^4\.3\.5 no recipient on the command line/);
  const unknown = deliverTraced(dir, inst, ['deliver', '-f', 'bob@remote.test', '--', 'nobody@example.test'], msg());
  t.equal(unknown.code, 67);
  t.equal(unknown.out, '5.1.1 <nobody@example.test>: user unknown\n');
});

t.test('as the mail uid (pipe(8) user=mail): a message spilled to disk is stored byte for byte, in this process', async (t) => {
  const dir = scratchDir(t);
  const inst = makeInstance(dir);
  // the pipe(8) set-up README gives: the mail user writes the database, its directory and the log
  for (const f of readdirSync(inst)) if (/^pigeon\.(db|log)/.test(f)) chownSync(join(inst, f), MAIL_UID, MAIL_GID);
  chownSync(inst, MAIL_UID, MAIL_GID);
  chownSync(join(inst, 'pigeon.yaml'), 0, MAIL_GID);
  // a body larger than the spool's memory part (1 MiB), every line different: a chunk written
  // twice or overwritten by the next one cannot go unnoticed
  const lines: string[] = [];
  for (let i = 0; lines.length < 60_000; i++) lines.push(`line ${i} ${'abcdefghijklmnopqrstuvwxyz'.slice(i % 26)}${'0123456789'.repeat(3)}`);
  const body = `${lines.join('\n')}\n`;
  // pipe(8)'s environment (env -i: the test runner adds its process hooks to the environment of
  // every node it starts, and they cannot write their records as uid 8)
  const r = spawnSync('/usr/bin/env', ['-i', 'PATH=/usr/bin:/bin', process.execPath, CLI, '-c', inst, 'deliver', '-f', 'bob@remote.test', ALICE], {
    input: msg({ subject: 'big as mail', body }),
    uid: MAIL_UID,
    gid: MAIL_GID,
    maxBuffer: 1 << 20,
  });
  const log = (): string => {
    try {
      return readFileSync(join(inst, 'pigeon.log'), 'utf8').split('\n').slice(-4).join(' | ');
    } catch {
      return 'no pigeon.log';
    }
  };
  t.equal(r.status, 0, r.status === 0 ? 'exit 0' : `exit ${r.status}: ${r.stdout.toString()}${r.stderr.toString()} log: ${log()}`);
  const box = join(maildirOf(inst, ALICE), 'new');
  const got = files(box);
  t.equal(got.length, 1, 'delivered');
  const stored = readFileSync(join(box, got[0] ?? ''));
  t.equal(statSync(join(box, got[0] ?? '')).uid, MAIL_UID, 'written by the mail user');
  const at = stored.indexOf('\n\n');
  t.ok(Buffer.byteLength(body) > 2 * 1024 * 1024, 'the body is over 2 MiB');
  t.ok(stored.subarray(at + 2).equals(Buffer.from(body)), 'the body on disk is the body sent, byte for byte');
  t.equal(stored.length, Number(/,S=(\d+)/.exec(got[0] ?? '')?.[1]), 'S= is the size on disk');
});

t.test('a broken install (a delivery module missing) defers with one line: 75, never a bounce', async (t) => {
  const dir = scratchDir(t);
  const inst = makeInstance(dir);
  // a copy of the built tree with the delivery driver missing, as a half-finished upgrade leaves it
  const copy = join(dir, 'broken');
  mkdirSync(copy);
  cpSync(join(ROOT, 'dist'), join(copy, 'dist'), { recursive: true });
  cpSync(join(ROOT, 'package.json'), join(copy, 'package.json'));
  symlinkSync(join(ROOT, 'node_modules'), join(copy, 'node_modules'));
  rmSync(join(copy, 'dist', 'src', 'delivery', 'deliver.js'));
  const r = spawnSync(process.execPath, [join(copy, 'dist', 'src', 'cli.js'), '-c', inst, 'deliver', '-f', 'bob@remote.test', ALICE], { input: msg() });
  t.equal(r.status, 75, 'EX_TEMPFAIL: Postfix keeps the message and retries');
  t.match(r.stdout.toString(), /^4\.3\.0 internal error \(cannot load the delivery code: [^\n]*deliver\.js[^\n]*\)\n$/, 'one line with the enhanced status code');
  t.equal(r.stderr.toString(), '', 'nothing else');
  t.same(files(join(maildirOf(inst, ALICE), 'new')), [], 'nothing delivered');
});
