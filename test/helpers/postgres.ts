// A private PostgreSQL server for one test file: initdb into a temporary directory and pg_ctl start
// as the unprivileged `postgres` system user (PostgreSQL refuses to run as root), on a unix socket
// in that directory and a loopback TCP port (the directory is named after the test process, and
// servers left behind by a test process that was killed are stopped by the next start), trust
// authentication for the role `pigeon` (or scram-sha-256 with a password, for the tests of
// password sources). Stopped (immediate) and
// removed at teardown. `addStandby` makes a streaming standby (pg_basebackup -R) on its own port,
// which `promote` turns into a primary, for failover tests. Debian's `postgresql` package
// provides the binaries; a missing one fails loudly with the package name (requireProgram), or is
// a SKIP with PIGEON_TEST_ALLOW_MISSING=1.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, chownSync, rmSync, readFileSync, writeFileSync, appendFileSync } from 'node:fs';
import { join } from 'node:path';
import { tmpdir } from 'node:os';
import type { Test } from 'tap';
import { requireProgram } from './programs.js';
import { freePort } from './instance.js';
import { pidAlive } from '../../src/pid.js';

export interface PgServer {
  /** postgres://pigeon@HOST:PORT/pigeon (no password with trust authentication) */
  readonly url: string;
  readonly host: string;
  readonly port: number;
  /** the unix socket directory */
  readonly socketDir: string;
  readonly dataDir: string;
  stop(mode?: 'fast' | 'immediate'): Promise<void>;
  start(): Promise<void>;
  /** run SQL through psql as the superuser on the unix socket; returns stdout */
  psql(sql: string, db?: string): string;
  log(): string;
  /** a streaming standby of this server (pg_basebackup -R), started, on its own port */
  addStandby(): Promise<PgServer>;
  /** promote a standby to primary (pg_ctl promote -w) */
  promote(): Promise<void>;
  /** a long-running psql on the socket (to hold a lock or a transaction open) */
  session(t: Test, db?: string): PsqlSession;
}

export interface PsqlSession {
  send(sql: string): void;
  /** resolves when stdout has a line matching `re` */
  until(re: RegExp): Promise<string>;
  close(): Promise<void>;
}

interface Ids {
  uid: number;
  gid: number;
}

function binDir(): string | null {
  const base = '/usr/lib/postgresql';
  if (!existsSync(base)) return null;
  const versions = readdirSync(base)
    .filter((v) => /^\d+$/.test(v))
    .sort((a, b) => Number(b) - Number(a));
  for (const v of versions) if (existsSync(join(base, v, 'bin', 'initdb'))) return join(base, v, 'bin');
  return null;
}

function pgUser(): Ids {
  for (const line of readFileSync('/etc/passwd', 'utf8').split('\n')) {
    const f = line.split(':');
    if (f[0] === 'postgres') return { uid: Number(f[2]), gid: Number(f[3]) };
  }
  throw new Error('no system user "postgres" (install the Debian package postgresql)');
}

function run(bin: string, args: string[], ids: Ids, netns: string | null = null): { status: number | null; out: string } {
  // in a network namespace: entered as root (setns), then the server's own user (setpriv)
  const r =
    netns === null
      ? spawnSync(bin, args, { uid: ids.uid, gid: ids.gid, encoding: 'utf8', timeout: 120_000, cwd: '/' })
      : spawnSync('ip', ['netns', 'exec', netns, 'setpriv', `--reuid=${ids.uid}`, `--regid=${ids.gid}`, '--clear-groups', bin, ...args], { encoding: 'utf8', timeout: 120_000, cwd: '/' });
  return { status: r.status, out: `${r.stdout ?? ''}${r.stderr ?? ''}${r.error ? String(r.error) : ''}` };
}

/** Whether PostgreSQL's binaries are installed (a failed assertion or a SKIP when not). */
export function havePostgres(t: Test): boolean {
  const bin = binDir();
  return requireProgram(t, bin === null ? '/usr/lib/postgresql/VERSION/bin/initdb' : join(bin, 'initdb'), 'postgresql');
}

