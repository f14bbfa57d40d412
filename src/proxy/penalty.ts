/**
 * NAME        src/proxy/penalty — auth failure delay, growing per client address, node-wide
 * DESCRIPTION Like Dovecot's anvil penalty: the first failure from an address waits the base
 *             delay (limits.auth_failure_delay_ms), then 2x, 4x ... up to
 *             limits.auth_failure_delay_max_ms; from the third failure on, the next attempt also
 *             waits before it is answered (src/proxy/login.ts checks a plain password meanwhile).
 *             Forgotten AUTH_PENALTY_RESET_MS after the last failure, and at once by a successful
 *             login from that address.
 *             The counts live in the node state service (src/anvil), so every process of the
 *             node sees them: parallel connections, serve workers, and one-shot inetd / Postfix
 *             spawn processes. They are counted per client key (src/ip.ts): the IPv4 address,
 *             or the IPv6 /48, computed from the parsed address.
 *             Settings are read at each call, so a SIGHUP reload applies to the next failure.
 *             A success clears the address only when the lookup before its attempt found
 *             failures (Dovecot's auth penalty does the same): a login from a clean address
 *             costs one request to the service, not two. A failure counted by a parallel
 *             connection between that lookup and the success stays (as in Dovecot).
 */
import { clientKey } from '../ip.js';

export interface PenaltyStore {
  penaltyGet(key: string): Promise<{ count: number; ageMs: number }>;
  penaltyFail(key: string): Promise<number>;
  penaltyClear(key: string): Promise<void>;
}

export interface PenaltySettings {
  readonly auth_failure_delay_ms: number;
  readonly auth_failure_delay_max_ms: number;
}

/** What `pending` found before an attempt. */
export interface PenaltyBefore {
  readonly waitMs: number;
  readonly failures: number;
}

export class Penalty {
  private readonly store: PenaltyStore;
  private readonly settings: () => PenaltySettings;
  constructor(store: PenaltyStore, settings: () => PenaltySettings) {
    this.store = store;
    this.settings = settings;
  }

  /** base · 2^(n-1), at most the cap (never below the base) */
  private delay(exponent: number): number {
    const { auth_failure_delay_ms: base, auth_failure_delay_max_ms: cap } = this.settings();
    if (base === 0) return 0;
    return Math.min(base * 2 ** exponent, Math.max(cap, base));
  }

  /** Record a failure and return how long to wait before answering it. */
  async fail(ip: string): Promise<number> {
    const count = await this.store.penaltyFail(clientKey(ip));
    return this.delay(count - 1);
  }

  /**
   * The address's record before an attempt: how long the attempt waits before it is answered
   * (0 below 3 failures), and the failures counted (what a success would clear).
   */
  async pending(ip: string): Promise<PenaltyBefore> {
    const { count } = await this.store.penaltyGet(clientKey(ip));
    return { waitMs: count < 3 ? 0 : this.delay(count - 3), failures: count };
  }

  /** A successful login: the address starts clean (nothing to do when `before` found no failures). */
  async success(ip: string, before: PenaltyBefore): Promise<void> {
    if (before.failures > 0) await this.store.penaltyClear(clientKey(ip));
  }
}
