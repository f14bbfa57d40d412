// Partitions, as separate machines see them: PostgreSQL, node A, node B and a client host each in
// a network namespace of their own (test/helpers/netns.ts), on a database network, a peer
// network and a client network. Cutting a node off the database makes its logins and deliveries
// answer temporary failures while the other node carries on; cutting a node off its peers makes
// hand-offs to it fail with [UNAVAILABLE] within peer.connect_timeout_s; healed, everything
// resumes without a restart, and every message that got a 250 is in its mailbox exactly once.
import t, { type Test } from 'tap';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { CLI, ROOT, scratchDir, serveReady } from './helpers/instance.js';
import { subjectCounts, notExactlyOnce } from './helpers/pg-cluster.js';
import { startPostgres } from './helpers/postgres.js';
import { requireProgram } from './helpers/programs.js';
import { owned, stopGroup, stopAnvil } from './helpers/reaper.js';
import { makeLab, canMakeLabs, type Host, type Lab } from './helpers/netns.js';

// tap's per-file timeout: about 60 s alone (a server, two nodes, four cuts with their timeouts);
// two suites at once on 2 cores make a file take 2-3 times as long
t.setTimeout(360_000);

const DOMAIN = 'example.test';
const PEER_TIMEOUT_S = 3;
const CLIENT = join(ROOT, 'test', 'helpers', 'netns-client.mjs');

interface Node {
  readonly name: string;
  readonly host: Host;
  readonly dir: string;
  child: ChildProcess | null;
  run(args: readonly string[], input?: string): { status: number | null; stdout: string; stderr: string };
  start(): Promise<void>;
  log(): string;
}

function makeNode(t: Test, lab: Lab, base: string, name: string, host: Host, db: string, caFrom: string | null): Node {
  const dir = join(base, name);
  const cl = host.addr.cl ?? '';
  const inNs = (args: readonly string[], input?: string): { status: number | null; stdout: string; stderr: string } => {
    const [cmd, ...rest] = lab.exec(host, [process.execPath, CLI, ...args]);
    const r = spawnSync(cmd ?? 'ip', rest, { input: input ?? '', encoding: 'utf8', timeout: 120_000 });
    return { status: r.status, stdout: r.stdout, stderr: r.stderr };
  };
  const init = ['init', dir, '--node', name, '--listen', `imap=${cl}:143`, '--listen', `pop3=${cl}:110`, '--listen', `lmtp=${cl}:24`, '--listen', `peer=${host.addr.peer ?? ''}:7000`, '--db', db];
  if (caFrom) init.push('--ca-from', caFrom);
  const r = inNs(init);
  if (r.status !== 0) throw new Error(`init ${name}: ${r.stderr}`);
  writeFileSync(
    join(dir, 'conf.d', '50-test.yaml'),
    `log:\n  level: debug\n  file: pigeon.log\nlimits:\n  auth_failure_delay_ms: 50\npeer:\n  connect_timeout_s: ${PEER_TIMEOUT_S}\ndatabase_connect_timeout_s: 2\ndatabase_statement_timeout_s: 2\n`,
  );
  const node: Node = {
    name,
    host,
    dir,
    child: null,
    run: (args, input) => inNs(['-c', dir, ...args], input),
    log: () => (existsSync(join(dir, 'pigeon.log')) ? readFileSync(join(dir, 'pigeon.log'), 'utf8') : ''),
    async start() {
      const [cmd, ...rest] = lab.exec(host, [process.execPath, CLI, '-c', dir, 'serve', '--workers', '1']);
      const child = owned(spawn(cmd ?? 'ip', rest, { stdio: ['ignore', 'ignore', 'pipe'], detached: true }));
      node.child = child;
      await serveReady(child, name);
    },
  };
  // serve and everything in its process group (workers, sessions) gone before tap removes the
  // directory (a worker still writing there made the removal fail with ENOTEMPTY). On the test
  // that owns the directory, not the file's root test: the root's teardowns run after the whole
  // file, when tap has already removed the subtest's directory under a running serve (CI, stop
  // 26: ENOTEMPTY on B). Registered after the lab and the database server, so run before them.
  t.teardown(async () => {
    if (node.child) await stopGroup(node.child);
    await stopAnvil(dir);
  });
  return node;
}

