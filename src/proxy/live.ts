/**
 * NAME        src/proxy/live — the sessions running in this process, by user
 * DESCRIPTION Each relayed session registers how to end it. `endUser` ends every session of a user
 *             (a `pigeon user move` switching the mailbox's home); the daemon polls the database
 *             for users being moved (`watchMoves`) and ends theirs, so no session keeps writing to
 *             a mailbox that is being copied away.
 */
import type { Store } from '../store.js';

const live = new Map<string, Set<() => void>>();

/** Register a running session; call the returned function when it ends. */
export function trackSession(address: string, end: () => void): () => void {
  let set = live.get(address);
  if (!set) {
    set = new Set();
    live.set(address, set);
  }
  set.add(end);
  return () => {
    const s = live.get(address);
    s?.delete(end);
    if (s && s.size === 0) live.delete(address);
  };
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
  for (const e of ends) e();
  return ends.length;
}

/** Every `ms`: end the sessions of users whose mailbox is being moved. */
export function watchMoves(store: Store, ms: number, onEnd: (address: string, n: number) => void): NodeJS.Timeout {
  const stmt = store.db.prepare<[], { address: string }>('SELECT address FROM users WHERE moving_to IS NOT NULL');
  const t = setInterval(() => {
    if (live.size === 0) return;
    let rows: { address: string }[];
    try {
      rows = store.tryNow(() => stmt.all()); // never wait for a lock: that would stall every session
    } catch {
      return; // database busy: next round
    }
    for (const r of rows) {
      const n = endUser(r.address);
      if (n > 0) onEnd(r.address, n);
    }
  }, ms);
  t.unref();
  return t;
}
