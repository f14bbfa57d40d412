// Partitions, as separate machines see them: PostgreSQL and two nodes each in a network namespace
// of their own, joined by a bridge in a fourth, on a test-only subnet (10.213.0.0/24) that exists
// only inside those namespaces. A node cut off from the database answers its logins and
// deliveries with temporary failures while the other node carries on; a node cut off from its
// peer fails hand-offs to it with [UNAVAILABLE] within the peer connect timeout; healed, all
// resumes without a restart. A cut is a blackhole route on the far side (its replies vanish:
// from the node, the link goes silent, as a broken cable does). Namespaces and the server's
// directory are named after the test process: those of a killed test process are removed (its
// server stopped) at the next start of this file. Traffic stays inside the namespaces.
import t from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, chownSync, readFileSync, writeFileSync, existsSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { tmpdir } from 'node:os';
import { CLI, scratchDir, SERVE_START_MS } from './helpers/instance.js';
import { owned } from './helpers/reaper.js';
import { havePostgres } from './helpers/postgres.js';
import { requireProgram } from './helpers/programs.js';

// tap's per-file timeout: about 60 s alone (timeouts of cut links are part of it); two suites at
// once on 2 cores make a file take 2-3 times as long
t.setTimeout(300_000);

const PREFIX = `p13-${process.pid}-`;
const NET = '10.213.0';
const IP = { db: `${NET}.10`, n1: `${NET}.2`, n2: `${NET}.3` };
const USER = 'example.test';

