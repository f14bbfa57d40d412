/**
 * NAME        src/anvil/state — the node's connection records and failure penalties (no I/O)
 * DESCRIPTION One record per client connection a process of the node holds, keyed by the
 *             owner (one connection to the anvil service, i.e. one process) and the owner's
 *             connection id. A record is `preauth` (not logged in yet) or `session` (logged in,
 *             with user and session id); `held` says whether the proxy itself still holds the
 *             client's socket (pre-auth, relayed, forwarded to another node) or handed it to the
 *             backend (then it counts against the backend, not against us).
 *             Counts:
 *               per IP       preauth records of untrusted addresses (limits.preauth_per_ip)
 *               in all       preauth records + held sessions (limits.max_connections)
 *               per user+IP  sessions of one user from one address (limits.max_userip_connections)
 *             When a per-IP or the global count is full, the oldest preauth record (of that
 *             address, or of the node) is evicted: removed here and reported to the caller, who
 *             tells its owner to close that connection. With nothing to evict a new connection
 *             is refused. Records of an owner that goes away are dropped with it.
 *             Penalties: failures per client key (src/ip.ts clientKey) and when the last one was;
 *             forgotten AUTH_PENALTY_RESET_MS after the last failure.
 *             Records carry what `pigeon who` / `kick` need (pid, protocol, client IP, user,
 *             session, backend or home node, since): `kick` removes the matching sessions and
 *             their owners are told to end them; `dropDead` removes the records of a process
 *             that is gone without closing its link (its pid no longer exists).
 */
import { AUTH_PENALTY_RESET_MS } from '../limits.js';

export type ConnState = 'preauth' | 'session';

export interface ConnRecord {
  /** the anvil connection (process) that holds it */
  readonly owner: number;
  readonly pid: number;
  readonly conn: string;
  readonly ip: string;
  readonly proto: string;
  readonly trusted: boolean;
  state: ConnState;
  held: boolean;
  user: string | null;
  session: string | null;
  /** where the session went once it runs: the backend (dovecot, courier) or peer:HOME_NODE */
  backend: string | null;
  readonly since: number;
}

export interface ConnLimits {
  /** preauth connections per untrusted address */
  readonly perIp: number;
  /** preauth connections and held sessions, node-wide */
  readonly total: number;
}

export type OpenResult = { admitted: true; evicted: ConnRecord[] } | { admitted: false; why: 'max_connections' | 'duplicate' };
export type LoginResult = { ok: true } | { ok: false; why: 'userip'; count: number } | { ok: false; why: 'gone' };

export interface Counts {
  preauth: number;
  sessions: number;
  held: number;
  penalties: number;
}

const PENALTY_TABLE_MAX = 100_000;

export class AnvilState {
  // Records are reached through their owner and held in the sets below as themselves: no key
  // string per record (a handed-off session's record lives as long as the session: idle memory).
  private readonly owners = new Map<number, Map<string, ConnRecord>>();
  private recordCount = 0;
  /** preauth records of untrusted addresses, by address, oldest first (Set keeps insertion order) */
  private readonly preauthByIp = new Map<string, Set<ConnRecord>>();
  /** every preauth record, oldest first */
  private readonly preauthAll = new Set<ConnRecord>();
  /** sessions per user, per client address */
  private readonly userIp = new Map<string, Map<string, number>>();
  private heldSessions = 0;
  private readonly penalties = new Map<string, { count: number; last: number }>();

  private get(owner: number, conn: string): ConnRecord | undefined {
    return this.owners.get(owner)?.get(conn);
  }

