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
 *             Native start (native/pigeon_spawn.c, built by `npm install`): the backend is started
 *             with vfork(2), as glibc's posix_spawn does, instead of libuv's fork(2) of this whole
 *             process (0.6-1.1 ms of page-table copying per login), and what is kept per child is
 *             its pid, the request id and, for last words, one duplicated descriptor: no
 *             ChildProcess or Socket object (≈ 10 kB of PSS per idle session). Exits are collected
 *             on SIGCHLD (waitpid(-1): every child of this process is a backend it started). When
 *             the module is not built (no g++/make/python3 at install), or with
 *             PIGEON_SPAWN=fork in the worker's environment, it starts them with Node's
 *             child_process as before, and says so once on stderr (the worker's log, `spawner`).
 * SECURITY    Runs with the worker's credentials; children get the uid/gid, environment and
 *             arguments the worker built (backends/dovecot.ts), nothing from here.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { nativeModule, type PigeonNative } from '../native.js';
import type { Socket } from 'node:net';
import { constants } from 'node:os';
import type { SpawnerRequest, SpawnerReport } from './spawner.js';

process.title = 'pigeon: spawner';

function loadNative(): PigeonNative | string {
  if (process.argv.includes('--fork')) return 'PIGEON_SPAWN=fork';
  return nativeModule();
}

const native = loadNative();

function report(r: SpawnerReport): void {
  // a worker that went away cannot be told: the disconnect handler below exits
  if (process.connected) process.send?.(r);
}

const ignore = (): void => undefined;

type SpawnRequest = Extract<SpawnerRequest, { t: 'spawn' }>;

// ---- native start: a pid, an id, and for last words a descriptor, per child --------------------

/** What is kept of a running child: a few numbers (and the shared text of its last words). */
interface NativeChild {
  readonly id: number;
  /** our duplicate of the client socket, for last words; -1 without them */
  readonly fd: number;
  readonly lastWords: { readonly code: number; readonly text: Buffer } | null;
}

const byPid = new Map<number, NativeChild>();
const pidOf = new Map<number, number>();
/** the few distinct last words (one per backend): one Buffer each, not one per session */
const words = new Map<string, Buffer>();
const signalName = new Map<number, NodeJS.Signals>(Object.entries(constants.signals).map(([k, v]) => [v, k as NodeJS.Signals]));

/** execvp's search: the candidates of `file` in the child's own PATH */
function candidates(file: string, env: Readonly<Record<string, string>>): string[] {
  if (file.includes('/')) return [file];
  const path = env['PATH'] ?? '/usr/local/bin:/usr/bin:/bin';
  return path.split(':').map((d) => `${d === '' ? '.' : d}/${file}`);
}

function startNative(n: PigeonNative, m: SpawnRequest, socket: Socket): void {
  const fd = (socket as Socket & { _handle?: { fd?: number } | null })._handle?.fd ?? -1;
  let keep = -1;
  let pid: number;
  try {
    if (fd < 3) throw new Error('the client socket came without a descriptor');
    if (m.lastWords) keep = n.dup(fd);
    const env: string[] = [];
    for (const k in m.env) env.push(`${k}=${m.env[k]}`);
    pid = n.spawn(candidates(m.file, m.env), [m.file, ...m.args], env, m.cwd, m.uid ?? -1, m.gid ?? -1, fd);
  } catch (e) {
    if (keep >= 0) n.close(keep);
    socket.destroy();
    // as Node words it: `spawn /usr/lib/dovecot/imap ENOENT`
    const code = (e as { code?: unknown }).code;
    report({ t: 'failed', id: m.id, error: typeof code === 'string' && /^E[A-Z0-9]+$/.test(code) ? `spawn ${m.file} ${code}` : e instanceof Error ? e.message : String(e) });
    return;
  }
  // the child has its own copy: this one is closed in the same turn, before anything reads it
  socket.destroy();
  let lastWords: NativeChild['lastWords'] = null;
  if (m.lastWords) {
    const t = m.lastWords.text;
    let b = words.get(t);
    if (!b) {
      b = Buffer.from(t, 'utf8');
      if (words.size < 16) words.set(t, b);
    }
    lastWords = { code: m.lastWords.code, text: b };
  }
  byPid.set(pid, { id: m.id, fd: keep, lastWords });
  pidOf.set(m.id, pid);
  report({ t: 'spawned', id: m.id, pid });
}

function reapNative(n: PigeonNative): void {
  const r = n.reap();
  for (let i = 0; i + 2 < r.length; i += 3) {
    const pid = r[i] ?? 0;
    const code = r[i + 1] ?? -1;
    const sig = r[i + 2] ?? 0;
    const c = byPid.get(pid);
    if (!c) continue;
    byPid.delete(pid);
    pidOf.delete(c.id);
    if (c.fd >= 0) {
      if (c.lastWords && sig === 0 && code === c.lastWords.code) n.lastWords(c.fd, c.lastWords.text);
      else n.close(c.fd);
    }
    report({ t: 'exit', id: c.id, code: sig === 0 ? code : null, signal: sig === 0 ? null : (signalName.get(sig) ?? 'SIGKILL') });
  }
}

// ---- Node's child_process: the fallback ---------------------------------------------------------

interface Running {
  readonly child: ChildProcess;
  socket: Socket | null;
}

const running = new Map<number, Running>();

function startNode(m: SpawnRequest, socket: Socket): void {
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

function start(m: SpawnRequest, socket: Socket | undefined): void {
  if (!socket) {
    report({ t: 'failed', id: m.id, error: 'no client socket came with the request' });
    return;
  }
  socket.on('error', ignore);
  if (typeof native === 'string') startNode(m, socket);
  else startNative(native, m, socket);
}

function kill(m: Extract<SpawnerRequest, { t: 'kill' }>): void {
  if (typeof native === 'string') {
    running.get(m.id)?.child.kill(m.signal);
    return;
  }
  const pid = pidOf.get(m.id);
  if (pid === undefined) return;
  try {
    // not reaped yet (pidOf is cleared on reaping), so the pid is still this child's
    process.kill(pid, m.signal);
  } catch {
    // exited meanwhile; its exit is reported on SIGCHLD
  }
}

if (typeof native === 'string') process.stderr.write(`starting backends with Node's child_process: ${native}\n`);
else {
  const n = native;
  process.on('SIGCHLD', () => reapNative(n));
}

process.on('message', (m: SpawnerRequest, handle: unknown) => {
  if (m.t === 'spawn') start(m, handle as Socket | undefined);
  else if (m.t === 'kill') kill(m);
});
process.on('disconnect', () => process.exit(0));
