/**
 * NAME        src/anvil/server — the node state service ("anvil"): one owner of node-wide state
 * SYNOPSIS    owned by `pigeon serve`'s primary process, or auto-started detached by a one-shot
 *             process (inetd, Postfix spawn, stdio) that found none (src/anvil/main.ts)
 * DESCRIPTION Listens on RUN_DIR/anvil.sock (src/anvil/protocol.ts) and keeps the state of
 *             src/anvil/state.ts for every process of the node. Ownership is race-safe: binding
 *             a unix socket is exclusive (two starters at once: one binds, the other finds it
 *             live and leaves); a socket file nobody listens on (a killed owner) is replaced
 *             under RUN_DIR/anvil.lock (O_EXCL, holding the pid; a dead holder's lock is broken),
 *             re-checked under the lock so two replacers do not both bind. Every ANVIL_CHECK_MS
 *             the owner checks that the socket file is still its own (same inode); if it was
 *             removed or replaced it stops (an auto-started service exits; clients reconnect).
 *             An auto-started service exits after ANVIL_IDLE_MS with no client, no record and no
 *             live penalty. Records of a client go when its connection closes (a process died).
 * SECURITY    The socket is created mode 0660 (umask while binding): the owner and the run
 *             directory's group may connect. Requests are parsed with a schema; a bad line ends
 *             that client's connection. The service writes only inside the checked run directory.
 */
import { createServer, connect, type Server, type Socket } from 'node:net';
import { closeSync, openSync, readFileSync, statSync, unlinkSync, writeSync } from 'node:fs';
import { AnvilState } from './state.js';
import { readLines, encode, parseRequest, type Request } from './protocol.js';
import { answer } from './answer.js';
import { pidAlive } from '../pid.js';
import type { RunDir } from './run-dir.js';
import { RunDirError } from './run-dir.js';
import { ANVIL_CHECK_MS, ANVIL_MAX_LINE } from '../limits.js';

export const SOCKET_NAME = 'anvil.sock';
const LOCK_NAME = 'anvil.lock';

export type AnvilLog = (level: 'info' | 'warn' | 'error', msg: string) => void;

export interface AnvilServer {
  readonly state: AnvilState;
  /** stop serving; removes the socket file if it is still ours */
  close(): void;
}

export interface ServeOptions {
  readonly log: AnvilLog;
  /** exit when idle this long (auto-started service); null: live as long as the owner process */
  readonly idleMs: number | null;
  /** the service stopped on its own (idle, or its socket file was removed or replaced) */
  readonly onStop: (why: string) => void;
}

export type OwnResult = { kind: 'owner'; server: AnvilServer } | { kind: 'taken' };

function listenOn(server: Server, path: string): Promise<NodeJS.ErrnoException | null> {
  return new Promise((resolve) => {
    const onError = (e: NodeJS.ErrnoException): void => {
      server.off('listening', onListening);
      resolve(e);
    };
    const onListening = (): void => {
      server.off('error', onError);
      resolve(null);
    };
    server.once('error', onError);
    server.once('listening', onListening);
    // bind happens inside listen(): the socket file is created 0660
    const old = process.umask(0o117);
    try {
      server.listen(path);
    } finally {
      process.umask(old);
    }
  });
}

/** Is a service listening at `path`? 'live', 'stale' (a file, nobody listening) or 'absent'. */
export function probe(path: string): Promise<'live' | 'stale' | 'absent'> {
  return new Promise((resolve) => {
    const s = connect(path);
    s.once('connect', () => {
      s.destroy();
      resolve('live');
    });
    s.once('error', (e: NodeJS.ErrnoException) => resolve(e.code === 'ENOENT' ? 'absent' : 'stale'));
  });
}

/** O_EXCL lock file holding our pid; a lock whose holder is dead is broken once. */
function takeLock(path: string): boolean {
  for (let i = 0; i < 2; i++) {
    try {
      const fd = openSync(path, 'wx', 0o600);
      writeSync(fd, String(process.pid));
      closeSync(fd);
      return true;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw new RunDirError(`cannot create ${path}: ${(e as NodeJS.ErrnoException).code ?? String(e)}`);
      let holder = 0;
      try {
        holder = Number(readFileSync(path, 'utf8').trim());
      } catch {
        continue; // released meanwhile
      }
      if (!Number.isInteger(holder) || holder <= 0 || pidAlive(holder)) return false; // being written, or held
      try {
        unlinkSync(path);
      } catch {
        /* another process broke it first */
      }
    }
  }
  return false;
}

function inodeOf(path: string): number | null {
  try {
    return statSync(path).ino;
  } catch {
    return null;
  }
}

/**
 * Become the node's service in `dir`, or find that one is already running there.
 * Throws RunDirError when the socket cannot be created at all.
 */
