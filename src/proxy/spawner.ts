/**
 * NAME        src/proxy/spawner — a worker's link to its spawner process (src/proxy/spawner-main.ts)
 * SYNOPSIS    const s = new Spawner(log); const child = await s.spawn({ file, args, env, cwd, uid, gid, socket })
 * DESCRIPTION `pigeon serve` workers start handed-off backends (a plain-TCP client socket given to
 *             Dovecot as its stdin/stdout) through a small, long-lived spawner process instead of
 *             forking themselves: libuv forks the whole worker (2-3 ms of a blocked event loop
 *             per login at 45 MB, more as the worker grows). The request and the client socket
 *             go over the Node IPC channel; the spawner answers with the child's pid, then its
 *             exit. The worker keeps its copy of the socket (not reading it) until the child
 *             runs, so a start that fails is still answered by the proxy (`NO [UNAVAILABLE]`),
 *             and closes it then: the session's bytes never pass through the worker again.
 *             The spawner's stderr carries the backends' log lines (their own prefixes name the
 *             session): `onLine` gets them.
 *             Started with the worker (warm()), else on first use. When it dies, requests in flight fail at once
 *             (`start-failed: the spawner process exited`), the children it ran are sent SIGTERM
 *             (their exits can no longer be reported, and a session the proxy cannot see would
 *             hold its user+IP slot for ever) and end with `lost`, and the next request starts a
 *             new spawner.
 * DIAGNOSTICS `spawner (pid N) exited (CODE|SIGNAL); N sessions ended, N starts failed` (error),
 *             once per death; `starting FILE (spawner pid N, request N)` (debug), per request.
 * SECURITY    The spawner runs with the worker's credentials; it is given the uid/gid, argv and
 *             environment the backend built, and the client socket; no password, no user record.
 */
import { fork, type ChildProcess } from 'node:child_process';
import type { Socket } from 'node:net';
import { fileURLToPath } from 'node:url';
import type { Logger } from '../log.js';
import { LineBuffer } from '../lines.js';

/** worker → spawner */
export type SpawnerRequest =
  | ({ readonly t: 'spawn'; readonly id: number } & Omit<SpawnOptions, 'socket'>)
  | { readonly t: 'kill'; readonly id: number; readonly signal: NodeJS.Signals };

/** spawner → worker */
export type SpawnerReport =
  | { readonly t: 'spawned'; readonly id: number; readonly pid: number }
  | { readonly t: 'failed'; readonly id: number; readonly error: string }
  | { readonly t: 'exit'; readonly id: number; readonly code: number | null; readonly signal: NodeJS.Signals | null };

export interface SpawnOptions {
  readonly file: string;
  readonly args: readonly string[];
  readonly env: Readonly<Record<string, string>>;
  readonly cwd: string;
  readonly uid?: number;
  readonly gid?: number;
  /** the plain client socket: the child's stdin and stdout */
  readonly socket: Socket;
  /** a child that exits with `code` said nothing to the client: `text` goes to it first */
  readonly lastWords?: { readonly code: number; readonly text: string };
}

/** How a spawned child ended: its exit, or `lost` when the spawner died under it. */
export interface SpawnedEnd {
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly lost?: string;
}

/** A running child, as the worker keeps it: a few fields per session. */
export interface Spawned {
  readonly pid: number;
  readonly ended: Promise<SpawnedEnd>;
  kill(signal: NodeJS.Signals): void;
}

interface Starting {
  readonly resolve: (s: Spawned) => void;
  readonly reject: (e: Error) => void;
  readonly socket: Socket;
  /** the spawner asked */
  readonly proc: ChildProcess;
}

interface Child {
  readonly pid: number;
  readonly done: (e: SpawnedEnd) => void;
  /** the spawner that started it */
  readonly proc: ChildProcess;
}

const MAIN = fileURLToPath(new URL('./spawner-main.js', import.meta.url));

/**
 * Stop the worker reading a socket it gives away: what child_process.spawn does to a socket given
 * as a child's stdio (node lib/internal/child_process.js), so that no byte meant for the backend
 * is read here. A later read() or resume() (the hand-off failed: the session reads on) starts
 * reading again.
 */