/** One exchange from the client host: its deciding answer line, and how long it took. */
async function client(lab: Lab, from: Host, args: readonly string[]): Promise<{ line: string; ms: number }> {
  const [cmd, ...rest] = lab.exec(from, [process.execPath, CLIENT, ...args]);
  const start = Date.now();
  const child = spawn(cmd ?? 'ip', rest, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.setEncoding('utf8').on('data', (s: string) => (out += s));
  child.stderr.setEncoding('utf8').on('data', (s: string) => (out += s));
  await new Promise((r) => child.once('close', r));
  return { line: out.trim(), ms: Date.now() - start };
}

/** Ask until the answer matches `re` (the partition healing is seen by the next attempt), bounded. */
async function until(ask: () => Promise<{ line: string }>, re: RegExp, ms = 60_000): Promise<string> {
  const deadline = Date.now() + ms;
  for (;;) {
    const { line } = await ask();
    if (re.test(line) || Date.now() > deadline) return line;
    await new Promise((r) => setTimeout(r, 250)); // a client's retry pace, not a wait for anything
  }
}

t.test('partitions between separate machines: a node cut off the database, a node cut off its peers, then healed', async (t) => {
  if (!requireProgram(t, '/usr/lib/dovecot/imap', 'dovecot-imapd')) return;
  const why = canMakeLabs();
  if (why !== null) {
    t.fail(`network namespaces are needed for the partition tests (run as root with iproute2): ${why}`);
    return;
  }
  const lab = makeLab(t);
  const dbHost = lab.host('db', 10, ['db']);
  const hostA = lab.host('a', 2, ['db', 'peer', 'cl']);
  const hostB = lab.host('b', 3, ['db', 'peer', 'cl']);
  const cl = lab.host('cl', 100, ['cl']);
  const pg = await startPostgres(t, { host: dbHost.addr.db ?? '', netns: dbHost.ns });
  if (!pg) return;
  const base = scratchDir(t);
  const A = makeNode(t, lab, base, 'A', hostA, pg.url, null);
  const B = makeNode(t, lab, base, 'B', hostB, pg.url, A.dir);
  t.equal(A.run(['domain', 'add', DOMAIN]).status, 0, 'domain add (through the database network)');
  // the client network stands for the clients' LAN: passwords without TLS from there (not loopback)
  t.equal(A.run(['config', 'set', '--global', 'login.plaintext', 'always']).status, 0, 'login.plaintext always');
  for (const [u, home] of [
    ['alice', 'A'],
    ['bob', 'B'],
  ] as const) {
    const r = A.run(['user', 'add', `${u}@${DOMAIN}`, '--password-stdin', '--home', home], 'secret\n');
    t.equal(r.status, 0, `user add ${u} homed on ${home} ${r.stderr}`);
  }
  await Promise.all([A.start(), B.start()]);

  const a = hostA.addr.cl ?? '';
  const b = hostB.addr.cl ?? '';
  const imap = (at: string, user: string) => client(lab, cl, ['imap', at, '143', `${user}@${DOMAIN}`, 'secret']);
  const pop3 = (at: string, user: string) => client(lab, cl, ['pop3', at, '110', `${user}@${DOMAIN}`, 'secret']);
  const accepted: Record<'alice' | 'bob', string[]> = { alice: [], bob: [] };
  let n = 0;
  const lmtp = async (at: string, user: 'alice' | 'bob'): Promise<string> => {
    const subject = `${user} ${n++}`;
    const { line } = await client(lab, cl, ['lmtp', at, '24', `${user}@${DOMAIN}`, subject]);
    if (line.startsWith('250')) accepted[user].push(subject);
    return line;
  };

  t.test('all connected', async (t) => {
    t.match((await imap(a, 'alice')).line, /^a1 OK/, 'alice at A (her home)');
    t.match((await imap(a, 'bob')).line, /^a1 OK/, 'bob at A: handed off to B over the peer network');
    t.match((await pop3(b, 'alice')).line, /^\+OK/, 'POP3 alice at B: handed off to A');
    t.match(await lmtp(a, 'bob'), /^250 /, 'LMTP at A for bob: stored on B');
    t.match(await lmtp(b, 'alice'), /^250 /, 'LMTP at B for alice: stored on A');
  });

  t.test('A cut off the database', async (t) => {
    lab.cut(hostA, 'db');
    const login = await imap(a, 'alice');
    t.match(login.line, /^a1 NO \[UNAVAILABLE\]/, `a login at A answers NO [UNAVAILABLE] (${login.ms} ms)`);
    t.match((await pop3(a, 'alice')).line, /^-ERR \[SYS\/TEMP\]/, 'POP3 at A: -ERR [SYS/TEMP]');
    t.match(await lmtp(a, 'alice'), /^4\d\d 4\.\d\.\d /, 'LMTP at A: a temporary failure (the MTA retries)');
    const [cmd, ...rest] = lab.exec(hostA, [process.execPath, CLI, '-c', A.dir, 'deliver', `alice@${DOMAIN}`]);
    const d = spawnSync(cmd ?? 'ip', rest, { input: 'Subject: pipe while cut\r\n\r\nx\r\n', encoding: 'utf8', timeout: 120_000 });
    t.equal(d.status, 75, `pigeon deliver at A exits 75 (${d.stdout.trim()})`);
    t.match((await imap(b, 'bob')).line, /^a1 OK/, 'B carries on: bob at B');
    t.match((await imap(b, 'alice')).line, /^a1 OK/, 'and alice at B, handed off to A (the hand-off needs no database at A)');
    t.match(await lmtp(b, 'bob'), /^250 /, 'LMTP at B for bob');
    t.equal(A.child?.exitCode ?? null, null, 'A is still running');
    lab.heal(hostA, 'db');
    t.match(await until(() => imap(a, 'alice'), /^a1 OK/), /^a1 OK/, 'healed: logins at A work again, no restart');
    t.match(await until(async () => ({ line: await lmtp(a, 'alice') }), /^250 /), /^250 /, 'and deliveries');
  });

  t.test('B cut off its peers', async (t) => {
    lab.cut(hostB, 'peer');
    const handoff = await imap(a, 'bob');
    t.match(handoff.line, /^a1 NO \[UNAVAILABLE\]/, `a hand-off from A to B answers NO [UNAVAILABLE] (${handoff.ms} ms)`);
    t.ok(handoff.ms < (PEER_TIMEOUT_S + 10) * 1000, `within peer.connect_timeout_s (${PEER_TIMEOUT_S} s), not a hang (${handoff.ms} ms)`);
    t.match((await pop3(a, 'bob')).line, /^-ERR \[SYS\/TEMP\]/, 'POP3 hand-off: -ERR [SYS/TEMP]');
    t.match(await lmtp(a, 'bob'), /^4\d\d 4\.4\.\d /, 'LMTP at A for bob: 4.4.x, the MTA retries');
    t.match((await imap(a, 'alice')).line, /^a1 OK/, 'A serves its own users');
    t.match((await imap(b, 'bob')).line, /^a1 OK/, 'B serves its own users');
    t.match(await lmtp(b, 'bob'), /^250 /, 'and takes their mail');
    lab.heal(hostB, 'peer');
    t.match(await until(() => imap(a, 'bob'), /^a1 OK/), /^a1 OK/, 'healed: hand-offs to B work again, no restart');
    t.match(await until(async () => ({ line: await lmtp(a, 'bob') }), /^250 /), /^250 /, 'and deliveries through A');
  });

  t.test('every accepted message exactly once', async (t) => {
    for (const [user, home] of [
      ['alice', A],
      ['bob', B],
    ] as const) {
      t.same(
        notExactlyOnce(subjectCounts(home, user), accepted[user]),
        [],
        `${user}: all ${accepted[user].length} accepted messages once in the mailbox on ${home.name}`,
      );
    }
    t.notOk(subjectCounts(A, 'alice').has('pipe while cut'), 'the deferred pipe delivery was not stored');
    t.equal(A.child?.exitCode ?? null, null, 'A never restarted');
    t.equal(B.child?.exitCode ?? null, null, 'B never restarted');
  });
});