  /** Admit a new connection, evicting the oldest unauthenticated one where a limit is full. */
  open(owner: number, pid: number, conn: string, c: { ip: string; proto: string; trusted: boolean }, limits: ConnLimits, now: number): OpenResult {
    if (this.get(owner, conn)) return { admitted: false, why: 'duplicate' };
    const evicted: ConnRecord[] = [];
    if (!c.trusted) {
      const mine = this.preauthByIp.get(c.ip);
      while (mine && mine.size >= limits.perIp && mine.size > 0) {
        const oldest = mine.values().next().value as ConnRecord;
        evicted.push(this.remove(oldest));
      }
    }
    while (this.total() >= limits.total) {
      const oldest = this.preauthAll.values().next();
      if (oldest.done === true) break;
      evicted.push(this.remove(oldest.value));
    }
    if (this.total() >= limits.total) return { admitted: false, why: 'max_connections' };
    this.insert({ owner, pid, conn, ip: c.ip, proto: c.proto, trusted: c.trusted, state: 'preauth', held: true, user: null, session: null, backend: null, since: now });
    return { admitted: true, evicted };
  }

  /** Put back a record an owner held while the service was unreachable (no limits applied). */
  restore(r: ConnRecord): void {
    const old = this.get(r.owner, r.conn);
    if (old) this.remove(old);
    this.insert({ ...r });
  }

  /** Logged in: check and take a user+IP slot; the record stops counting per IP. */
  login(owner: number, conn: string, user: string, session: string, maxUserIp: number): LoginResult {
    const r = this.get(owner, conn);
    if (!r) return { ok: false, why: 'gone' };
    if (r.state === 'session') this.logout(owner, conn);
    const n = this.userIp.get(user)?.get(r.ip) ?? 0;
    if (n >= maxUserIp) return { ok: false, why: 'userip', count: n };
    this.leavePreauth(r);
    r.user = user;
    r.session = session;
    this.enterSession(r);
    return { ok: true };
  }

  /** A login that did not lead to a session (backend failure): back to preauth. */
  logout(owner: number, conn: string): void {
    const r = this.get(owner, conn);
    if (!r || r.state !== 'session') return;
    this.leaveSession(r);
    r.user = null;
    r.session = null;
    r.backend = null;
    this.enterPreauth(r);
  }

  /** The session runs: where it went (shown by `pigeon who`). */
  setBackend(owner: number, conn: string, backend: string): void {
    const r = this.get(owner, conn);
    if (r && r.state === 'session') r.backend = backend;
  }

  /**
   * `pigeon kick`: remove the sessions of `user` (from `ip` only, if given) and return them; the
   * caller tells each record's owner to end it.
   */
  kick(user: string, ip: string | null): ConnRecord[] {
    const out: ConnRecord[] = [];
    for (const records of this.owners.values()) for (const r of records.values()) if (r.state === 'session' && r.user === user && (ip === null || r.ip === ip)) out.push(r);
    for (const r of out) this.remove(r);
    return out;
  }

  /** Drop the records of owners whose process is gone (`alive(pid)` false); returns how many. */
  dropDead(alive: (pid: number) => boolean): number {
    const dead = new Set<number>();
    const checked = new Map<number, boolean>();
    for (const r of this.records()) {
      let ok = checked.get(r.pid);
      if (ok === undefined) {
        ok = alive(r.pid);
        checked.set(r.pid, ok);
      }
      if (!ok) dead.add(r.owner);
    }
    let n = 0;
    for (const o of dead) n += this.dropOwner(o);
    return n;
  }

  /** Whether the proxy still holds the client's socket (false: handed to the backend). */
  setHeld(owner: number, conn: string, held: boolean): void {
    const r = this.get(owner, conn);
    if (!r || r.held === held) return;
    if (r.state === 'session') this.heldSessions += held ? 1 : -1;
    r.held = held;
  }

  close(owner: number, conn: string): void {
    const r = this.get(owner, conn);
    if (r) this.remove(r);
  }

  /** The owner went away: all its records go. */
  dropOwner(owner: number): number {
    const records = this.owners.get(owner);
    if (!records) return 0;
    const all = [...records.values()];
    for (const r of all) this.remove(r);
    return all.length;
  }

  list(filter: { user?: string } = {}): ConnRecord[] {
    const out: ConnRecord[] = [];
    for (const r of this.records()) if (filter.user === undefined || r.user === filter.user) out.push({ ...r });
    return out;
  }

