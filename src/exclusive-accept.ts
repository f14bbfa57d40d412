/**
 * NAME        src/exclusive-accept — one serve worker woken per new connection, not all of them
 * SYNOPSIS    await exclusiveAccept(server, onError)   // after server.listen(), in a worker
 * DESCRIPTION `pigeon serve --workers N` shares every listening socket among its workers
 *             (node:cluster, SCHED_NONE): each worker's event loop waits on the same socket, and
 *             without more the kernel wakes every idle worker for each new connection; one
 *             accepts it, the others find nothing (accept4 → EAGAIN) and go back to sleep. On
 *             two cores each of those wake-ups takes CPU from the sessions, and which worker
 *             wins is a coin toss, so a quiet node's logins alternate between workers whose
 *             caches the other one's work has cooled (a c=1 login loop: 215-267 logins/s with 2
 *             workers, 309-311 with 1). With EPOLLEXCLUSIVE (Linux ≥ 4.5; nginx does the same)
 *             the kernel wakes one worker that is waiting, the first registered that is: at low
 *             load one warm worker takes the connections, under load the others take what it
 *             cannot, and no worker wakes for nothing. The native module
 *             (native/pigeon_spawn.c exclusiveAccept) re-registers the socket in libuv's epoll
 *             set with the flag, once libuv has registered it (the loop's next poll after
 *             listen()).
 *             Without the native module, or on a kernel without the flag, every worker is woken
 *             as before: nothing else changes.
 * DIAGNOSTICS onError(text) for an unexpected epoll error; `lost` true when the socket could
 *             not be put back in the epoll set either (this worker no longer accepts on it:
 *             the caller ends the worker, which the primary replaces).
 */
import type { Server } from 'node:net';
import { nativeModule } from './native.js';

/** Attempts before giving up on a socket libuv has not registered (one per event-loop turn). */
const ATTEMPTS = 8;

function fdOf(server: Server): number | null {
  const fd = (server as unknown as { _handle?: { fd?: unknown } | null })._handle?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : null;
}

/**
 * Make `server`'s accepting exclusive in this process. Resolves true once done, false when it was
 * not done (no native module, a kernel without EPOLLEXCLUSIVE, the server closed meanwhile, an
 * error given to onError); never rejects.
 */
export function exclusiveAccept(server: Server, onError: (text: string, lost: boolean) => void): Promise<boolean> {
  const n = nativeModule();
  if (typeof n === 'string') return Promise.resolve(false);
  const fd = fdOf(server);
  if (fd === null) return Promise.resolve(false);
  return new Promise((resolve) => {
    let tries = 0;
    const attempt = (): void => {
      // closed meanwhile (a reload, a drain): its descriptor may be another file's by now
      if (!server.listening || fdOf(server) !== fd) return resolve(false);
      try {
        if (n.exclusiveAccept(fd)) return resolve(true);
      } catch (e) {
        const text = e instanceof Error ? e.message : String(e);
        // EINVAL: a kernel without EPOLLEXCLUSIVE; the socket is registered as before
        if ((e as NodeJS.ErrnoException).code !== 'EINVAL') onError(text, text.startsWith('ELOST'));
        return resolve(false);
      }
      // libuv registers a new listener in its next poll: try again on the loop's next turn
      if (++tries < ATTEMPTS) setImmediate(attempt);
      else resolve(false);
    };
    setImmediate(attempt);
  });
}
