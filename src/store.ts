/**
 * NAME        src/store — domains, users, settings and nodes in the configuration database
 * DESCRIPTION Every write is one IMMEDIATE transaction (no half-written state, no upgrade deadlock
 *             between two writers). Settings reference domains and users by id, so renaming keeps
 *             every setting and the allocation (the mailbox stays where it is).
 *             `lookup(address)` is the one read per login or delivery: the user row and every
 *             setting row that applies to it, in one statement.
 *             better-sqlite3 waits for a lock synchronously (busy timeout 5 s), stalling every
 *             session of the process: `tryNow` does not wait, `within` / `writableWithin` wait
 *             between tries without blocking (the proxy's login path, up to one busy timeout).
 */
import type { DB } from './db.js';
import { mapDbError, BUSY_TIMEOUT_MS } from './db.js';
import { AppError } from './errors.js';
import { normaliseAddress, normaliseDomain } from './address.js';
import type { Json, Scope } from './settings.js';
import type { Flag, SettingRow } from './resolve.js';
import { count } from './metrics.js';

export interface Allocation {
  readonly format: 'maildir' | 'mbox';
  readonly path: string;
  readonly node?: string;
}

export interface UserRecord {
  readonly id: number;
  readonly address: string;
  readonly domain: string;
  readonly domainId: number;
  readonly password: string | null;
  readonly state: 'active' | 'disabled';
  readonly home: string | null;
  readonly allocation: Allocation | null;
  readonly version: number;
  readonly created: string;
  /** `pigeon user move` in progress: the node the mailbox is being copied to */
  readonly movingTo: string | null;
}

export interface ScopeRef {
  readonly scope: Scope;
  readonly name: string | null; // domain name or user address; null for global
}

interface UserRow {
  id: number;
  address: string;
  domain: string;
  domain_id: number;
  password: string | null;
  state: 'active' | 'disabled';
  home: string | null;
  allocation: string | null;
  version: number;
  created: string;
  moving_to: string | null;
}

interface SettingDbRow {
  scope: Scope;
  module: string;
  key: string;
  value: string;
  flags: string;
}

function parseFlags(s: string): Flag[] {
  return s.split(',').filter((f): f is Flag => f === 'override' || f === 'ignore');
}

function toUser(r: UserRow): UserRecord {
  let allocation: Allocation | null = null;
  if (r.allocation) {
    const a: unknown = JSON.parse(r.allocation);
    if (typeof a === 'object' && a !== null && 'format' in a && 'path' in a) allocation = a as Allocation;
  }
  return {
    id: r.id,
    address: r.address,
    domain: r.domain,
    domainId: r.domain_id,
    password: r.password,
    state: r.state,
    home: r.home,
    allocation,
    version: r.version,
    created: r.created,
    movingTo: r.moving_to ?? null,
  };
}

const USER_SELECT = `SELECT u.id, u.address, d.name AS domain, u.domain_id, u.password, u.state, u.home,
  u.allocation, u.version, u.created, u.moving_to FROM users u JOIN domains d ON d.id = u.domain_id`;

export class Store {
  readonly db: DB;
  readonly file: string;
  private readonly stmts;

  constructor(db: DB, file: string) {
    this.db = db;
    this.file = file;
    this.stmts = {
      user: db.prepare<[string], UserRow>(`${USER_SELECT} WHERE u.address = ?`),
      // the one read per login/delivery: the user and every setting row that applies to it
      lookup: db.prepare<[string], UserRow & { s_scope: Scope | null; s_module: string | null; s_key: string | null; s_value: string | null; s_flags: string | null }>(
        `WITH u AS (${USER_SELECT} WHERE u.address = ?)
         SELECT u.*, s.scope AS s_scope, s.module AS s_module, s.key AS s_key, s.value AS s_value, s.flags AS s_flags
           FROM u LEFT JOIN settings s ON (s.scope = 'global' AND s.scope_id = 0)
                                       OR (s.scope = 'domain' AND s.scope_id = u.domain_id)
                                       OR (s.scope = 'user' AND s.scope_id = u.id)`,
      ),
      domainSettings: db.prepare<[number], SettingDbRow>(
        `SELECT scope, module, key, value, flags FROM settings
          WHERE (scope = 'global' AND scope_id = 0) OR (scope = 'domain' AND scope_id = ?)`,
      ),
      domain: db.prepare<[string], { id: number; name: string }>('SELECT id, name FROM domains WHERE name = ?'),
    };
  }

