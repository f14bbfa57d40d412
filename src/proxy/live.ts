/**
 * NAME        src/proxy/live — the sessions running in this process, by user
 * DESCRIPTION Each running session (relayed or handed off) registers how to end it. `endUser` ends every session of a user
 *             (a `pigeon user move` switching the mailbox's home); the daemon asks the store for
 *             users being moved (`watchMoves`: polled, and on change notifications) and ends theirs, so no session keeps writing to
 *             a mailbox that is being copied away.
 */
import type { Store } from '../store.js';

/** A running session as the table keeps it: how to end it. */
export interface LiveSession {
  stop(): void;
}

const live = new Map<string, Set<LiveSession>>();

/**
 * Register a running session; untrackSession() when it ends. The table holds the session object
 * itself (a BackendSession, a handed-off session's record), not a closure per session.
 */
export function trackSession(address: string, s: LiveSession): void {
  let set = live.get(address);
  if (!set) {
    set = new Set();
    live.set(address, set);
  }
  set.add(s);
}

/** The session registered with trackSession() ended. */
export function untrackSession(address: string, s: LiveSession): void {
  const set = live.get(address);
  set?.delete(s);
  if (set && set.size === 0) live.delete(address);
  if (live.size === 0) for (const w of drainWaiters.splice(0)) w();
}

const drainWaiters: (() => void)[] = [];

/** Resolves once no session runs in this process (a one-shot process waits for its handed-off session). */
export function drained(): Promise<void> {
  if (live.size === 0) return Promise.resolve();
  return new Promise((resolve) => drainWaiters.push(resolve));
}

export function liveCount(address?: string): number {
  if (address !== undefined) return live.get(address)?.size ?? 0;
  let n = 0;
  for (const s of live.values()) n += s.size;
  return n;
}

/** End every session of `address`; returns how many were ended. */
export function endUser(address: string): number {
  const s = live.get(address);
  if (!s) return 0;
  const ends = [...s];
  for (const e of ends) e.stop();
  return ends.length;
}

/**
 * Every `ms`, and at once when the store reports a user change: end the sessions of users whose
 * mailbox is being moved. Returns a function that stops watching.
 */
export function watchMoves(store: Store, ms: number, onEnd: (address: string, n: number) => void): () => void {
  let busy = false;
  const sweep = (addresses: readonly string[]): void => {
    for (const a of addresses) {
      const n = endUser(a);
      if (n > 0) onEnd(a, n);
    }
  };
  const t = setInterval(() => {
    if (live.size === 0 || busy) return;
    busy = true;
    store.movingUsers().then(
      (as) => {
        busy = false;
        sweep(as);
      },
      () => {
        busy = false; // database busy or away: next round
      },
    );
  }, ms);
  t.unref();
  const unsubscribe = store.onChange((c) => {
    if (c.kind !== 'user' || !live.has(c.address)) return;
    void store.getUser(c.address).then(
      (u) => {
        if (u?.movingTo != null) sweep([c.address]);
      },
      () => undefined,
    );
  });
  return () => {
    clearInterval(t);
    unsubscribe();
  };
}