export async function ownService(dir: RunDir, opts: ServeOptions): Promise<OwnResult> {
  const path = dir.at(SOCKET_NAME);
  const lock = dir.at(LOCK_NAME);
  for (let attempt = 0; attempt < 40; attempt++) {
    const server = createServer();
    const e = await listenOn(server, path);
    if (e === null) return { kind: 'owner', server: serveOn(server, path, opts) };
    if (e.code !== 'EADDRINUSE') throw new RunDirError(`cannot listen on ${dir.path}/${SOCKET_NAME}: ${e.code ?? e.message}`);
    if ((await probe(path)) === 'live') return { kind: 'taken' };
    // a socket file nobody listens on: replace it, one replacer at a time
    if (takeLock(lock)) {
      try {
        if ((await probe(path)) === 'live') return { kind: 'taken' };
        try {
          unlinkSync(path);
        } catch {
          /* gone already */
        }
        const again = createServer();
        const e2 = await listenOn(again, path);
        if (e2 === null) return { kind: 'owner', server: serveOn(again, path, opts) };
        if (e2.code !== 'EADDRINUSE') throw new RunDirError(`cannot listen on ${dir.path}/${SOCKET_NAME}: ${e2.code ?? e2.message}`);
      } finally {
        try {
          unlinkSync(lock);
        } catch {
          /* nothing to release */
        }
      }
    } else {
      // another process is replacing it right now: give it a moment (the lock is held for a few ms)
      await new Promise((r) => setTimeout(r, 25));
    }
  }
  throw new RunDirError(`cannot take over ${dir.path}/${SOCKET_NAME}: it is neither served nor replaceable`);
}

function serveOn(server: Server, path: string, opts: ServeOptions): AnvilServer {
  const state = new AnvilState();
  const ino = inodeOf(path);
  const clients = new Map<number, { sock: Socket; pid: number }>();
  let nextOwner = 1;
  let lastActivity = Date.now();
  let stopped = false;

  const send = (owner: number, msg: object): void => {
    const c = clients.get(owner);
    if (c && !c.sock.destroyed) c.sock.write(encode(msg));
  };

  const handle = (owner: number, req: Request): object => {
    const c = clients.get(owner);
    if (req.op === 'hello' && c) c.pid = req.pid;
    return answer(state, owner, c?.pid ?? 0, req, Date.now(), (ev, reason) => send(ev.owner, { ev: 'end', conn: ev.conn, reason }));
  };

  server.on('connection', (sock: Socket) => {
    const owner = nextOwner++;
    clients.set(owner, { sock, pid: 0 });
    lastActivity = Date.now();
    readLines(
      sock,
      ANVIL_MAX_LINE,
      (lines) => {
        // the answers to one read's requests leave in one write (the client gathers a tick's
        // requests into one): one wake-up of the client, not one per answer
        sock.cork();
        try {
          for (const line of lines) {
            let req: Request;
            try {
              req = parseRequest(JSON.parse(line));
            } catch {
              opts.log('warn', `client pid ${clients.get(owner)?.pid ?? '?'} sent a malformed request; disconnected`);
              sock.destroy();
              return;
            }
            sock.write(encode({ id: req.id, result: handle(owner, req) }));
          }
        } finally {
          if (!sock.destroyed) sock.uncork();
        }
      },
      (message) => {
        opts.log('warn', `client pid ${clients.get(owner)?.pid ?? '?'}: ${message}; disconnected`);
        sock.destroy();
      },
    );
    sock.on('error', () => {});
    sock.on('close', () => {
      clients.delete(owner);
      state.dropOwner(owner);
      lastActivity = Date.now();
    });
  });
  server.on('error', (e) => opts.log('error', e.message));

  const mine = (): boolean => ino !== null && inodeOf(path) === ino;
  const close = (): void => {
    if (stopped) return;
    stopped = true;
    clearInterval(check);
    process.off('exit', onExit);
    if (mine()) {
      try {
        unlinkSync(path);
      } catch {
        /* already gone */
      }
    }
    server.close();
    for (const c of clients.values()) c.sock.destroy();
  };
  const onExit = (): void => close();
  process.on('exit', onExit);

  const check = setInterval(() => {
    if (!mine()) {
      close();
      opts.onStop('its socket file was removed or replaced');
      return;
    }
    const now = Date.now();
    if (clients.size > 0) lastActivity = now;
    if (opts.idleMs !== null && clients.size === 0 && state.connections() === 0 && state.livePenalties(now) === 0 && now - lastActivity >= opts.idleMs) {
      close();
      opts.onStop('idle');
    }
  }, ANVIL_CHECK_MS);
  // the owner process decides when to exit; a detached service is kept alive by its server
  check.unref();

  return { state, close };
}