  /** Run `fn` in one IMMEDIATE transaction; SQLite errors become AppErrors. */
  write<T>(fn: () => T): T {
    try {
      return this.db.transaction(fn).immediate();
    } catch (e) {
      throw mapDbError(e, this.file);
    }
  }

  read<T>(fn: () => T): T {
    try {
      return this.db.transaction(fn).deferred();
    } catch (e) {
      throw mapDbError(e, this.file);
    }
  }

  /**
   * Run `fn` without waiting for a lock (busy timeout 0): DB_LOCKED at once instead of blocking
   * the whole process for the busy timeout (better-sqlite3 waits synchronously). For periodic
   * work that can simply try again, and as the step of `within`.
   */
  tryNow<T>(fn: () => T): T {
    this.db.pragma('busy_timeout = 0');
    try {
      return fn();
    } catch (e) {
      throw mapDbError(e, this.file);
    } finally {
      this.db.pragma(`busy_timeout = ${BUSY_TIMEOUT_MS}`);
    }
  }

  /**
   * `fn` as soon as the database lets it run, retried until `deadline` (epoch ms) while it is
   * locked, waiting between tries without blocking the event loop: other sessions of this
   * process go on meanwhile. Throws DB_LOCKED after the deadline.
   */
  async within<T>(fn: () => T, deadline: number): Promise<T> {
    for (let pause = 5; ; pause = Math.min(pause * 2, 50)) {
      try {
        return this.tryNow(fn);
      } catch (e) {
        if (!(e instanceof AppError) || e.code !== 'DB_LOCKED' || Date.now() + pause > deadline) throw e;
      }
      await new Promise((r) => setTimeout(r, pause));
    }
  }

  /**
   * Wait (without blocking the event loop) until a write transaction could start, up to
   * `deadline`; false when the database stayed locked. Taken and released at once: the write
   * that follows then rarely waits at all.
   */
  async writableWithin(deadline: number): Promise<boolean> {
    try {
      await this.within(() => {
        this.db.exec('BEGIN IMMEDIATE');
        this.db.exec('ROLLBACK');
      }, deadline);
      return true;
    } catch (e) {
      if (e instanceof AppError && e.code === 'DB_LOCKED') return false;
      throw e;
    }
  }

  close(): void {
    this.db.close();
  }

  // ---- domains -------------------------------------------------------------------------

  domainId(name: string): number {
    const d = this.stmts.domain.get(normaliseDomain(name));
    if (!d) throw new AppError('NO_SUCH_DOMAIN', `no such domain: ${normaliseDomain(name)}`);
    return d.id;
  }

  addDomain(name: string): string {
    const n = normaliseDomain(name);
    return this.write(() => {
      if (this.stmts.domain.get(n)) throw new AppError('DUPLICATE', `domain ${n} already exists`);
      this.db.prepare('INSERT INTO domains (name) VALUES (?)').run(n);
      return n;
    });
  }

  listDomains(): { name: string; users: number; created: string }[] {
    return this.read(() =>
      this.db
        .prepare<[], { name: string; users: number; created: string }>(
          'SELECT d.name, count(u.id) AS users, d.created FROM domains d LEFT JOIN users u ON u.domain_id = d.id GROUP BY d.id ORDER BY d.name',
        )
        .all(),
    );
  }

  /** Rename a domain: every user address moves with it; settings and mailboxes stay attached. */
  renameDomain(from: string, to: string): { users: number } {
    const a = normaliseDomain(from);
    const b = normaliseDomain(to);
    return this.write(() => {
      const id = this.domainId(a);
      if (this.stmts.domain.get(b)) throw new AppError('DUPLICATE', `domain ${b} already exists`);
      this.db.prepare('UPDATE domains SET name = ? WHERE id = ?').run(b, id);
      const users = this.db.prepare<[number], { id: number; address: string }>('SELECT id, address FROM users WHERE domain_id = ?').all(id);
      const upd = this.db.prepare('UPDATE users SET address = ?, version = version + 1 WHERE id = ?');
      for (const u of users) upd.run(`${u.address.slice(0, u.address.lastIndexOf('@'))}@${b}`, u.id);
      return { users: users.length };
    });
  }

