/**
 * NAME        src/proxy/spawner-main — the spawner process: starts handed-off backends for a worker
 * SYNOPSIS    forked by src/proxy/spawner.ts (one per `pigeon serve` worker), never run by hand
 * DESCRIPTION A small, long-lived process that does what Dovecot's and Postfix's master do: it
 *             receives, over the Node IPC channel, a spawn request with the client socket itself
 *             (SCM_RIGHTS) and starts the backend with that socket as its stdin and stdout. The
 *             fork happens here, in a process of a few MB of heap, not in the worker (libuv on
 *             Linux forks, and the cost grows with the forking process's memory; the worker's
 *             event loop was blocked for it on every login). The backends' stderr is this
 *             process's own stderr, a pipe the worker reads (Dovecot's log prefix names the
 *             session): no pipe per session. It reports each child's pid and exit; a child that
 *             exits with the request's `lastWords.code` without a word gets `lastWords.text` on
 *             the client socket first (Dovecot imap's exit 89). It keeps, per child, the child
 *             and the client socket, nothing else. When the worker goes away (IPC channel
 *             closed) it exits; the children keep their clients, as they did when the worker
 *             forked them itself.
 * SECURITY    Runs with the worker's credentials; children get the uid/gid, environment and
 *             arguments the worker built (backends/dovecot.ts), nothing from here.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import type { Socket } from 'node:net';
import type { SpawnerRequest, SpawnerReport } from './spawner.js';

process.title = 'pigeon: spawner';

interface Running {
  readonly child: ChildProcess;
  socket: Socket | null;
}

const running = new Map<number, Running>();

function report(r: SpawnerReport): void {
  // a worker that went away cannot be told: the disconnect handler below exits
  if (process.connected) process.send?.(r);
}

const ignore = (): void => undefined;

function start(m: Extract<SpawnerRequest, { t: 'spawn' }>, socket: Socket | undefined): void {
  if (!socket) {
    report({ t: 'failed', id: m.id, error: 'no client socket came with the request' });
    return;
  }
  socket.on('error', ignore);
  let child: ChildProcess;
  try {
    child = spawn(m.file, m.args, {
      env: m.env,
      cwd: m.cwd,
      ...(m.uid !== undefined ? { uid: m.uid } : {}),
      ...(m.gid !== undefined ? { gid: m.gid } : {}),
      // the client socket as stdin/stdout, our stderr (the worker's log pipe) as stderr
      stdio: [socket, socket, 2],
    });
  } catch (e) {
    socket.destroy();
    report({ t: 'failed', id: m.id, error: e instanceof Error ? e.message : String(e) });
    return;
  }
  const id = m.id;
  if (child.pid === undefined) {
    // spawn failed (ENOENT, EACCES): 'error' follows, no 'exit'
    child.once('error', (e) => {
      socket.destroy();
      report({ t: 'failed', id, error: e.message });
    });
    return;
  }
  child.on('error', ignore);
  startedChild(id, child, m.lastWords ?? null, socket);
}

/**
 * A running child: what is kept of it is the child, its id and, for last words, the socket (a
 * separate function, so that nothing of the request, its environment and arguments, stays).
 */
function startedChild(id: number, child: ChildProcess, lastWords: { readonly code: number; readonly text: string } | null, socket: Socket): void {
  // without last words to say, this process needs the socket no more: the child has its own fd
  const entry: Running = { child, socket: lastWords ? socket : null };
  if (!lastWords) socket.destroy();
  // Node keeps the argv for the object's life: not needed here
  child.spawnargs.length = 0;
  running.set(id, entry);
  report({ t: 'spawned', id, pid: child.pid ?? 0 });
  child.once('exit', (code, signal) => {
    running.delete(id);
    const s = entry.socket;
    entry.socket = null;
    if (s && lastWords && code === lastWords.code && !s.destroyed) s.end(lastWords.text, () => s.destroy());
    else s?.destroy();
    report({ t: 'exit', id, code, signal });
  });
}

process.on('message', (m: SpawnerRequest, handle: unknown) => {
  if (m.t === 'spawn') start(m, handle as Socket | undefined);
  else if (m.t === 'kill') running.get(m.id)?.child.kill(m.signal);
});
process.on('disconnect', () => process.exit(0));