function server(t: Test, b: string, ids: Ids, root: string, dataDir: string, host: string, port: number, password: string | null, tls: boolean, netns: string | null = null): PgServer {
  const logFile = join(root, 'server.log');
  const ctl = (args: string[]): { status: number | null; out: string } => run(join(b, 'pg_ctl'), ['-D', dataDir, ...args], ids, netns);
  // fsync off: a test server need not survive a power cut; a quick checkpoint keeps a standby close
  const options = `-k ${root} -p ${port} -c listen_addresses=${host} -c fsync=off -c wal_level=replica -c max_wal_senders=4 -c max_connections=200 -c hot_standby=on${tls ? ' -c ssl=on' : ''}`;
  const auth = password === null ? '' : `:${encodeURIComponent(password)}`;
  const srv: PgServer = {
    url: `postgres://pigeon${auth}@${host.includes(':') ? `[${host}]` : host}:${port}/pigeon`,
    host,
    port,
    socketDir: root,
    dataDir,
    async start() {
      const r = ctl(['-o', options, '-l', logFile, '-w', '-t', '60', 'start']);
      if (r.status !== 0) throw new Error(`pg_ctl start failed: ${r.out}\n${existsSync(logFile) ? readFileSync(logFile, 'utf8') : ''}`);
    },
    async stop(mode = 'fast') {
      ctl(['-m', mode, '-w', '-t', '60', 'stop']);
    },
    psql(sql: string, db = 'postgres') {
      const r = spawnSync(join(b, 'psql'), ['-h', root, '-p', String(port), '-U', 'pigeon', '-d', db, '-v', 'ON_ERROR_STOP=1', '-At', '-c', sql], {
        encoding: 'utf8',
        uid: ids.uid,
        gid: ids.gid,
        cwd: '/',
        env: { ...process.env, PGPASSWORD: password ?? '' },
      });
      if (r.status !== 0) throw new Error(`psql ${sql}: ${r.stderr}`);
      return r.stdout;
    },
    log: () => (existsSync(logFile) ? readFileSync(logFile, 'utf8') : ''),
    async addStandby() {
      const sroot = mkdtempSync(join(tmpdir(), `pigeon-pg-${process.pid}-standby-`));
      chownSync(sroot, ids.uid, ids.gid);
      let standby: PgServer | null = null;
      // one teardown, stop first: a data directory removed before pg_ctl stop leaves the server running
      t.teardown(async () => {
        await standby?.stop('immediate');
        rmSync(sroot, { recursive: true, force: true });
      });
      const sdata = join(sroot, 'data');
      const bb = spawnSync(join(b, 'pg_basebackup'), ['-h', root, '-p', String(port), '-U', 'pigeon', '-D', sdata, '-R', '-X', 'stream', '-c', 'fast'], {
        encoding: 'utf8',
        uid: ids.uid,
        gid: ids.gid,
        cwd: '/',
        env: { ...process.env, PGPASSWORD: password ?? '' },
        timeout: 120_000,
      });
      if (bb.status !== 0) throw new Error(`pg_basebackup failed: ${bb.stderr}`);
      const sport = await freePort();
      const sb = server(t, b, ids, sroot, sdata, host, sport, password, tls);
      await sb.start();
      standby = sb;
      return sb;
    },
    async promote() {
      const r = ctl(['-w', '-t', '60', 'promote']);
      if (r.status !== 0) throw new Error(`pg_ctl promote failed: ${r.out}`);
    },
    session(t: Test, db = 'pigeon') {
      const child = spawn(join(b, 'psql'), ['-h', root, '-p', String(port), '-U', 'pigeon', '-d', db, '-At', '-v', 'ON_ERROR_STOP=1'], {
        uid: ids.uid,
        gid: ids.gid,
        cwd: '/',
        stdio: ['pipe', 'pipe', 'pipe'],
        env: { ...process.env, PGPASSWORD: password ?? '' },
      });
      let out = '';
      let err = '';
      const waiters: { re: RegExp; res: (l: string) => void }[] = [];
      const check = (): void => {
        for (const w of [...waiters]) {
          const line = out.split('\n').find((l) => w.re.test(l));
          if (line !== undefined) {
            waiters.splice(waiters.indexOf(w), 1);
            w.res(line);
          }
        }
      };
      child.stdout.setEncoding('utf8').on('data', (d: string) => {
        out += d;
        check();
      });
      child.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
      const exited = new Promise<void>((r) => child.once('close', () => r()));
      t.teardown(() => {
        child.kill('SIGKILL');
        return exited;
      });
      return {
        send: (sql: string) => void child.stdin.write(`${sql}\n`),
        until: (re: RegExp) =>
          new Promise<string>((res, rej) => {
            waiters.push({ re, res });
            check();
            void exited.then(() => rej(new Error(`psql ended before ${String(re)}: ${err}`)));
          }),
        close: async () => {
          child.stdin.end();
          await exited;
        },
      };
    },
  };
  return srv;
}