  counts(now: number): Counts {
    return { preauth: this.preauthAll.size, sessions: this.recordCount - this.preauthAll.size, held: this.heldSessions, penalties: this.livePenalties(now) };
  }

  /** Connections counted against limits.max_connections. */
  total(): number {
    return this.preauthAll.size + this.heldSessions;
  }

  connections(): number {
    return this.recordCount;
  }

  private *records(): Generator<ConnRecord> {
    for (const records of this.owners.values()) yield* records.values();
  }

  // ---- penalties

  penaltyGet(key: string, now: number): { count: number; ageMs: number } {
    const e = this.penalties.get(key);
    if (!e || now - e.last >= AUTH_PENALTY_RESET_MS) return { count: 0, ageMs: 0 };
    return { count: e.count, ageMs: now - e.last };
  }

  penaltyFail(key: string, now: number): number {
    const e = this.penalties.get(key);
    const count = e && now - e.last < AUTH_PENALTY_RESET_MS ? e.count + 1 : 1;
    this.penalties.delete(key); // re-insert: the table stays ordered by last failure
    this.penalties.set(key, { count, last: now });
    if (this.penalties.size > PENALTY_TABLE_MAX) this.prunePenalties(now);
    return count;
  }

  penaltyClear(key: string): void {
    this.penalties.delete(key);
  }

  /** Penalties not yet forgotten (the service stays up while any is). */
  livePenalties(now: number): number {
    this.prunePenalties(now);
    return this.penalties.size;
  }

  private prunePenalties(now: number): void {
    // ordered by last failure: stop at the first one still live
    for (const [k, v] of this.penalties) {
      if (now - v.last < AUTH_PENALTY_RESET_MS) break;
      this.penalties.delete(k);
    }
  }

  // ---- bookkeeping

  private insert(r: ConnRecord): void {
    let records = this.owners.get(r.owner);
    if (!records) {
      records = new Map();
      this.owners.set(r.owner, records);
    }
    records.set(r.conn, r);
    this.recordCount++;
    if (r.state === 'preauth') this.enterPreauth(r);
    else this.enterSession(r);
  }

  private remove(r: ConnRecord): ConnRecord {
    const records = this.owners.get(r.owner);
    if (records?.get(r.conn) !== r) throw new Error(`anvil: no record ${r.owner}/${r.conn}`);
    if (r.state === 'preauth') this.leavePreauth(r);
    else this.leaveSession(r);
    records.delete(r.conn);
    if (records.size === 0) this.owners.delete(r.owner);
    this.recordCount--;
    return r;
  }

  private enterPreauth(r: ConnRecord): void {
    r.state = 'preauth';
    this.preauthAll.add(r);
    if (r.trusted) return;
    let s = this.preauthByIp.get(r.ip);
    if (!s) {
      s = new Set();
      this.preauthByIp.set(r.ip, s);
    }
    s.add(r);
  }

  private leavePreauth(r: ConnRecord): void {
    this.preauthAll.delete(r);
    const s = this.preauthByIp.get(r.ip);
    s?.delete(r);
    if (s && s.size === 0) this.preauthByIp.delete(r.ip);
  }

  private enterSession(r: ConnRecord): void {
    r.state = 'session';
    if (r.held) this.heldSessions++;
    if (r.user !== null) {
      let ips = this.userIp.get(r.user);
      if (!ips) {
        ips = new Map();
        this.userIp.set(r.user, ips);
      }
      ips.set(r.ip, (ips.get(r.ip) ?? 0) + 1);
    }
  }

  private leaveSession(r: ConnRecord): void {
    if (r.held) this.heldSessions--;
    if (r.user !== null) {
      const ips = this.userIp.get(r.user);
      const n = (ips?.get(r.ip) ?? 1) - 1;
      if (n > 0) ips?.set(r.ip, n);
      else {
        ips?.delete(r.ip);
        if (ips && ips.size === 0) this.userIp.delete(r.user);
      }
    }
  }
}
