/**
 * The admin CLI as a real process: `node dist/src/cli.js ...` with argv and stdin, asserting exit
 * codes (sysexits), the one-line errors on stderr, and the --json output parsed.
 * Needs `npx tsc -p tsconfig.json` first (npm test does it).
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { createHash, X509Certificate } from 'node:crypto';
import { chownSync, existsSync, mkdirSync, readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { openDb } from '../src/db.js';
import { Store, type Allocation } from '../src/store.js';
import { SCHEMES } from '../auth/schemes.js';
import { resolve } from '../src/resolve.js';

import { runCli, startCli, type CliRun } from './helpers/cli.js';
import { scratchDir } from './helpers/instance.js';
const NODE = 'node-a.example.net';

type Run = CliRun;

function run(args: readonly string[], input = ''): Run {
  return runCli(args, { input });
}

/** Run several independent commands at once (at most 4 processes): the same checks, less waiting. */
async function runAll(cmds: readonly (readonly [readonly string[], string?])[]): Promise<Run[]> {
  const out: Run[] = new Array<Run>(cmds.length);
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < cmds.length) {
      const i = next++;
      const [args, input] = cmds[i] as readonly [readonly string[], string?];
      out[i] = await startCli(args, input ?? '');
    }
  };
  await Promise.all([worker(), worker(), worker(), worker()]);
  return out;
}

function json(r: Run): unknown {
  try {
    return JSON.parse(r.out);
  } catch {
    throw new Error(`not JSON (exit ${String(r.code)}): ${r.out}\n${r.err}`);
  }
}

function dovecotVerifies(hash: string, password: string): boolean {
  const r = spawnSync('doveadm', ['pw', '-t', hash, '-p', password], { encoding: 'utf8' });
  return r.status === 0 && r.stdout.includes('(verified)');
}

function storedHash(dbPath: string, address: string): string | null {
  const db = new Database(dbPath, { readonly: true });
  try {
    const r = db.prepare<[string], { password: string | null }>('SELECT password FROM users WHERE address = ?').get(address);
    return r?.password ?? null;
  } finally {
    db.close();
  }
}

function userCount(dbPath: string): number {
  const db = new Database(dbPath, { readonly: true });
  try {
    return (db.prepare('SELECT count(*) AS c FROM users').get() as { c: number }).c;
  } finally {
    db.close();
  }
}

/** Give a user a home and a mailbox allocation, as the mailstore would (compare-and-set). */
function allocate(dbPath: string, address: string, alloc: Allocation): void {
  const store = new Store(openDb(dbPath), dbPath);
  try {
    const u = store.mustUser(address);
    if (!store.casAllocation(u.id, u.version, NODE, alloc)) throw new Error('allocation lost a race');
  } finally {
    store.close();
  }
}

function digestTree(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (d: string): void => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      if (e.isDirectory()) walk(p);
      else out[p] = `${statSync(p).mode.toString(8)} ${createHash('sha256').update(readFileSync(p)).digest('hex')}`;
    }
  };
  walk(dir);
  return out;
}

const root = scratchDir(t);
const inst = join(root, 'inst');
const db = join(inst, 'pigeon.db');
const C = ['-c', inst];

