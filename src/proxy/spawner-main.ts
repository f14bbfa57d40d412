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

function start(m: Extract<SpawnerRequest, { t: 'spawn' }>, socket: Socket | undefined): void {
  if (!socket) {
    report({ t: 'failed', id: m.id, error: 'no client socket came with the request' });
    return;
  }
  socket.on('error', () => undefined);
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
  const entry: Running = { child, socket: m.lastWords ? socket : null };
  // without last words to say, this process needs the socket no more: the child has its own fd
  if (!m.lastWords) socket.destroy();
  child.once('error', (e) => {
    // spawn failed (ENOENT, EACCES): no 'exit' follows
    if (child.pid === undefined) {
      entry.socket?.destroy();
      report({ t: 'failed', id: m.id, error: e.message });
    }
  });
  if (child.pid === undefined) return;
  running.set(m.id, entry);
  report({ t: 'spawned', id: m.id, pid: child.pid });
  child.once('exit', (code, signal) => {
    running.delete(m.id);
    const s = entry.socket;
    entry.socket = null;
    if (s && m.lastWords && code === m.lastWords.code && !s.destroyed) s.end(m.lastWords.text, () => s.destroy());
    else s?.destroy();
    report({ t: 'exit', id: m.id, code, signal });
  });
}

process.on('message', (m: SpawnerRequest, handle: unknown) => {
  if (m.t === 'spawn') start(m, handle as Socket | undefined);
  else if (m.t === 'kill') running.get(m.id)?.child.kill(m.signal);
});
process.on('disconnect', () => process.exit(0));