  /** Delete a domain and its settings. Refused while it has users, so no mailbox is orphaned silently. */
  delDomain(name: string): void {
    const n = normaliseDomain(name);
    this.write(() => {
      const id = this.domainId(n);
      const c = this.db.prepare<[number], { c: number }>('SELECT count(*) AS c FROM users WHERE domain_id = ?').get(id);
      if (c && c.c > 0) {
        throw new AppError('DOMAIN_NOT_EMPTY', `domain ${n} still has ${c.c} user(s); delete or move them first ("pigeon user list ${n}")`);
      }
      this.db.prepare("DELETE FROM settings WHERE scope = 'domain' AND scope_id = ?").run(id);
      this.db.prepare('DELETE FROM domains WHERE id = ?').run(id);
    });
  }

  // ---- users ---------------------------------------------------------------------------

  getUser(address: string): UserRecord | null {
    const a = normaliseAddress(address).address;
    count('pigeon_db_user_reads_total');
    try {
      const r = this.stmts.user.get(a);
      return r ? toUser(r) : null;
    } catch (e) {
      throw mapDbError(e, this.file);
    }
  }

  mustUser(address: string): UserRecord {
    const u = this.getUser(address);
    if (!u) throw new AppError('NO_SUCH_USER', `no such user: ${normaliseAddress(address).address}`);
    return u;
  }

  addUser(address: string, password: string | null, home: string | null): UserRecord {
    const a = normaliseAddress(address);
    return this.write(() => {
      const d = this.stmts.domain.get(a.domain);
      if (!d) throw new AppError('NO_SUCH_DOMAIN', `domain ${a.domain} does not exist; add it first with "pigeon domain add ${a.domain}"`);
      if (this.stmts.user.get(a.address)) throw new AppError('DUPLICATE', `user ${a.address} already exists`);
      this.db.prepare('INSERT INTO users (address, domain_id, password, home) VALUES (?, ?, ?, ?)').run(a.address, d.id, password, home);
      return this.mustUser(a.address);
    });
  }

  setPassword(address: string, hash: string): void {
    this.write(() => {
      const u = this.mustUser(address);
      this.db.prepare('UPDATE users SET password = ?, version = version + 1 WHERE id = ?').run(hash, u.id);
    });
  }

  setState(address: string, state: 'active' | 'disabled'): void {
    this.write(() => {
      const u = this.mustUser(address);
      this.db.prepare('UPDATE users SET state = ?, version = version + 1 WHERE id = ?').run(state, u.id);
    });
  }

  listUsers(domain?: string): UserRecord[] {
    return this.read(() => {
      if (domain === undefined) return this.db.prepare<[], UserRow>(`${USER_SELECT} ORDER BY d.name, u.address`).all().map(toUser);
      const id = this.domainId(domain);
      return this.db.prepare<[number], UserRow>(`${USER_SELECT} WHERE u.domain_id = ? ORDER BY u.address`).all(id).map(toUser);
    });
  }

  /** Rename a user; the allocation (mailbox path) and all settings stay with the user. */
  renameUser(from: string, to: string): UserRecord {
    const b = normaliseAddress(to);
    return this.write(() => {
      const u = this.mustUser(from);
      const d = this.stmts.domain.get(b.domain);
      if (!d) throw new AppError('NO_SUCH_DOMAIN', `domain ${b.domain} does not exist; add it first with "pigeon domain add ${b.domain}"`);
      if (this.stmts.user.get(b.address)) throw new AppError('DUPLICATE', `user ${b.address} already exists`);
      this.db.prepare('UPDATE users SET address = ?, domain_id = ?, version = version + 1 WHERE id = ?').run(b.address, d.id, u.id);
      return this.mustUser(b.address);
    });
  }

  /** Delete a user and their settings; returns the record so the caller can say where the mailbox is. */
  delUser(address: string): UserRecord {
    return this.write(() => {
      const u = this.mustUser(address);
      this.db.prepare("DELETE FROM settings WHERE scope = 'user' AND scope_id = ?").run(u.id);
      this.db.prepare('DELETE FROM users WHERE id = ?').run(u.id);
      return u;
    });
  }