function stopReading(s: Socket): void {
  const x = s as Socket & { _handle?: { reading?: boolean; readStop?: () => number } | null; _readableState?: { reading: boolean } };
  const h = x._handle;
  if (h?.readStop) {
    h.reading = false;
    h.readStop();
  }
  s.pause();
  if (x._readableState) x._readableState.reading = false;
}

export class Spawner {
  private proc: ChildProcess | null = null;
  private nextId = 1;
  private readonly starting = new Map<number, Starting>();
  private readonly children = new Map<number, Child>();

  /** `log`: the spawner's own events; `onLine`: each line the backends (and the spawner itself) write to stderr */
  private readonly log: (level: 'debug' | 'error', message: string) => void;
  private readonly onLine: (line: string) => void;

  constructor(log: (level: 'debug' | 'error', message: string) => void, onLine: (line: string) => void) {
    this.log = log;
    this.onLine = onLine;
  }

  /** Start the spawner now (a daemon's worker at start-up), so that the first login does not wait for it. */
  warm(): void {
    this.ensure();
  }

  private ensure(): ChildProcess {
    if (this.proc && this.proc.connected) return this.proc;
    // no NODE_OPTIONS or flags of the worker (an inspector, a heap size): it is a small process,
    // and every child gets the environment its backend built, not this one
    // A young generation of 1 MB (default: up to 16 MB semi-spaces) and V8's memory-saving heap
    // growth: the garbage of each request (a message, its environment) is collected within a few
    // hundred logins instead of piling up as resident memory of an otherwise idle process
    // (`bench-proxy --only idle`: proxy PSS 12.8 → 10.5 kB/session); a smaller heap is also
    // cheaper to fork.
    // PIGEON_SPAWN=fork: Node's child_process in the spawner, not the native vfork (to compare them)
    const p = fork(MAIN, process.env['PIGEON_SPAWN'] === 'fork' ? ['--fork'] : [], { stdio: ['ignore', 'ignore', 'pipe', 'ipc'], serialization: 'json', execArgv: ['--max-semi-space-size=1', '--optimize-for-size'], env: {} });
    this.proc = p;
    const lines = new LineBuffer();
    p.stderr?.on('data', (c: Buffer) => {
      lines.push(c);
      for (let r = lines.line(); r !== null; r = lines.line()) if (r.kind === 'line') this.onLine(r.line.toString('utf8'));
    });
    p.on('message', (m: SpawnerReport) => this.report(m));
    // it could not even start (EAGAIN, ENOMEM): no 'exit' follows
    p.on('error', (e) => {
      if (p.pid === undefined) this.died(p, null, null, e.message);
    });
    p.once('exit', (code, signal) => this.died(p, code, signal));
    // a worker with no session in flight should not be kept alive by its spawner
    p.unref();
    (p.channel as { unref?: () => void } | undefined)?.unref?.();
    return p;
  }

  private report(m: SpawnerReport): void {
    if (m.t === 'exit') {
      const c = this.children.get(m.id);
      this.children.delete(m.id);
      c?.done({ code: m.code, signal: m.signal });
      this.refresh();
      return;
    }
    const s = this.starting.get(m.id);
    if (!s) return;
    this.starting.delete(m.id);
    if (m.t === 'failed') {
      s.reject(new Error(m.error));
      this.refresh();
      return;
    }
    // the child holds the client socket now: close our copy (never end(): that would shut it down for the child too)
    s.socket.destroy();
    let done: (e: SpawnedEnd) => void = () => undefined;
    const ended = new Promise<SpawnedEnd>((resolve) => (done = resolve));
    this.children.set(m.id, { pid: m.pid, done, proc: s.proc });
    const id = m.id;
    s.resolve({
      pid: m.pid,
      ended,
      kill: (signal) => {
        if (this.children.has(id)) this.send({ t: 'kill', id, signal });
      },
    });
  }