/**
 * Servers of a test process that is gone (killed at its timeout, before its teardowns ran): stop
 * them and remove their directories. Directories are named pigeon-pg-PID-…, so a server of a test
 * file still running (two suites at once) is never touched.
 */
function reapOrphans(b: string, ids: Ids): void {
  for (const name of readdirSync(tmpdir())) {
    const m = /^pigeon-pg-(\d+)-/.exec(name);
    if (!m || pidAlive(Number(m[1]))) continue;
    const dir = join(tmpdir(), name);
    if (existsSync(join(dir, 'data', 'postmaster.pid'))) run(join(b, 'pg_ctl'), ['-D', join(dir, 'data'), '-m', 'immediate', '-w', 'stop'], ids);
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * Start a private server; null (after a failed assertion, or a SKIP with the opt-out) when
 * PostgreSQL is not installed. With `password`, TCP logins need it (scram-sha-256); the unix
 * socket stays trust, for psql.
 */
export async function startPostgres(t: Test, opts: { host?: string; port?: number; password?: string; tls?: { certPem: string; keyPem: string }; netns?: string } = {}): Promise<PgServer | null> {
  if (!havePostgres(t)) return null;
  const b = binDir() as string;
  const ids = pgUser();
  reapOrphans(b, ids);
  const root = mkdtempSync(join(tmpdir(), `pigeon-pg-${process.pid}-`));
  chownSync(root, ids.uid, ids.gid);
  const dataDir = join(root, 'data');
  const host = opts.host ?? '127.0.0.1';
  const port = opts.port ?? (opts.netns !== undefined ? 5432 : await freePort());
  const password = opts.password ?? null;
  const pwfile = join(root, 'pw');
  if (password !== null) {
    writeFileSync(pwfile, `${password}\n`, { mode: 0o600 });
    chownSync(pwfile, ids.uid, ids.gid);
  }
  const init = run(
    join(b, 'initdb'),
    ['-D', dataDir, '-A', 'trust', '-U', 'pigeon', '--no-sync', '-E', 'UTF8', '--locale=C', ...(password === null ? [] : [`--pwfile=${pwfile}`, '--auth-host=scram-sha-256'])],
    ids,
  );
  rmSync(pwfile, { force: true });
  if (init.status !== 0) {
    rmSync(root, { recursive: true, force: true });
    throw new Error(`initdb failed: ${init.out}`);
  }
  if (opts.tls) {
    // ssl=on reads server.crt / server.key from the data directory; the key must be the owner's only
    for (const [f, pem, mode] of [
      ['server.crt', opts.tls.certPem, 0o644],
      ['server.key', opts.tls.keyPem, 0o600],
    ] as const) {
      writeFileSync(join(dataDir, f), pem, { mode });
      chownSync(join(dataDir, f), ids.uid, ids.gid);
    }
  }
  if (opts.netns !== undefined) {
    // in a network namespace the nodes connect from their own addresses on the server's subnet
    appendFileSync(join(dataDir, 'pg_hba.conf'), `host all all samenet ${password === null ? 'trust' : 'scram-sha-256'}\n`);
  }
  const srv = server(t, b, ids, root, dataDir, host, port, password, opts.tls !== undefined, opts.netns ?? null);
  await srv.start();
  t.teardown(async () => {
    await srv.stop('immediate');
    rmSync(root, { recursive: true, force: true });
  });
  srv.psql('CREATE DATABASE pigeon');
  return srv;
}
