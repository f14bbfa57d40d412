/**
 * The admin CLI as a real process: `node dist/src/cli.js ...` with argv and stdin, asserting exit
 * codes (sysexits), the one-line errors on stderr, and the --json output parsed: init, domains,
 * adding and showing users, unknown commands. Settings and auth test are in cli-config.test.ts,
 * password schemes, import, rename and delete in cli-users.test.ts.
 * Needs `npm run build` first (npm test does it).
 */
import t from 'tap';
import { X509Certificate } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { NODE, run, runAll, json, dovecotVerifies, storedHash, userCount, digestTree, type Run } from './helpers/admin-cli.js';
import { scratchDir } from './helpers/instance.js';

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

  // a command that reads the instance as root leaves the parsed configuration next to pigeon.yaml
  // (src/instance-parsed.ts): run before the snapshot, so that only the second init is compared
  const nodes = run([...C, 'node', 'list', '--json']);
  const before = digestTree(inst);
  const busy = join(root, 'busy');
  mkdirSync(busy);
  writeFileSync(join(busy, 'keep.txt'), 'mine');
  const [again, b, badListen] = await runAll([
    [['init', inst, '--node', 'other']],
    [['init', busy]],
    [['init', join(root, 'bad-listen'), '--listen', 'smtp=1.2.3.4:25']],
  ]);
  const ns = json(nodes) as { name: string; fingerprint: string }[];
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