function sh(cmd: string, args: string[], input?: string): { status: number | null; out: string; err: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8', input, timeout: 120_000 });
  return { status: r.status, out: r.stdout ?? '', err: `${r.stderr ?? ''}${r.error ? String(r.error) : ''}` };
}
function must(cmd: string, args: string[], input?: string): string {
  const r = sh(cmd, args, input);
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: exit ${r.status}: ${r.err}`);
  return r.out;
}
function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}
/** Remove namespaces of test processes that are gone (killed before their teardown ran). */
function reapNamespaces(): void {
  for (const line of sh('ip', ['netns', 'list']).out.split('\n')) {
    const name = line.split(' ')[0] ?? '';
    const m = /^p13-(\d+)-/.exec(name);
    if (!m || alive(Number(m[1]))) continue;
    for (const pid of sh('ip', ['netns', 'pids', name]).out.split('\n').filter(Boolean)) {
      try {
        process.kill(Number(pid), 'SIGKILL');
      } catch {
        /* gone */
      }
    }
    sh('ip', ['netns', 'del', name]);
  }
}

/** Stop and remove the servers of test processes that are gone (this file's, named pigeon-pg-PID-part-…). */
function reapServers(bin: string, ids: { uid: number; gid: number }): void {
  for (const name of sh('ls', [tmpdir()]).out.split('\n')) {
    const m = /^pigeon-pg-(\d+)-part-/.exec(name);
    if (!m || alive(Number(m[1]))) continue;
    const data = join(tmpdir(), name, 'data');
    if (existsSync(join(data, 'postmaster.pid'))) spawnSync(join(bin, 'pg_ctl'), ['-D', data, '-m', 'immediate', '-w', 'stop'], { ...ids, cwd: '/' });
    rmSync(join(tmpdir(), name), { recursive: true, force: true });
  }
}

t.test('partitions: a node cut off from the database, from its peer, then healed', async (t) => {
  if (sh('ip', ['netns', 'list']).status !== 0) {
    t.fail('ip netns is not usable here (needs root and iproute2)');
    return;
  }
  if (!requireProgram(t, '/usr/lib/dovecot/imap', 'dovecot-imapd') || !havePostgres(t)) return;
  reapNamespaces();
  const ns = { hub: `${PREFIX}hub`, db: `${PREFIX}db`, n1: `${PREFIX}n1`, n2: `${PREFIX}n2` };
  const procs: (() => void)[] = [];
  t.teardown(() => {
    for (const stop of procs.reverse()) stop();
    for (const n of Object.values(ns)) sh('ip', ['netns', 'del', n]);
  });
  for (const n of Object.values(ns)) must('ip', ['netns', 'add', n]);
  must('ip', ['-n', ns.hub, 'link', 'add', 'br0', 'type', 'bridge']);
  must('ip', ['-n', ns.hub, 'link', 'set', 'br0', 'up']);
  for (const k of ['db', 'n1', 'n2'] as const) {
    must('ip', ['-n', ns.hub, 'link', 'add', `v${k}`, 'type', 'veth', 'peer', 'name', 'e0', 'netns', ns[k]]);
    must('ip', ['-n', ns.hub, 'link', 'set', `v${k}`, 'master', 'br0', 'up']);
    must('ip', ['-n', ns[k], 'addr', 'add', `${IP[k]}/24`, 'dev', 'e0']);
    must('ip', ['-n', ns[k], 'link', 'set', 'e0', 'up']);
    must('ip', ['-n', ns[k], 'link', 'set', 'lo', 'up']);
  }

  // PostgreSQL in its namespace (as the postgres user; initdb needs no network)
  const bin = (/^(\d+)$/m.exec(sh('ls', ['/usr/lib/postgresql']).out)?.[1] ?? '15').replace(/^/, '/usr/lib/postgresql/') + '/bin';
  const pw = readFileSync('/etc/passwd', 'utf8').split('\n').map((l) => l.split(':')).find((f) => f[0] === 'postgres') ?? [];
  const ids = { uid: Number(pw[2]), gid: Number(pw[3]) };
  reapServers(bin, ids);
  const root = mkdtempSync(join(tmpdir(), `pigeon-pg-${process.pid}-part-`));
  chownSync(root, ids.uid, ids.gid);
  const data = join(root, 'data');
  const init = spawnSync(join(bin, 'initdb'), ['-D', data, '-A', 'trust', '-U', 'pigeon', '--no-sync', '-E', 'UTF8', '--locale=C'], { ...ids, encoding: 'utf8', cwd: '/' });
  if (init.status !== 0) throw new Error(`initdb: ${init.stderr}`);
  // the nodes connect over the test subnet (initdb's trust lines cover only loopback)
  writeFileSync(join(data, 'pg_hba.conf'), `${readFileSync(join(data, 'pg_hba.conf'), 'utf8')}host all pigeon ${NET}.0/24 trust\n`);
  procs.push(() => {
    spawnSync(join(bin, 'pg_ctl'), ['-D', data, '-m', 'immediate', '-w', 'stop'], { ...ids, cwd: '/' });
    rmSync(root, { recursive: true, force: true });
  });
  must('ip', ['netns', 'exec', ns.db, 'runuser', '-u', 'postgres', '--', join(bin, 'pg_ctl'), '-D', data, '-l', join(root, 'log'), '-w', '-o', `-k ${root} -p 5432 -c listen_addresses=${IP.db} -c fsync=off`, 'start']);
  const psql = spawnSync(join(bin, 'psql'), ['-h', root, '-p', '5432', '-U', 'pigeon', '-d', 'postgres', '-c', 'CREATE DATABASE pigeon'], { ...ids, encoding: 'utf8', cwd: '/' });
  if (psql.status !== 0) throw new Error(`psql: ${psql.stderr}`);
  const url = `postgres://pigeon@${IP.db}:5432/pigeon`;

  // two nodes, each initialised and served inside its own namespace
  const base = scratchDir(t);
  const dir = { n1: join(base, 'n1'), n2: join(base, 'n2') };
  const pigeonIn = (k: 'n1' | 'n2', args: string[], input?: string) => sh('ip', ['netns', 'exec', ns[k], process.execPath, CLI, ...args], input);
  const conf = 'log:\n  level: debug\n  file: pigeon.log\nlimits:\n  auth_failure_delay_ms: 50\ndatabase_connect_timeout_s: 2\ndatabase_statement_timeout_s: 2\npeer:\n  connect_timeout_s: 3\n';
  for (const k of ['n1', 'n2'] as const) {
    const listen = ['imap', 'lmtp', 'peer'].flatMap((p, i) => ['--listen', `${p}=${IP[k]}:${[1143, 1124, 4190][i]}`]);
    const r = pigeonIn(k, ['init', dir[k], '--node', k, '--db', url, ...listen, ...(k === 'n2' ? ['--ca-from', dir.n1] : [])]);
    if (r.status !== 0) throw new Error(`init ${k}: ${r.err}`);
    writeFileSync(join(dir[k], 'conf.d', '50-test.yaml'), conf);
  }
  must('ip', ['netns', 'exec', ns.n1, process.execPath, CLI, '-c', dir.n1, 'domain', 'add', USER]);
  // the test clients are not on loopback: password logins without TLS must be allowed
  must('ip', ['netns', 'exec', ns.n1, process.execPath, CLI, '-c', dir.n1, 'config', 'set', '--global', 'login.plaintext', 'always']);
  for (const [u, home] of [
    ['alice', 'n1'],
    ['bob', 'n2'],
  ] as const) {
    const r = pigeonIn('n1', ['-c', dir.n1, 'user', 'add', `${u}@${USER}`, '--password-stdin', '--home', home], 'secret\n');
    if (r.status !== 0) throw new Error(`user add: ${r.err}`);
  }
  for (const k of ['n1', 'n2'] as const) {
    const child = owned(spawn('ip', ['netns', 'exec', ns[k], process.execPath, CLI, '-c', dir[k], 'serve', '--workers', '1'], { stdio: ['ignore', 'ignore', 'pipe'], detached: true }));
    procs.push(() => child.kill('SIGKILL'));
    await new Promise<void>((res, rej) => {
      let err = '';
      const timer = setTimeout(() => rej(new Error(`serve ${k}: ${err}`)), SERVE_START_MS);
      child.stderr?.setEncoding('utf8').on('data', (s: string) => {
        err += s;
        if (/pigeon: ready/.test(err)) {
          clearTimeout(timer);
          res();
        }
      });
      child.once('exit', (c) => rej(new Error(`serve ${k} exited ${c}: ${err}`)));
    });
  }

  /** IMAP STATUS through node `at` (a client in that node's namespace): the server's line, and how long it took */
  const login = (at: 'n1' | 'n2', user: string): { line: string; ms: number } => {
    const t0 = Date.now();
    const r = sh('ip', ['netns', 'exec', ns[at], 'curl', '-sv', '--max-time', '60', `imap://${IP[at]}:1143/INBOX`, '-u', `${user}@${USER}:secret`, '-X', 'STATUS INBOX (MESSAGES)']);
    const lines = `${r.out}\n${r.err}`.split('\n');
    const line = lines.find((l) => /^< A002 (NO|BAD)/.test(l)) ?? lines.find((l) => /^\* STATUS/.test(l)) ?? `curl exit ${r.status}`;
    return { line: line.replace(/^< /, '').trim(), ms: Date.now() - t0 };
  };
  /** one LMTP delivery at node `at` (a client in its namespace): the reply to the recipient */
  const lmtp = (at: 'n1' | 'n2', user: string): string => {
    const py = `import smtplib
s = smtplib.LMTP('${IP[at]}', 1124)
s.ehlo()
s.mail('carol@remote.test')
code, text = s.rcpt('${user}@${USER}')
if code == 250:
    try:
        code, text = s.data(b'Subject: partition\\r\\n\\r\\nhi\\r\\n')
    except smtplib.SMTPDataError as e:
        code, text = e.smtp_code, e.smtp_error
print(code, text.decode())
`;
    return sh('ip', ['netns', 'exec', ns[at], 'python3', '-c', py]).out.trim();
  };
  const until = async (what: () => boolean, ms = 60_000): Promise<boolean> => {
    const end = Date.now() + ms;
    while (!what() && Date.now() < end) await new Promise((r) => setTimeout(r, 200));
    return what();
  };

  t.match(login('n1', 'alice').line, /^\* STATUS INBOX/, 'connected: alice (home n1) at n1');
  t.match(login('n1', 'bob').line, /^\* STATUS INBOX/, 'bob (home n2) at n1, through the peer link');
  t.match(lmtp('n1', 'bob'), /^250/, 'mail for bob at n1 reaches n2');
  t.comment(`n2: ${login('n2', 'bob').line}`);

  await t.test('n1 cut off from the database: temporary failures at n1, n2 carries on, healed without a restart', async (t) => {
    // the server's replies to n1 vanish: open connections go silent, new ones time out
    must('ip', ['-n', ns.db, 'route', 'add', 'blackhole', `${IP.n1}/32`]);
    const a = login('n1', 'alice');
    t.match(a.line, /^A002 NO \[UNAVAILABLE\]/, `IMAP at n1: NO [UNAVAILABLE] (${a.ms} ms)`);
    t.match(lmtp('n1', 'alice'), /^451 4\.3\.0/, 'LMTP at n1: 451 4.3.0');
    t.match(login('n2', 'bob').line, /^\* STATUS INBOX/, 'n2 still serves its own user');
    t.match(lmtp('n2', 'bob'), /^250/, 'and delivers');
    t.match(readFileSync(join(dir.n1, 'pigeon.log'), 'utf8'), /database: Error: database .* unavailable/, 'n1 logs the outage');
    must('ip', ['-n', ns.db, 'route', 'del', 'blackhole', `${IP.n1}/32`]);
    t.ok(
      await until(() => /^\* STATUS/.test(login('n1', 'alice').line)),
      'healed: alice logs in at n1 again, no restart',
    );
    t.match(lmtp('n1', 'alice'), /^250/, 'and mail flows');
  });

  await t.test('n1 cut off from its peer: hand-offs to n2 fail with [UNAVAILABLE] within the connect timeout, healed', async (t) => {
    // n2 cannot answer n1 (its replies vanish): from n1, the link is silent, as a cut cable is
    must('ip', ['-n', ns.n2, 'route', 'add', 'blackhole', `${IP.n1}/32`]);
    const b = login('n1', 'bob');
    t.match(b.line, /^A002 NO \[UNAVAILABLE\]/, 'bob at n1: NO [UNAVAILABLE]');
    // peer.connect_timeout_s is 3: a bound well above it (a link may be tried again), far below a hang
    t.ok(b.ms >= 3_000 && b.ms < 30_000, `answered in ${b.ms} ms: after the connect timeout, not a hang`);
    const m = lmtp('n1', 'bob');
    t.match(m, /^4\d\d 4\.4\.\d/, `mail for bob at n1: deferred (${m})`);
    t.match(login('n1', 'alice').line, /^\* STATUS INBOX/, 'n1 still serves its own user');
    must('ip', ['-n', ns.n2, 'route', 'del', 'blackhole', `${IP.n1}/32`]);
    t.ok(
      await until(() => /^\* STATUS/.test(login('n1', 'bob').line)),
      'healed: bob at n1 again, no restart',
    );
  });
  t.ok(existsSync(dir.n1), 'instance directories stay for the teardown');
});