t.test('init creates an instance; keys 0600; node name in the certificate; never twice', async (t) => {
  const r = run(['init', inst, '--node', NODE, '--listen', 'imap=127.0.0.1:1143', '--listen', 'lmtp=/run/pigeon-lmtp.sock']);
  t.equal(r.code, 0, `init exits 0 ${r.err}`);
  t.match(r.out, /next: /, 'says what to do next');
  for (const f of ['pigeon.yaml', 'pigeon.db', 'certs/ca.crt', 'certs/ca.key', 'certs/node.crt', 'certs/node.key']) {
    t.ok(statSync(join(inst, f)).isFile(), `${f} created`);
  }
  for (const d of ['mail', 'conf.d']) t.ok(statSync(join(inst, d)).isDirectory(), `${d}/ created`);
  for (const k of ['certs/ca.key', 'certs/node.key']) t.equal(statSync(join(inst, k)).mode & 0o777, 0o600, `${k} is mode 0600`);
  const yaml = readFileSync(join(inst, 'pigeon.yaml'), 'utf8');
  t.match(yaml, /^#/m, 'config file is commented');
  t.match(yaml, `node: "${NODE}"`);
  t.match(yaml, 'imap=127.0.0.1:1143', '--listen written');
  t.match(yaml, 'lmtp=/run/pigeon-lmtp.sock', 'lmtp socket listener written');

  const cert = new X509Certificate(readFileSync(join(inst, 'certs/node.crt')));
  const ca = new X509Certificate(readFileSync(join(inst, 'certs/ca.crt')));
  t.match(cert.subjectAltName ?? '', new RegExp(`(^|, )DNS:${NODE.replace(/\./g, '\\.')}(,|$)`), 'node name in the SAN');
  t.ok(cert.checkIssued(ca) && cert.verify(ca.publicKey), 'node certificate signed by the instance CA');
  t.equal(ca.ca, true, 'ca.crt is a CA');
  t.equal(cert.ca, false, 'node.crt is not a CA');

  const before = digestTree(inst);
  const busy = join(root, 'busy');
  mkdirSync(busy);
  writeFileSync(join(busy, 'keep.txt'), 'mine');
  const [nodes, again, b, badListen] = await runAll([
    [[...C, 'node', 'list', '--json']],
    [['init', inst, '--node', 'other']],
    [['init', busy]],
    [['init', join(root, 'bad-listen'), '--listen', 'smtp=1.2.3.4:25']],
  ]);
  const ns = json(nodes as Run) as { name: string; fingerprint: string }[];
  t.same(ns.map((n) => n.name), [NODE], 'this node registered');
  t.equal(ns[0]?.fingerprint, cert.fingerprint256, 'with the certificate fingerprint');
  t.equal(again?.code, 73, 'init on an existing instance exits 73');
  t.match(again?.err, /already holds an instance/);
  t.same(digestTree(inst), before, 'nothing overwritten or added');
  t.equal(b?.code, 73, 'init into a non-empty directory exits 73');
  t.same(readdirSync(busy), ['keep.txt'], 'the directory is left as it was');
  t.equal(badListen?.code, 64, 'unknown --listen protocol exits 64');
  t.notOk(existsSync(join(root, 'bad-listen', 'pigeon.yaml')), 'nothing created');
});

t.test('domain add / list / rename / del', async (t) => {
  const adds = await runAll([[[...C, 'domain', 'add', 'Example.TEST']], [[...C, 'domain', 'add', 'bücher.example']], [[...C, 'domain', 'add', 'gone.test']]]);
  t.same(adds.map((r) => r.code), [0, 0, 0], 'add (mixed case, IDN, plain)');
  const bads = ['bad_domain', 'nodot', 'trail-.test'];
  const [dup, ...invalid] = await runAll([[[...C, 'domain', 'add', 'example.test']], ...bads.map((b) => [[...C, 'domain', 'add', b]] as const)]);
  t.equal(dup?.code, 73, 'duplicate domain exits 73');
  invalid.forEach((r, i) => {
    t.equal(r.code, 65, `invalid domain ${JSON.stringify(bads[i])} exits 65`);
    t.match(r.err, /^pigeon: error: invalid domain/m);
  });
  let list = json(run([...C, 'domain', 'list', '--json'])) as { name: string; users: number }[];
  t.same(list.map((d) => d.name), ['example.test', 'gone.test', 'xn--bcher-kva.example'], 'stored lower-case, IDN as punycode, sorted');
  t.equal(list[0]?.users, 0);

  t.equal(run([...C, 'domain', 'rename', 'gone.test', 'moved.test']).code, 0, 'rename');
  const [r1, r2, d1] = await runAll([
    [[...C, 'domain', 'rename', 'nosuch.test', 'x.test']],
    [[...C, 'domain', 'rename', 'moved.test', 'example.test']],
    [[...C, 'domain', 'del', 'nosuch.test']],
  ]);
  t.equal(r1?.code, 67, 'rename a missing domain exits 67');
  t.equal(r2?.code, 73, 'rename onto an existing domain exits 73');
  t.equal(d1?.code, 67, 'del a missing domain exits 67');
  t.equal(run([...C, 'domain', 'del', 'moved.test']).code, 0, 'del an empty domain');
  list = json(run([...C, 'domain', 'list', '--json'])) as { name: string; users: number }[];
  t.same(list.map((d) => d.name), ['example.test', 'xn--bcher-kva.example']);
});

t.test('user add --password-stdin, duplicates, bad input, user show --json', async (t) => {
  const r = run([...C, 'user', 'add', 'Alice@Example.test', '--password-stdin'], 'sec ret\n');
  t.equal(r.code, 0, `user add exits 0 ${r.err}`);
  t.notMatch(r.out, /sec ret/, 'the password is not echoed');
  const hash = storedHash(db, 'alice@example.test');
  t.ok(hash?.startsWith('{ARGON2ID}'), 'stored as {ARGON2ID}');
  t.ok(hash !== null && dovecotVerifies(hash, 'sec ret'), 'trailing newline stripped: Dovecot verifies the bare password');

  const bads = ['bad address@example.test', 'no-at-sign', 'a..b@example.test', 'x@bad_domain'];
  const [a1, a2, dup1, dup2, nd, gen, ...invalid] = await runAll([
    [[...C, 'auth', 'test', 'alice@example.test'], 'sec ret'],
    [[...C, 'auth', 'test', 'alice@example.test'], 'sec ret\r\n'],
    [[...C, 'user', 'add', 'alice@example.test', '--password-stdin'], 'x\n'],
    [[...C, 'user', 'add', 'ALICE@EXAMPLE.TEST', '--password-stdin'], 'x\n'],
    [[...C, 'user', 'add', 'bob@nosuch.test', '--password-stdin'], 'x\n'],
    [[...C, 'user', 'add', 'gen@example.test', '--home', 'node-b', '--json']],
    ...bads.map((b) => [[...C, 'user', 'add', b, '--password-stdin'], 'x\n'] as const),
  ]);
  t.equal(a1?.code, 0, 'auth test with the password without newline: 0');
  t.equal(a2?.code, 0, 'auth test strips CRLF too');
  t.equal(dup1?.code, 73, 'duplicate user exits 73');
  t.equal(dup2?.code, 73, 'duplicate in other case exits 73');
  t.equal(storedHash(db, 'alice@example.test'), hash, 'the duplicate attempts changed nothing');
  t.equal(nd?.code, 67, 'user in a missing domain exits 67');
  t.match(nd?.err, /domain nosuch\.test does not exist/);
  invalid.forEach((b, i) => {
    t.equal(b.code, 65, `invalid address ${JSON.stringify(bads[i])} exits 65`);
    t.match(b.err, /^pigeon: error: invalid address/m);
  });
  t.equal(gen?.code, 0, 'user add without --password-stdin generates a password');
  const g = json(gen as Run) as { password: string; home: string };
  t.equal(g.home, 'node-b', '--home recorded');
  t.equal(userCount(db), 2, 'no bad input left a user behind');

  const [login, show, missing, listR] = await runAll([
    [[...C, 'auth', 'test', 'gen@example.test'], `${g.password}\n`],
    [[...C, 'user', 'show', 'alice@example.test', '--json']],
    [[...C, 'user', 'show', 'nobody@example.test', '--json']],
    [[...C, 'user', 'list', 'example.test', '--json']],
  ]);
  t.equal(login?.code, 0, 'the printed password works');
  t.equal(show?.code, 0);
  const u = json(show as Run) as Record<string, unknown>;
  t.match(u, { address: 'alice@example.test', domain: 'example.test', state: 'active', home: null, allocation: null });
  for (const k of ['address', 'domain', 'state', 'home', 'allocation']) t.ok(k in u, `user show --json has ${k}`);
  t.notOk(JSON.stringify(u).includes('$argon2'), 'no hash in user show');
  t.equal(missing?.code, 67, 'user show of a missing user exits 67');
  const list = json(listR as Run) as { address: string }[];
  t.same(list.map((x) => x.address), ['alice@example.test', 'gen@example.test']);
});

type Explained = Record<string, { value: unknown; from: string; ignored: { from: string; value: unknown }[] }>;

/** The database state read in-process (the CLI's own `config show` output is checked separately). */
function effective(address: string): Explained {
  const store = new Store(openDb(db), db);
  try {
    return resolve(store.lookup(address)?.rows ?? []) as Explained;
  } finally {
    store.close();
  }
}

t.test('config set / unset / show --explain --json', async (t) => {
  const show = (): Explained => json(run([...C, 'config', 'show', 'alice@example.test', '--explain', '--json'])) as Explained;
  const codes = async (cmds: string[][]): Promise<(number | null)[]> => (await runAll(cmds.map((c) => [[...C, ...c]] as const))).map((r) => r.code);
  let e = show();
  for (const [k, v] of Object.entries(e)) {
    t.same(Object.keys(v).sort(), ['from', 'ignored', 'value'], `${k}: {value, from, ignored}`);
    t.equal(v.from, 'default', `${k} from default`);
  }
  t.same(e['mailstore.format'], { value: 'maildir', from: 'default', ignored: [] });

  t.same(
    await codes([
      ['config', 'set', '--global', 'mailstore.quota', '1000'],
      ['config', 'set', '--domain', 'example.test', 'mailstore.quota', '2000'],
      ['config', 'set', '--user', 'alice@example.test', 'forward.to', 'a@x.test, b@y.test'],
      ['config', 'set', '--domain', 'example.test', 'vacation.enabled', 'yes'],
    ]),
    [0, 0, 0, 0],
    'set at global and domain scope, a list and a boolean value',
  );
  const us = run([...C, 'config', 'set', '--user', 'alice@example.test', 'mailstore.quota', '3000']);
  t.equal(us.code, 0);
  t.equal(us.err, '', 'no warning when nothing forces the key');
  const [ex, pl, tx] = await runAll([
    [[...C, 'config', 'show', 'alice@example.test', '--explain', '--json']],
    [[...C, 'config', 'show', 'alice@example.test', '--json']],
    [[...C, 'config', 'show', 'alice@example.test', '--explain']],
  ]);
  e = json(ex as Run) as Explained;
  t.same(e['mailstore.quota'], { value: 3000, from: 'user', ignored: [] }, 'narrowest wins');
  t.same(e['forward.to'], { value: ['a@x.test', 'b@y.test'], from: 'user', ignored: [] });
  t.same(e['vacation.enabled'], { value: true, from: 'domain', ignored: [] });
  const plain = json(pl as Run) as Record<string, unknown>;
  t.equal(plain['mailstore.quota'], 3000, 'config show --json is {"module.key": value}');
  t.equal(plain['mailstore.format'], 'maildir');
  t.match(tx?.out, /^mailstore\.quota\s+= 3000\s+\(user\)/m, 'text --explain names the source');

  // forced at a broader scope: succeeds, warns naming the scope that forces it
  t.equal(run([...C, 'config', 'set', '--domain', 'example.test', 'mailstore.quota', '2000', '--override']).code, 0);
  const forced = run([...C, 'config', 'set', '--user', 'alice@example.test', 'mailstore.quota', '3500']);
  t.equal(forced.code, 0, 'setting a forced key at user scope succeeds');
  t.match(forced.err, /warning: .*mailstore\.quota.*no effect.*domain.*override/, 'warns: the domain forces it');
  e = effective('alice@example.test');
  t.match(e['mailstore.quota'], { value: 2000, from: 'domain', ignored: [{ from: 'user', value: 3500 }] }, 'domain override wins, user row listed as ignored');

  t.equal(run([...C, 'config', 'set', '--global', 'mailstore.quota', '1000', '--override']).code, 0);
  t.equal(run([...C, 'config', 'set', '--domain', 'example.test', 'forward.*', '--ignore']).code, 0, 'module-wide ignore at domain');
  const [forcedG, ign] = await runAll([
    [[...C, 'config', 'set', '--user', 'alice@example.test', 'mailstore.quota', '3600']],
    [[...C, 'config', 'set', '--user', 'alice@example.test', 'forward.keep', 'false']],
  ]);
  t.equal(forcedG?.code, 0);
  t.match(forcedG?.err, /warning: .*global.*override/, 'warns: global forces it');
  t.equal(ign?.code, 0);
  t.match(ign?.err, /warning: .*forward\.keep.*domain.*forward\.\*/, 'warns: the domain ignores forward.*');
  e = show();
  t.match(e['mailstore.quota'], { value: 1000, from: 'global', ignored: [{ from: 'domain', value: 2000 }, { from: 'user', value: 3600 }] }, 'broadest override wins');
  t.match(e['forward.to'], { value: [], from: 'default', ignored: [{ from: 'user', value: ['a@x.test', 'b@y.test'] }] }, 'user forward rows ignored');
  t.match(e['forward.keep'], { value: true, from: 'default', ignored: [{ from: 'user', value: false }] });

  // unset: the broader scope or the default applies again
  t.same(
    await codes([
      ['config', 'unset', '--domain', 'example.test', 'forward.*'],
      ['config', 'unset', '--global', 'mailstore.quota'],
      ['config', 'unset', '--domain', 'example.test', 'mailstore.quota'],
    ]),
    [0, 0, 0],
    'unset',
  );
  e = effective('alice@example.test');
  t.same(e['mailstore.quota'], { value: 3600, from: 'user', ignored: [] }, 'user row wins again after the overrides are unset');
  t.same(e['forward.to'], { value: ['a@x.test', 'b@y.test'], from: 'user', ignored: [] }, 'user forward rows live again');

  // refusals, each leaving the settings as they were
  const [again, typo, mod, wrong, ...rest] = await runAll(
    [
      ['config', 'unset', '--global', 'mailstore.quota'],
      ['config', 'set', '--user', 'alice@example.test', 'mailstore.qouta', '5'],
      ['config', 'set', '--global', 'mailstor.quota', '5'],
      ['config', 'set', '--user', 'alice@example.test', 'mailstore.quota', 'lots'],
      ['config', 'set', '--global', 'mailstore.format', 'mh'],
      ['config', 'set', '--global', 'vacation.enabled', 'perhaps'],
      ['config', 'set', '--global', 'vacation.days', '0'],
      ['config', 'set', '--user', 'alice@example.test', 'login.plaintext', 'always'],
      ['config', 'set', '--user', 'alice@example.test', 'mailstore.quota', '5', '--override'],
      ['config', 'set', '--global', '--domain', 'example.test', 'mailstore.quota', '5'],
      ['config', 'set', '--domain', 'nosuch.test', 'mailstore.quota', '5'],
      ['config', 'set', '--user', 'nobody@example.test', 'mailstore.quota', '5'],
      ['config', 'show', 'nobody@example.test'],
    ].map((c) => [[...C, ...c]] as const),
  );
  t.equal(again?.code, 0);
  t.match(again?.out, /was not set/, 'unset of a missing row says so');
  t.equal(typo?.code, 64, 'a typo in the key exits 64');
  t.match(typo?.err, /unknown key "mailstore\.qouta"/);
  for (const k of ['mailstore.quota', 'mailstore.format', 'mailstore.enabled']) t.match(typo?.err, k, `lists the valid key ${k}`);
  t.equal(mod?.code, 64, 'unknown module exits 64');
  t.match(mod?.err, /modules: .*mailstore/, 'lists the modules');
  t.equal(wrong?.code, 65, 'a value of the wrong type exits 65');
  t.match(wrong?.err, /mailstore\.quota: invalid value "lots": expected integer/);
  t.same(
    rest.map((r) => r.code),
    [65, 65, 65, 64, 64, 64, 67, 67, 67],
    'enum not in list, not a boolean, below minimum: 65; global-only key at user scope, --override at user scope, two scopes: 64; missing domain, missing user, show of a missing user: 67',
  );
  e = effective('alice@example.test');
  t.same(e['mailstore.quota'], { value: 3600, from: 'user', ignored: [] }, 'refused commands changed nothing');
  t.same(e['mailstore.format'], { value: 'maildir', from: 'default', ignored: [] });
  t.same(e['login.plaintext'], { value: 'loopback', from: 'default', ignored: [] });
});

t.test('unknown command or flag: exit 64 with a hint', async (t) => {
  const cmds = [[...C, 'frobnicate'], [...C, 'domain', 'list', '--frob'], [...C, 'user', 'add'], ['--no-such-flag', 'domain', 'list'], [...C, 'user', 'shwo', 'a@b.test']];
  const rs = await runAll([...cmds.map((c) => [c] as const), [['--help']]]);
  cmds.forEach((c, i) => {
    t.equal(rs[i]?.code, 64, `${c.join(' ')}: exits 64`);
    t.match(rs[i]?.err, /--help/, 'hints at --help');
  });
  const help = rs[cmds.length] as Run;
  t.equal(help.code, 0, '--help exits 0');
  for (const c of ['init', 'domain', 'user', 'config', 'auth', 'pw']) t.match(help.out, new RegExp(`^\\s+${c}\\b`, 'm'), `--help lists ${c}`);
});

t.test('auth test: 0 on success, 77 on failure', async (t) => {
  const [ok, bad, ghost, empty] = await runAll([
    [[...C, 'auth', 'test', 'alice@example.test'], 'sec ret\n'],
    [[...C, 'auth', 'test', 'alice@example.test'], 'sec ret \n'],
    [[...C, 'auth', 'test', 'ghost@example.test'], 'sec ret\n'],
    [[...C, 'auth', 'test', 'alice@example.test'], ''],
  ]);
  t.equal(ok?.code, 0);
  t.match(ok?.out, /auth succeeded/);
  t.match(ok?.out, /mailstore\.quota\s+= 3600/, 'prints the effective config');
  t.ok(ok?.out.endsWith('\n') && !/^ +$/m.test(ok.out), 'output ends with a newline, no dangling indentation');
  t.equal(bad?.code, 77, 'wrong password (one extra space): 77');
  t.match(bad?.out, /auth failed/);
  t.equal(ghost?.code, 77, 'unknown user: 77');
  t.equal(empty?.code, 64, 'no password on stdin: 64');
  t.equal(run([...C, 'user', 'disable', 'alice@example.test']).code, 0);
  t.equal(run([...C, 'auth', 'test', 'alice@example.test'], 'sec ret\n').code, 77, 'disabled user: 77');
  t.equal(run([...C, 'user', 'enable', 'alice@example.test']).code, 0);
  t.equal(run([...C, 'user', 'passwd', 'alice@example.test'], 'n3w\n').code, 0, 'user passwd');
  const [nw, old] = await runAll([
    [[...C, 'auth', 'test', 'alice@example.test'], 'n3w\n'],
    [[...C, 'auth', 'test', 'alice@example.test'], 'sec ret\n'],
  ]);
  t.equal(nw?.code, 0, 'enabled again, the new password works');
  t.equal(old?.code, 77, 'the old password does not');
});

t.test('pw -s SCHEME: Dovecot verifies every hash', async (t) => {
  const pw = 'Zürich-pa55 wörd';
  const rs = await runAll([...SCHEMES.map((s) => [['pw', '-s', s], `${pw}\n`] as const), [['pw'], 'x\n'], [['pw', '-s', 'MD5-CRYPT'], 'x\n']]);
  SCHEMES.forEach((s, i) => {
    const r = rs[i] as Run;
    t.equal(r.code, 0, `pw -s ${s} exits 0`);
    const hash = r.out.trim();
    t.ok(hash.startsWith(`{${s}}`), `${s}: printed as {${s}}...`);
    t.ok(dovecotVerifies(hash, pw), `${s}: doveadm pw -t verifies it`);
    t.notOk(dovecotVerifies(hash, `${pw}x`), `${s}: doveadm refuses a wrong password`);
    if (s === 'PLAIN') t.match(r.err, /warning/, 'PLAIN is warned as unsafe');
  });
  t.match(rs[SCHEMES.length]?.out, /^\{ARGON2ID\}/, 'default scheme ARGON2ID');
  t.equal(rs[SCHEMES.length + 1]?.code, 64, 'unknown scheme exits 64');
});

t.test('user import passwd-file: hashes kept; bad entries refused with file:line, nothing imported', async (t) => {
  const dir = scratchDir(t);
  const dove = (s: string, p: string): string => spawnSync('doveadm', ['pw', '-s', s, '-p', p], { encoding: 'utf8' }).stdout.trim();
  const carol = dove('SHA512-CRYPT', 'carol-pw');
  const dave = dove('BLF-CRYPT', 'dave-pw');
  const erin = dove('SSHA256', 'erin-pw');
  const before = userCount(db);

  const md5 = join(dir, 'md5.passwd');
  writeFileSync(md5, `carol@example.test:${carol}::::::\n# a comment\n\nfrank@example.test:{MD5-CRYPT}$1$abcdefgh$0123456789abcdefghijkl::::::\n`);
  const cost = join(dir, 'cost.passwd');
  writeFileSync(cost, `carol@example.test:${carol}\ndave@example.test:${dave.replace(/\$2y\$\d\d\$/, '$2y$20$')}\n`);
  const clash = join(dir, 'clash.passwd');
  writeFileSync(clash, `carol@example.test:${carol}\nalice@example.test:${erin}\n`);
  // the file is read as bytes: a user name that is not UTF-8 is refused by file:line, and a hash
  // keeps its exact bytes, so one that is not ASCII ({SCHEME} strings are) is refused too
  const latin1Name = join(dir, 'latin1-name.passwd');
  writeFileSync(latin1Name, Buffer.concat([Buffer.from(`carol@example.test:${carol}\n`), Buffer.from('b'), Buffer.from([0xe9]), Buffer.from(`a@example.test:${erin}\n`)]));
  const latin1Hash = join(dir, 'latin1-hash.passwd');
  writeFileSync(latin1Hash, Buffer.concat([Buffer.from(`carol@example.test:${carol}\n# \n`), Buffer.from('pia@example.test:{PLAIN}p'), Buffer.from([0xe4]), Buffer.from('ss::::::\n')]));
  const utf8Hash = join(dir, 'utf8-hash.passwd');
  writeFileSync(utf8Hash, `ute@example.test:{PLAIN}pässwörd\n`);
  const [r1, r2, r3, r4, n1, n2, n3] = await runAll([
    [[...C, 'user', 'import', 'passwd-file', md5]],
    [[...C, 'user', 'import', 'passwd-file', cost]],
    [[...C, 'user', 'import', 'passwd-file', clash]],
    [[...C, 'user', 'import', 'passwd-file', join(dir, 'missing')]],
    [[...C, 'user', 'import', 'passwd-file', latin1Name]],
    [[...C, 'user', 'import', 'passwd-file', latin1Hash]],
    [[...C, 'user', 'import', 'passwd-file', utf8Hash]],
  ]);
  t.equal(n1?.code, 65, `a user name that is not UTF-8 exits 65 ${n1?.err}`);
  t.match(n1?.err, `${latin1Name}:2: the user name is not valid UTF-8`, 'names file:line and why');
  t.equal(n2?.code, 65, `a hash with a byte that is not ASCII exits 65 (it was stored with U+FFFD in its place) ${n2?.err}`);
  t.match(n2?.err, `${latin1Hash}:3: pia@example.test: the password hash is not printable ASCII`);
  t.notMatch(n2?.err, /ss::/, 'the hash is not shown');
  t.equal(n3?.code, 65, `a UTF-8 hash is refused too ${n3?.err}`);
  t.match(n3?.err, `${utf8Hash}:1: ute@example.test: the password hash is not printable ASCII`);
  t.equal(r1?.code, 65, 'unknown scheme exits 65');
  t.match(r1?.err, `${md5}:4:`, 'names file:line');
  t.match(r1?.err, '{MD5-CRYPT}', 'names the scheme');
  t.notMatch(r1?.err, /0123456789abcdefghijkl/, 'not the hash');
  t.equal(r2?.code, 65, 'absurd cost exits 65');
  t.match(r2?.err, `${cost}:2:`, 'names file:line');
  t.match(r2?.err, /cost 20/);
  t.equal(r3?.code, 73, 'an existing user exits 73');
  t.equal(r4?.code, 78, 'a missing file exits 78');
  t.equal(userCount(db), before, 'nothing imported (all or nothing: not even carol, line 1)');

  const good = join(dir, 'good.passwd');
  // bytes after the hash are not read: a Latin-1 gecos field does not matter
  writeFileSync(good, Buffer.concat([Buffer.from(`# Dovecot passwd-file\ncarol@example.test:${carol}:1000:1000:J`), Buffer.from([0xfc]), Buffer.from(`rgen:/home/carol::\ndave:${dave}::::::\nerin:${erin}\n`)]));
  const r5 = run([...C, 'user', 'import', 'passwd-file', good, '--domain', 'example.test']);
  t.equal(r5.code, 0, `import exits 0 ${r5.err}`);
  t.match(r5.out, /imported 3 user/);
  t.equal(storedHash(db, 'carol@example.test'), carol, 'SHA512-CRYPT hash kept as it is');
  t.equal(storedHash(db, 'dave@example.test'), dave, 'BLF-CRYPT hash kept as it is');
  t.equal(storedHash(db, 'erin@example.test'), erin, 'SSHA256 hash kept as it is');
  t.equal(run([...C, 'auth', 'test', 'dave@example.test'], 'dave-pw\n').code, 0, 'an imported user logs in with the old password');
});

t.test('rename keeps settings, password and allocation; delete leaves or purges the mailbox', async (t) => {
  t.same(
    (
      await runAll([
        [[...C, 'user', 'add', 'ren@example.test', '--password-stdin'], 'ren-pw\n'],
        [[...C, 'user', 'add', 'pur@example.test', '--password-stdin'], 'x\n'],
        [[...C, 'domain', 'add', 'old.test']],
      ])
    ).map((r) => r.code),
    [0, 0, 0],
  );
  t.same(
    (
      await runAll([
        [[...C, 'config', 'set', '--user', 'ren@example.test', 'vacation.days', '11']],
        [[...C, 'user', 'add', 'dora@old.test', '--password-stdin'], 'dora-pw\n'],
        [[...C, 'config', 'set', '--domain', 'old.test', 'imap.backend', 'courier']],
      ])
    ).map((r) => r.code),
    [0, 0, 0],
  );
  t.equal(run([...C, 'config', 'set', '--user', 'dora@old.test', 'vacation.days', '12']).code, 0);
  const mbox = join(inst, 'mail', 'example.test', 'ren');
  mkdirSync(join(mbox, 'cur'), { recursive: true });
  writeFileSync(join(mbox, 'cur', '1700000000.M1P1.host:2,S'), 'Subject: hi\n\nkeep me\n');
  allocate(db, 'ren@example.test', { format: 'maildir', path: mbox });
  const before = { home: NODE, allocation: { format: 'maildir', path: mbox } };

  const [r, dr] = await runAll([[[...C, 'user', 'rename', 'ren@example.test', 'renamed@example.test']], [[...C, 'domain', 'rename', 'old.test', 'new.test']]]);
  t.equal(r?.code, 0);
  t.match(r?.out, mbox, 'says the mailbox stays where it is');
  t.equal(dr?.code, 0, 'domain rename');
  const [oldShow, newShow, cfgR, login, onto, intoMissing, doraCfg, doraLogin] = await runAll([
    [[...C, 'user', 'show', 'ren@example.test', '--json']],
    [[...C, 'user', 'show', 'renamed@example.test', '--json']],
    [[...C, 'config', 'show', 'renamed@example.test', '--explain', '--json']],
    [[...C, 'auth', 'test', 'renamed@example.test'], 'ren-pw\n'],
    [[...C, 'user', 'rename', 'renamed@example.test', 'alice@example.test']],
    [[...C, 'user', 'rename', 'renamed@example.test', 'x@nosuch.test']],
    [[...C, 'config', 'show', 'dora@new.test', '--explain', '--json']],
    [[...C, 'auth', 'test', 'dora@new.test'], 'dora-pw\n'],
  ]);
  t.equal(oldShow?.code, 67, 'old address gone');
  const after = json(newShow as Run) as { home: string; allocation: Allocation };
  t.same(after.allocation, before.allocation, 'allocation kept');
  t.equal(after.home, before.home, 'home kept');
  t.match((json(cfgR as Run) as Explained)['vacation.days'], { value: 11, from: 'user' }, 'user setting kept');
  t.equal(login?.code, 0, 'password kept');
  t.equal(onto?.code, 73, 'rename onto an existing user exits 73');
  t.equal(intoMissing?.code, 67, 'rename into a missing domain exits 67');
  const dora = json(doraCfg as Run) as Explained;
  t.match(dora['imap.backend'], { value: 'courier', from: 'domain' }, 'domain rename: domain setting kept');
  t.match(dora['vacation.days'], { value: 12, from: 'user' }, 'domain rename: user setting kept');
  t.equal(doraLogin?.code, 0, 'dora logs in under the new domain');

  // delete without --purge: the mailbox stays, and the output says where
  const pbox = join(inst, 'mail', 'example.test', 'pur');
  mkdirSync(join(pbox, 'new'), { recursive: true });
  writeFileSync(join(pbox, 'new', '1700000001.M2P2.host'), 'Subject: bye\n\n');
  // owned by the mail user, as the mail writer makes them: purge runs as that user
  for (const p of [join(inst, 'mail', 'example.test'), pbox, join(pbox, 'new'), join(pbox, 'new', '1700000001.M2P2.host')]) chownSync(p, 8, 8);
  allocate(db, 'pur@example.test', { format: 'maildir', path: pbox });
  const [del, purge, dd] = await runAll([
    [[...C, 'user', 'del', 'renamed@example.test']],
    [[...C, 'user', 'del', 'pur@example.test', '--purge']],
    [[...C, 'domain', 'del', 'new.test']],
  ]);
  t.equal(del?.code, 0);
  t.match(del?.out, mbox, 'says where the mailbox is');
  t.match(del?.out, /holds mail/);
  t.ok(existsSync(join(mbox, 'cur', '1700000000.M1P1.host:2,S')), 'the mail is still there');
  // delete with --purge: the mailbox is gone
  t.equal(purge?.code, 0);
  t.match(purge?.out, /purged/);
  t.notOk(existsSync(pbox), 'mailbox removed');
  t.ok(existsSync(mbox), 'the other mailbox is untouched');
  // a domain with users cannot be deleted
  t.equal(dd?.code, 65, 'domain del while users exist exits 65');
  t.match(dd?.err, /still has 1 user/);

  const store = new Store(openDb(db), db);
  t.equal(store.getUser('renamed@example.test'), null, 'the deleted user is gone');
  t.equal(store.getUser('pur@example.test'), null, 'the purged user is gone');
  t.equal(store.lookup('renamed@example.test'), null, 'with its settings');
  t.ok(store.getUser('dora@new.test')?.password, 'the refused domain del left its user intact');
  store.close();
  t.equal(run([...C, 'user', 'del', 'dora@new.test']).code, 0);
  t.equal(run([...C, 'domain', 'del', 'new.test']).code, 0, 'empty now: deleted');
  t.equal(run([...C, 'user', 'del', 'dora@new.test']).code, 67, 'deleting a missing user exits 67');
});
