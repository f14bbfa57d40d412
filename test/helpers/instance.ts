// Test helpers: a real instance made by the real CLI, and `pigeon serve` on port-0 listeners.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { owned } from './reaper.js';
import { writeFileSync, mkdirSync, openSync, writeSync, fsyncSync, closeSync, renameSync, chownSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { createServer } from 'node:net';
import type { Test } from 'tap';

export const ROOT = resolve(import.meta.dirname, '..', '..');
export const CLI = join(ROOT, 'dist', 'src', 'cli.js');

/** How long a `pigeon serve` may take to say "ready" before a helper gives up with its stderr. */
export const SERVE_START_MS = 120_000;

export interface Run {
  status: number | null;
  stdout: string;
  stderr: string;
}

export function pigeon(dir: string | null, args: string[], input?: string, env?: NodeJS.ProcessEnv): Run {
  const r = spawnSync(process.execPath, [CLI, ...(dir ? ['-c', dir] : []), ...args], { input, encoding: 'utf8', env: env ?? process.env, timeout: 120_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

export interface Inst {
  dir: string;
  run(args: string[], input?: string): Run;
  addUser(address: string, password: string): void;
}

/**
 * t.testdir(), removed only after every teardown of `t` has run. tap removes a testdir before the
 * teardowns registered after it was made; a daemon still writing there (heartbeats, log lines)
 * then fails the removal with ENOTEMPTY, and the teardowns that would stop it never run (the file
 * hangs until its timeout). Teardowns registered before the testdir run before the removal, and
 * tap runs them all in one go, so one registered first puts every later one before it too.
 */
export function scratchDir(t: Test): string {
  t.teardown(() => undefined);
  return t.testdir({});
}

/** A fresh instance with listeners on port 0, a log file, a short failure delay, and users. */
export function makeInstance(t: Test, opts: { listen?: string[]; users?: Record<string, string>; conf?: string } = {}): Inst {
  const base = scratchDir(t);
  const dir = join(base, 'inst');
  const init = ['init', dir, '--node', 'test1'];
  for (const l of opts.listen ?? []) init.push('--listen', l);
  const r = pigeon(null, init);
  if (r.status !== 0) throw new Error(`init failed: ${r.stderr}`);
  mkdirSync(join(dir, 'conf.d'), { recursive: true });
  writeFileSync(join(dir, 'conf.d', '50-test.yaml'), `log:\n  level: debug\n  file: pigeon.log\nlimits:\n  auth_failure_delay_ms: 50\n${opts.conf ?? ''}`);
  const inst: Inst = {
    dir,
    run: (args, input) => pigeon(dir, args, input),
    addUser(address, password) {
      const domain = address.split('@')[1] ?? '';
      pigeon(dir, ['domain', 'add', domain]);
      const a = pigeon(dir, ['user', 'add', address, '--password-stdin'], `${password}\n`);
      if (a.status !== 0) throw new Error(`user add ${address}: ${a.stderr}`);
    },
  };
  for (const [u, p] of Object.entries(opts.users ?? {})) inst.addUser(u, p);
  return inst;
}

export interface Served {
  ports: Record<string, number>;
  child: ChildProcess;
  stderr: () => string;
  stop(): Promise<void>;
}

/** Start `pigeon serve --workers 1` and wait until every listener printed its port. */
export async function serve(t: Test, inst: Inst, workers = 1): Promise<Served> {
  const child = owned(spawn(process.execPath, [CLI, '-c', inst.dir, 'serve', '--workers', String(workers)], { stdio: ['ignore', 'ignore', 'pipe'], detached: true }));
  let err = '';
  const ports: Record<string, number> = {};
  // no `config test` first: it also fails on backend binaries that tests break on purpose, and a
  // configuration serve cannot load makes it exit 78, which rejects below with its stderr
  await new Promise<void>((res, rej) => {
    // a bound only for the message: under two suites at once a start takes tens of seconds
    const timer = setTimeout(() => rej(new Error(`serve did not start: ${err}`)), SERVE_START_MS);
    child.stderr?.setEncoding('utf8');
    child.stderr?.on('data', (s: string) => {
      err += s;
      for (const m of err.matchAll(/listening (\w+) \S+:(\d+)/g)) ports[m[1] ?? ''] = Number(m[2]);
      if (/pigeon: ready/.test(err) || /error:/.test(err)) {
        clearTimeout(timer);
        if (/error:/.test(err)) rej(new Error(err));
        else res();
      }
    });
    child.once('exit', (c) => {
      clearTimeout(timer);
      rej(new Error(`serve exited ${c}: ${err}`));
    });
  });
  const served: Served = {
    ports,
    child,
    stderr: () => err,
    stop: () =>
      new Promise<void>((res) => {
        if (child.exitCode !== null) return res();
        child.once('exit', () => res());
        child.kill('SIGTERM');
        setTimeout(() => child.kill('SIGKILL'), 12_000).unref();
      }),
  };
  t.teardown(() => served.stop());
  return served;
}

/**
 * Resolve when the `pigeon serve` in `child` says "pigeon: ready" on stderr; `seen` is shown all
 * of its stderr so far at each chunk (ports, start errors). Rejects with that stderr when it exits
 * first, or after SERVE_START_MS (a bound only for the message).
 */
export function serveReady(child: ChildProcess, name: string, seen: (err: string) => void = () => undefined): Promise<void> {
  let err = '';
  return new Promise<void>((res, rej) => {
    const timer = setTimeout(() => rej(new Error(`serve ${name} did not start: ${err}`)), SERVE_START_MS);
    child.stderr?.setEncoding('utf8');
    child.stderr?.on('data', (s: string) => {
      err += s;
      seen(err);
      if (/pigeon: ready/.test(err)) {
        clearTimeout(timer);
        res();
      }
    });
    child.once('exit', (c) => {
      clearTimeout(timer);
      rej(new Error(`serve ${name} exited ${c}: ${err}`));
    });
  });
}

/** A free TCP port on loopback (for programs that cannot listen on port 0 themselves). */
/**
 * A free TCP port on `host` for a server a test is about to start. Chosen at random below the
 * kernel's ephemeral range (net.ipv4.ip_local_port_range, 32768-60999 on Debian), then checked by
 * binding it on that host: a port the kernel hands out for listen(0) is one it may give the next
 * outgoing connection too, in the moment between this check and the server's own bind (two suites
 * at once met that as EADDRINUSE). The one helper for every test (cluster nodes, Postfix, serve).
 */
export async function freePort(host = '127.0.0.1'): Promise<number> {
  for (let i = 0; i < 500; i++) {
    const port = 20000 + Math.floor(Math.random() * 12000);
    if (await canBind(port, host)) return port;
  }
  throw new Error(`no free TCP port on ${host} in 20000-31999 after 500 tries`);
}

function canBind(port: number, host: string): Promise<boolean> {
  return new Promise((res, rej) => {
    const s = createServer();
    s.once('error', (e: NodeJS.ErrnoException) => (e.code === 'EADDRINUSE' || e.code === 'EACCES' ? res(false) : rej(e)));
    s.listen({ port, host, exclusive: true }, () => s.close(() => res(true)));
  });
}

/** Put a message into a Maildir the way an MDA does (tmp -> new), owned by the mail user. */
export function putMessage(maildir: string, text: string, uid = 8, gid = 8): string {
  const name = `${Date.now()}.${Math.random().toString(36).slice(2)}.test`;
  const tmp = join(maildir, 'tmp', name);
  const fd = openSync(tmp, 'wx', 0o600);
  writeSync(fd, text);
  fsyncSync(fd);
  closeSync(fd);
  if (process.getuid?.() === 0) chownSync(tmp, uid, gid);
  const dest = join(maildir, 'new', name);
  renameSync(tmp, dest);
  return dest;
}

export function message(subject: string, body: string): string {
  return `From: Bob <bob@example.test>\r\nTo: alice@example.test\r\nSubject: ${subject}\r\nDate: Thu, 03 Dec 2026 10:00:00 +0000\r\nMessage-ID: <${Math.random().toString(36).slice(2)}@example.test>\r\n\r\n${body}\r\n`;
}
