// Several nodes on one machine: each its own instance and `pigeon serve`, on 127.0.0.N, sharing
// one database (a SQLite file, or a private PostgreSQL server) and one cluster CA (node A's),
// made with the real CLI.
import { spawn, type ChildProcess } from 'node:child_process';
import { owned, stopGroup, stopAnvil } from './reaper.js';
import { writeFileSync, readFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { connect } from 'node:net';
import type { Test } from 'tap';
import { ImapFlow } from 'imapflow';
import { pigeon, serveReady, freePort, CLI, SERVE_START_MS, type Run } from './instance.js';
import { Wire } from './wire.js';
import { Dialog, dataOf } from './delivery-lmtp.js';
import { courierBinaries } from './backends.js';
import { startPostgres, type PgServer } from './postgres.js';

export type DbKind = 'sqlite' | 'postgres';

export interface ClusterDb {
  /** --db for the first node (null: its own SQLite file, which the others then share) */
  readonly first: string | null;
  /** --db for every other node */
  readonly db: string;
  /** the server, on PostgreSQL */
  readonly pg: PgServer | null;
}

/**
 * The database the nodes of a cluster test share: node A's SQLite file (base/A/pigeon.db), or a
 * private PostgreSQL server; null when PostgreSQL is not installed (a failed assertion or SKIP).
 */
export async function clusterDb(t: Test, kind: DbKind, base: string): Promise<ClusterDb | null> {
  if (kind === 'sqlite') return { first: null, db: join(base, 'A', 'pigeon.db'), pg: null };
  const pg = await startPostgres(t);
  if (!pg) return null;
  return { first: pg.url, db: pg.url, pg };
}

export interface ClusterNode {
  readonly name: string;
  readonly ip: string;
  readonly dir: string;
  readonly peerPort: number;
  ports: Record<string, number>;
  child: ChildProcess | null;
  /** what the last `start()` printed on stderr */
  startErr: string;
  log(): string;
  run(args: string[], input?: string): Run;
  /** `pigeon serve --workers N` (default 1) */
  start(workers?: number): Promise<void>;
  /** start and expect `pigeon serve` to refuse (exit code and stderr) */
  startFails(): Promise<{ code: number | null; stderr: string }>;
  stop(signal?: NodeJS.Signals): Promise<void>;
}

// peer timeouts stay at their defaults (10 s): a hand-off or a TLS set-up under two test suites
// at once on 2 cores can take seconds, and a shorter bound made genuine links fail
export const CLUSTER_CONF = `log:\n  level: debug\n  file: pigeon.log\nlimits:\n  auth_failure_delay_ms: 50\n`;

/**
 * Create node `name` on `ip`. The first node (no `caFrom`) makes the CA and the database; the
 * others join with `--ca-from` (an instance with the CA key, or a `pigeon cert issue` directory).
 * `initArgs`: more `pigeon init` options (`--key rsa`).
 */
export async function makeNode(t: Test, base: string, name: string, ip: string, db: string | null, caFrom: string | null, extraConf = '', initArgs: readonly string[] = []): Promise<ClusterNode> {
  const dir = join(base, name);
  const peerPort = await freePort(ip);
  const args = ['init', dir, '--node', name, '--listen', `imap=${ip}:0`, '--listen', `pop3=${ip}:0`, '--listen', `lmtp=${ip}:0`, '--listen', `peer=${ip}:${peerPort}`, '--listen', `metrics=${ip}:0`];
  if (db) args.push('--db', db);
  if (caFrom) args.push('--ca-from', caFrom);
  args.push(...initArgs);
  const r = pigeon(null, args);
  if (r.status !== 0) throw new Error(`init ${name}: ${r.stderr}`);
  writeFileSync(join(dir, 'conf.d', '50-test.yaml'), CLUSTER_CONF + extraConf);
  const courier = courierBinaries();
  writeFileSync(join(dir, 'conf.d', '40-courier.yaml'), `courier:\n  imapd: ${courier.imapd}\n  pop3d: ${courier.pop3d}\n`);
  const node: ClusterNode = {
    name,
    ip,
    dir,
    peerPort,
    ports: {},
    child: null,
    startErr: '',
    log: () => (existsSync(join(dir, 'pigeon.log')) ? readFileSync(join(dir, 'pigeon.log'), 'utf8') : ''),
    run: (a, input) => pigeon(dir, a, input),
    async start(workers = 1) {
      const child = owned(spawn(process.execPath, [CLI, '-c', dir, 'serve', '--workers', String(workers)], { stdio: ['ignore', 'ignore', 'pipe'], detached: true }));
      node.child = child;
      await serveReady(child, name, (err) => {
        node.startErr = err;
        for (const m of err.matchAll(/listening (\w+) \S+:(\d+)/g)) node.ports[m[1] ?? ''] = Number(m[2]);
      });
    },
    startFails() {
      const child = owned(spawn(process.execPath, [CLI, '-c', dir, 'serve', '--workers', '1'], { stdio: ['ignore', 'ignore', 'pipe'], detached: true }));
      let err = '';
      child.stderr?.setEncoding('utf8');
      child.stderr?.on('data', (s: string) => (err += s));
      return new Promise((res) => {
        const timer = setTimeout(() => child.kill('SIGKILL'), SERVE_START_MS);
        child.once('exit', (code) => {
          clearTimeout(timer);
          res({ code, stderr: err });
        });
      });
    },
    stop(signal = 'SIGTERM') {
      const child = node.child;
      node.child = null;
      const exited = new Promise<void>((res) => {
        if (!child || child.exitCode !== null || child.signalCode !== null) return res();
        child.once('exit', () => res());
        child.kill(signal);
        setTimeout(() => child.kill('SIGKILL'), 12_000).unref();
      });
      // then the rest of its process group (workers, sessions): nothing writes in the node's
      // directory once this resolves
      return exited.then(() => (child ? stopGroup(child) : undefined)).then(() => stopAnvil(dir));
    },
  };
  t.teardown(() => node.stop('SIGKILL'));
  return node;
}

/** Counters from a node's metrics listener. */
export async function metrics(n: ClusterNode): Promise<Map<string, number>> {
  const r = await fetch(`http://${n.ip}:${n.ports['metrics'] ?? 0}/metrics`);
  const text = await r.text();
  const m = new Map<string, number>();
  for (const line of text.split('\n')) {
    const x = /^(\w+)(?:\{(.*)\})? (\d+)$/.exec(line);
    if (!x) continue;
    const labels = (x[2] ?? '')
      .split(',')
      .filter((l) => l !== '' && !l.startsWith('node=') && !l.startsWith('worker='))
      .join(',');
    m.set(labels ? `${x[1]}{${labels}}` : (x[1] ?? ''), Number(x[3]));
  }
  return m;
}

export async function wireTo(ip: string, port: number): Promise<Wire> {
  const s = connect(port, ip);
  await new Promise<void>((res, rej) => {
    s.once('connect', () => res());
    s.once('error', rej);
  });
  return new Wire(s);
}

/** Deliver one message over LMTP to node `n`; returns the reply line of each recipient. */
export async function lmtpSend(n: ClusterNode, rcpts: readonly string[], msg: string, from = 'bob@example.test'): Promise<string[]> {
  const s = connect(n.ports['lmtp'] ?? 0, n.ip);
  await new Promise<void>((res, rej) => {
    s.once('connect', () => res());
    s.once('error', rej);
  });
  const d = Dialog.of(s);
  try {
    await d.line();
    await d.cmd('LHLO test.example');
    const mf = await d.cmd(`MAIL FROM:<${from}>`);
    if (!mf.startsWith('250')) return rcpts.map(() => mf);
    const rr: string[] = [];
    for (const r of rcpts) rr.push(await d.cmd(`RCPT TO:<${r}>`));
    if (!rr.some((x) => x.startsWith('250'))) return rr;
    const data = await d.cmd('DATA');
    if (!data.startsWith('354')) return rcpts.map(() => data);
    d.send(dataOf(msg));
    const out: string[] = [];
    for (const x of rr) out.push(x.startsWith('250') ? await d.line(120_000) : x);
    d.send('QUIT\r\n');
    return out;
  } finally {
    setTimeout(() => s.destroy(), 200).unref();
  }
}

/** a bound against a hang in the helpers below, never a pace: every wait ends on its event */
const PEER_BOUND_MS = 60_000;

/** Log in at `n` as `user` (password `secret`, imapflow) and read INBOX's message count: the session really ran. */
export async function inboxAt(n: ClusterNode, user: string): Promise<number> {
  const c = new ImapFlow({ host: n.ip, port: n.ports['imap'] ?? 0, secure: false, doSTARTTLS: false, auth: { user, pass: 'secret' }, logger: false, emitLogs: false, connectionTimeout: PEER_BOUND_MS });
  await c.connect();
  const st = await c.status('INBOX', { messages: true });
  await c.logout();
  return st === false ? -1 : (st.messages ?? -1);
}

/** The tagged answer to a LOGIN at `n` (raw, so a failure is seen as the client sees it). */
export async function loginAnswer(n: ClusterNode, user: string): Promise<string> {
  const w = await wireTo(n.ip, n.ports['imap'] ?? 0);
  try {
    await w.until(/^\* OK/m);
    w.write(`a1 LOGIN ${user} secret\r\n`);
    return (await w.until(/^a1 .*\r\n/m, PEER_BOUND_MS)).split('\n').find((l) => l.startsWith('a1 ')) ?? '';
  } finally {
    w.close();
  }
}

/** Whether `what` holds, asked again every 100 ms until it does or `ms` pass (a bound, not a pace). */
export async function until(what: () => boolean | Promise<boolean>, ms = PEER_BOUND_MS): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (!(await what()) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
  return what();
}