  private send(m: SpawnerRequest, socket?: Socket): boolean {
    const p = this.proc;
    if (!p || !p.connected) return false;
    // keepOpen: the worker keeps its copy until the child runs (to answer a failed start)
    return socket ? p.send(m, socket, { keepOpen: true }) : p.send(m);
  }

  /** While sessions run or start, the spawner keeps the worker's event loop alive; idle, it does not. */
  private refresh(): void {
    const p = this.proc;
    if (!p) return;
    const busy = this.starting.size + this.children.size > 0;
    const ch = p.channel as { ref?: () => void; unref?: () => void } | undefined;
    if (busy) {
      p.ref();
      ch?.ref?.();
    } else {
      p.unref();
      ch?.unref?.();
    }
  }

  private died(p: ChildProcess, code: number | null, signal: NodeJS.Signals | null, error?: string): void {
    if (this.proc === p) this.proc = null;
    // what this spawner had (an older one may still be exiting while a new one serves)
    const starting: Starting[] = [];
    const children: Child[] = [];
    for (const [id, s] of this.starting) {
      if (s.proc !== p) continue;
      this.starting.delete(id);
      starting.push(s);
    }
    for (const [id, c] of this.children) {
      if (c.proc !== p) continue;
      this.children.delete(id);
      children.push(c);
    }
    const why = error !== undefined ? `the spawner process could not start: ${error}` : `the spawner process exited (${code ?? signal})`;
    for (const s of starting) s.reject(new Error(why));
    for (const c of children) {
      try {
        // orphaned now; reparented, its exit would reach no one
        process.kill(c.pid, 'SIGTERM');
      } catch {
        // gone already
      }
      c.done({ code: null, signal: null, lost: why });
    }
    if (starting.length + children.length > 0) {
      this.log('error', `spawner (pid ${p.pid ?? '?'}) ${error !== undefined ? `could not start: ${error}` : `exited (${code ?? signal})`}; ${children.length} sessions ended, ${starting.length} starts failed; the next login starts a new one`);
    }
  }

  /** Start `file` on the client socket through the spawner; rejects when it could not start. */
  spawn(o: SpawnOptions): Promise<Spawned> {
    return new Promise<Spawned>((resolve, reject) => {
      const id = this.nextId++;
      let p: ChildProcess;
      try {
        p = this.ensure();
      } catch (e) {
        reject(e instanceof Error ? e : new Error(String(e)));
        return;
      }
      stopReading(o.socket);
      this.starting.set(id, { resolve, reject, socket: o.socket, proc: p });
      this.refresh();
      const m: SpawnerRequest = {
        t: 'spawn',
        id,
        file: o.file,
        args: o.args,
        env: o.env,
        cwd: o.cwd,
        ...(o.uid !== undefined ? { uid: o.uid } : {}),
        ...(o.gid !== undefined ? { gid: o.gid } : {}),
        ...(o.lastWords !== undefined ? { lastWords: o.lastWords } : {}),
      };
      this.log('debug', `starting ${o.file} (spawner pid ${p.pid ?? '?'}, request ${id})`);
      if (!p.connected || !this.send(m, o.socket)) {
        // the channel is full or closing: 'exit' rejects it if it is dying; otherwise node queues it
        if (!p.connected) {
          this.starting.delete(id);
          reject(new Error('the spawner process is not running'));
        }
      }
    });
  }
}

/**
 * A backend's line from the spawner's stderr, in our log under the backend's own prefix: Dovecot's
 * `imap(USER)<pid><session><rip=IP>: ` becomes `imap(USER)` with rip= (as src/proxy/router.ts
 * logs a backend it started itself); a line without that prefix (the spawner's own) goes under
 * `spawner`.
 */
export function logBackendLine(log: Logger, line: string): void {
  const m = /^([^:<]*\([^)]*\))((?:<[^>]*>)*): /.exec(line);
  if (!m?.[1]) {
    log.log('warn', 'spawner', line);
    return;
  }
  const rip = /<rip=([0-9a-fA-F:.]+)>/.exec(m[2] ?? '')?.[1];
  log.log('info', m[1], line.slice(m[0].length), rip !== undefined ? { rip } : undefined);
}