  /**
   * Compare-and-set of a user's home and allocation: succeeds only if the row still has
   * `expectedVersion` (two nodes racing to allocate the same new user: one wins, one re-reads).
   */
  casAllocation(id: number, expectedVersion: number, home: string | null, allocation: Allocation | null): boolean {
    return this.write(() => {
      const r = this.db
        .prepare('UPDATE users SET home = ?, allocation = ?, version = version + 1 WHERE id = ? AND version = ?')
        .run(home, allocation === null ? null : JSON.stringify(allocation), id, expectedVersion);
      return r.changes === 1;
    });
  }

  /** Mark (or clear) a move in progress; compare-and-set on the version like casAllocation. */
  casMoving(id: number, expectedVersion: number, to: string | null): boolean {
    return this.write(() => this.db.prepare('UPDATE users SET moving_to = ?, version = version + 1 WHERE id = ? AND version = ?').run(to, id, expectedVersion).changes === 1);
  }

  /** The end of a move: new home and allocation, move mark cleared, in one transaction. */
  casMoved(id: number, expectedVersion: number, home: string, allocation: Allocation): boolean {
    return this.write(
      () =>
        this.db
          .prepare('UPDATE users SET home = ?, allocation = ?, moving_to = NULL, version = version + 1 WHERE id = ? AND version = ?')
          .run(home, JSON.stringify(allocation), id, expectedVersion).changes === 1,
    );
  }

  // ---- settings ------------------------------------------------------------------------

  private scopeId(ref: ScopeRef): number {
    if (ref.scope === 'global') return 0;
    if (ref.name === null) throw new AppError('USAGE', `${ref.scope} scope needs a name`);
    return ref.scope === 'domain' ? this.domainId(ref.name) : this.mustUser(ref.name).id;
  }

  setSetting(ref: ScopeRef, module: string, key: string, value: Json, flags: readonly Flag[]): void {
    this.write(() => {
      const id = this.scopeId(ref);
      this.db
        .prepare(
          `INSERT INTO settings (scope, scope_id, module, key, value, flags) VALUES (?, ?, ?, ?, ?, ?)
           ON CONFLICT (scope, scope_id, module, key) DO UPDATE SET value = excluded.value, flags = excluded.flags`,
        )
        .run(ref.scope, id, module, key, JSON.stringify(value), flags.join(','));
    });
  }

  unsetSetting(ref: ScopeRef, module: string, key: string): boolean {
    return this.write(() => {
      const id = this.scopeId(ref);
      return this.db.prepare('DELETE FROM settings WHERE scope = ? AND scope_id = ? AND module = ? AND key = ?').run(ref.scope, id, module, key).changes > 0;
    });
  }

  /** Rows that apply at a scope: global, plus the domain, plus the user (as a user would see). */
  rowsFor(ref: ScopeRef): SettingRow[] {
    return this.read(() => {
      if (ref.scope === 'user') {
        const l = this.lookup(ref.name ?? '');
        if (!l) throw new AppError('NO_SUCH_USER', `no such user: ${ref.name ?? ''}`);
        return l.rows;
      }
      const id = ref.scope === 'domain' ? this.scopeId(ref) : -1;
      return this.stmts.domainSettings.all(id).map(toSetting);
    });
  }

  /** The one read per login or delivery: the user and every setting row that applies. */
  lookup(address: string): { user: UserRecord; rows: SettingRow[] } | null {
    let rs;
    count('pigeon_db_user_reads_total');
    try {
      rs = this.stmts.lookup.all(address);
    } catch (e) {
      throw mapDbError(e, this.file);
    }
    const first = rs[0];
    if (!first) return null;
    const rows: SettingRow[] = [];
    for (const r of rs) {
      if (r.s_scope === null || r.s_module === null || r.s_key === null || r.s_value === null) continue;
      rows.push(toSetting({ scope: r.s_scope, module: r.s_module, key: r.s_key, value: r.s_value, flags: r.s_flags ?? '' }));
    }
    return { user: toUser(first), rows };
  }
}

function toSetting(r: SettingDbRow): SettingRow {
  return { scope: r.scope, module: r.module, key: r.key, value: JSON.parse(r.value) as Json, flags: parseFlags(r.flags) };
}
