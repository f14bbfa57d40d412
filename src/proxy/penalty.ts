/**
 * NAME        src/proxy/penalty — auth failure delay, growing per client IP
 * DESCRIPTION Like Dovecot's anvil penalty: the first failure from an IP waits the base delay,
 *             then 2x, 4x ... up to AUTH_PENALTY_MAX_MS; forgotten after AUTH_PENALTY_RESET_MS
 *             without failures. Shared by every connection in this process (serve), so parallel
 *             connections from one address do not escape it. IPv6 addresses count per /64.
 */
import { AUTH_PENALTY_MAX_MS, AUTH_PENALTY_RESET_MS } from '../limits.js';

function key(ip: string): string {
  if (!ip.includes(':')) return ip;
  return ip.split(':').slice(0, 4).join(':');
}

export class Penalty {
  private readonly table = new Map<string, { count: number; last: number }>();
  private readonly base: number;
  constructor(baseMs: number) {
    this.base = baseMs;
  }

  /** Record a failure and return how long to wait before answering. */
  fail(ip: string): number {
    const k = key(ip);
    const now = Date.now();
    const e = this.table.get(k);
    const count = e && now - e.last < AUTH_PENALTY_RESET_MS ? e.count + 1 : 1;
    this.table.set(k, { count, last: now });
    if (this.table.size > 100_000) this.prune(now);
    if (this.base === 0) return 0;
    return Math.min(this.base * 2 ** (count - 1), Math.max(AUTH_PENALTY_MAX_MS, this.base));
  }

  /** Current wait for an IP before even checking a password (0 when clean). */
  pending(ip: string): number {
    const e = this.table.get(key(ip));
    if (!e || Date.now() - e.last >= AUTH_PENALTY_RESET_MS || e.count < 3 || this.base === 0) return 0;
    return Math.min(this.base * 2 ** (e.count - 3), AUTH_PENALTY_MAX_MS);
  }

  success(ip: string): void {
    this.table.delete(key(ip));
  }

  private prune(now: number): void {
    for (const [k, v] of this.table) if (now - v.last >= AUTH_PENALTY_RESET_MS) this.table.delete(k);
  }
}
