/**
 * NAME        src/store/sqlite — the embedded configuration database (SQLite, better-sqlite3, WAL)
 * SYNOPSIS    openStore('sqlite:/etc/pigeon/pigeon.db') (src/store.ts) → SqliteStore
 * DESCRIPTION The `Store` contract on one SQLite file that several processes (CLI, proxy
 *             sessions, deliveries, other nodes on the same host) share in WAL mode. Migrations
 *             are versioned by `PRAGMA user_version` and run on open, one transaction each.
 *             Every write is one IMMEDIATE transaction (the write lock from its first statement:
 *             no upgrade deadlock between two writers, no half-written state).
 *             better-sqlite3 is synchronous and would wait for a lock by blocking the whole
 *             process, so the connection's busy timeout is 0: an operation that finds the database
 *             locked is tried again after a pause (5 ms, doubling to 50 ms) without blocking the
 *             event loop, until one busy timeout (BUSY_TIMEOUT_MS) has passed or the deadline of a
 *             `withDeadline` view; then DB_LOCKED (75).
 *             `onChange`: SQLite has no notifications, so while anyone listens the store polls
 *             every second (the connection's state, `data_version` and `total_changes()`; then
 *             the registry and every user row's version only when something was committed) and
 *             reports what changed. `lookup` keeps its last answers under the same state.
 * DIAGNOSTICS DB_LOCKED (75, retry later); DB_READONLY / DB_MISSING / DB_SCHEMA (78, fix the
 *             configuration); NO_SUCH_USER, NO_SUCH_DOMAIN, DUPLICATE, DOMAIN_NOT_EMPTY,
 *             NO_SUCH_NODE, NODE_CONFLICT, NODE_REMOVED, NODE_BUSY.
 * SECURITY    Values reach SQL only as bound parameters; `load` accepts only known column names.
 */
import type BetterSqlite3 from 'better-sqlite3';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { createRequire } from 'node:module';
import { AppError } from '../errors.js';
import { deepFreeze } from '../freeze.js';
import { normaliseAddress, normaliseDomain } from '../address.js';
import { countDbError, dbUserReads } from '../metrics.js';
import type { Json, Flag, SettingRow, NodeRow, NodeState, SelfRegistration } from '../store.js';
import { toUser, toSetting, toNode, toLookup, reRegistration, type UserRow, type SettingDbRow, type NodeDbRow, type LookupRow } from './rows.js';
import { BUSY_TIMEOUT_MS, type Allocation, type OpenOptions, type SchemaStatus, type ServerInfo, type ScopeRef, type Store, type StoreChange, type TableDump, type UserRecord } from '../store.js';

// better-sqlite3 is CommonJS: require() is ≈ 8 ms of CPU cheaper than node 20's ESM import of it
// (perf stat task-clock), paid by every process that opens the database, each `pigeon deliver`
const Database = createRequire(import.meta.url)('better-sqlite3') as typeof BetterSqlite3;
type DB = BetterSqlite3.Database;

let addonPath: string | null | undefined;
/**
 * better-sqlite3's native addon by its path, where npm builds or installs it: without it the
 * package looks for it itself (the `bindings` package: a dozen candidate paths stat'ed, and two
 * more files loaded) in every process that opens a database. null: not there (built elsewhere),
 * the package's own lookup.
 */
function nativeBinding(): string | null {
  if (addonPath === undefined) {
    const pkg = createRequire(import.meta.url).resolve('better-sqlite3/package.json');
    const file = join(dirname(pkg), 'build', 'Release', 'better_sqlite3.node');
    addonPath = existsSync(file) ? file : null;
  }
  return addonPath;
}

const MIGRATIONS: readonly string[] = [
  // 1: the initial schema
  `CREATE TABLE domains (
     id INTEGER PRIMARY KEY,
     name TEXT NOT NULL UNIQUE,
     created TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ','now'))
   );
   CREATE TABLE users (
     id INTEGER PRIMARY KEY,
     address TEXT NOT NULL UNIQUE,
     domain_id INTEGER NOT NULL REFERENCES domains(id),
     password TEXT,
     state TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active','disabled')),
     home TEXT,
     allocation TEXT,
     version INTEGER NOT NULL DEFAULT 0,
     created TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ','now'))
   );
   CREATE INDEX users_domain ON users(domain_id);
   CREATE TABLE settings (
     scope TEXT NOT NULL CHECK (scope IN ('global','domain','user')),
     scope_id INTEGER NOT NULL,
     module TEXT NOT NULL,
     key TEXT NOT NULL,
     value TEXT NOT NULL,
     flags TEXT NOT NULL DEFAULT '',
     PRIMARY KEY (scope, scope_id, module, key)
   ) WITHOUT ROWID;
   CREATE TABLE nodes (
     name TEXT PRIMARY KEY,
     peer_address TEXT,
     fingerprint TEXT,
     state TEXT NOT NULL DEFAULT 'active',
     last_seen TEXT
   );`,
  // 2: the cluster: certificate roll-over and expiry per node, revoked certificates, user moves
  `ALTER TABLE nodes ADD COLUMN next_fingerprint TEXT;
   ALTER TABLE nodes ADD COLUMN cert_expires TEXT;
   CREATE TABLE revoked (
     fingerprint TEXT PRIMARY KEY,
     node TEXT NOT NULL,
     at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ','now'))
   ) WITHOUT ROWID;
   ALTER TABLE users ADD COLUMN moving_to TEXT;`,
];

export const SCHEMA_VERSION = MIGRATIONS.length;
/** the oldest schema this code runs on (it reads users.moving_to and the revoked table) */
const MIN_USABLE_VERSION = 2;

/** Columns per table, in dump order (`load` refuses any other name). */
const TABLES: Record<TableDump['table'], readonly string[]> = {
  domains: ['id', 'name', 'created'],
  users: ['id', 'address', 'domain_id', 'password', 'state', 'home', 'allocation', 'version', 'created', 'moving_to'],
  settings: ['scope', 'scope_id', 'module', 'key', 'value', 'flags'],
  nodes: ['name', 'peer_address', 'fingerprint', 'next_fingerprint', 'state', 'last_seen', 'cert_expires'],
  revoked: ['fingerprint', 'node', 'at'],
};
const TABLE_ORDER = ['domains', 'users', 'settings', 'nodes', 'revoked'] as const;

const POLL_MS = 1000;
/** Lookups a connection keeps (the oldest goes first): one entry is a user and its setting rows. */
const LOOKUPS_KEPT = 4096;

type Lookup = { user: UserRecord; rows: SettingRow[] };

const NOW = "strftime('%Y-%m-%dT%H:%M:%SZ','now')";

function sqliteCode(e: unknown): string {
  return typeof e === 'object' && e !== null && 'code' in e && typeof e.code === 'string' ? e.code : '';
}

/** Translate a SQLite error into the AppError an admin can act on. */
function mapDbError(e: unknown, file: string): unknown {
  const code = sqliteCode(e);
  if (code.startsWith('SQLITE_BUSY') || code.startsWith('SQLITE_LOCKED')) {
    return new AppError('DB_LOCKED', `database ${file} is locked by another process; try again`, { cause: e });
  }
  if (code.startsWith('SQLITE_READONLY') || code === 'SQLITE_PERM' || code === 'SQLITE_AUTH') {
    return new AppError('DB_READONLY', `database ${file} is read-only (check the file's and its directory's permissions)`, { cause: e });
  }
  if (code.startsWith('SQLITE_CANTOPEN')) {
    return new AppError('DB_MISSING', `database ${file} cannot be opened (missing file or directory?)`, { cause: e });
  }
  if (code === 'SQLITE_NOTADB' || code === 'SQLITE_CORRUPT') {
    return new AppError('DB_SCHEMA', `database ${file} is not a PigeonDeliver SQLite database`, { cause: e });
  }
  return e;
}

function isLocked(e: unknown): boolean {
  return e instanceof AppError && e.code === 'DB_LOCKED';
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/**
 * `fn` as soon as the database lets it run: tried at once, and while it finds the database locked
 * tried again after a pause that does not block the event loop, until `deadline` (epoch ms; null:
 * one busy timeout from the first refusal). Then DB_LOCKED.
 */
async function retrying<T>(file: string, deadline: number | null, fn: () => T): Promise<T> {
  let until = deadline;
  for (let pause = 5; ; pause = Math.min(pause * 2, 50)) {
    try {
      return fn();
    } catch (e) {
      const m = mapDbError(e, file);
      until ??= Date.now() + BUSY_TIMEOUT_MS;
      if (!isLocked(m) || Date.now() + pause > until) {
        if (sqliteCode(e) !== '') countDbError(m);
        throw m;
      }
    }
    await sleep(pause);
  }
}

const USER_SELECT = `SELECT u.id, u.address, d.name AS domain, u.domain_id, u.password, u.state, u.home,
  u.allocation, u.version, u.created, u.moving_to FROM users u JOIN domains d ON d.id = u.domain_id`;

/** The connection and its prepared statements, shared by a store and its deadline views. */
class Conn {
  readonly db: DB;
  readonly file: string;
  readonly listeners = new Set<(c: StoreChange) => void>();
  poll: NodeJS.Timeout | null = null;
  readonly stmts;
  /**
   * The last lookups (address → user and setting rows, frozen), each with the database's state
   * (`state()`) when it was read. A lookup whose entry has the state the database has now is
   * answered from here: nothing can have changed since.
   */
  readonly lookups = new Map<string, { readonly at: string; readonly found: Lookup }>();

  constructor(db: DB, file: string) {
    this.db = db;
    this.file = file;
    this.stmts = {
      user: db.prepare<[string], UserRow>(`${USER_SELECT} WHERE u.address = ?`),
      // the one read per login/delivery: the user and every setting row that applies to it
      lookup: db.prepare<[string], LookupRow>(
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
      node: db.prepare<[string], NodeDbRow>('SELECT * FROM nodes WHERE name = ?'),
      nodes: db.prepare<[], NodeDbRow>('SELECT * FROM nodes ORDER BY name'),
      revoked: db.prepare<[], { fingerprint: string }>('SELECT fingerprint FROM revoked ORDER BY fingerprint'),
      moving: db.prepare<[], { address: string; moving_to: string }>('SELECT address, moving_to FROM users WHERE moving_to IS NOT NULL ORDER BY address'),
      // every user's row version (bumped by every change of the row): what onChange compares
      userVersions: db.prepare<[], { id: number; address: string; version: number }>('SELECT id, address, version FROM users'),
      state: db.prepare<[], [number, number]>('SELECT data_version, total_changes() FROM pragma_data_version()').raw(true),
    };
  }

  /**
   * The database's state as this connection sees it: `data_version` (moves with every commit by
   * any other connection, of this process or another) and `total_changes()` (rows changed through
   * this one). Equal strings: nothing was committed in between. 3.7 µs in a tight loop, ≈ 24 µs
   * per call in a busy serve worker (CPU profile of LMTP deliveries).
   */
  state(): string {
    const [version, changes] = this.stmts.state.get() ?? [0, 0];
    return `${version}/${changes}`;
  }
}

/** Open (and create, with `create`) a SQLite file, migrated to the current schema. */
export async function openSqlite(file: string, opts: OpenOptions = {}): Promise<SqliteStore> {
  if (!opts.create && !existsSync(file)) {
    throw new AppError('DB_MISSING', `database ${file} does not exist (create an instance with "pigeon init")`);
  }
  let db: DB;
  try {
    // busy timeout 0: a lock is waited for between tries (retrying), never inside SQLite
    const addon = nativeBinding();
    db = new Database(file, { fileMustExist: !opts.create, timeout: 0, ...(addon !== null ? { nativeBinding: addon } : {}) });
  } catch (e) {
    throw mapDbError(e, file);
  }
  try {
    db.pragma('busy_timeout = 0');
    await retrying(file, null, () => db.pragma('journal_mode = WAL'));
    db.pragma('synchronous = NORMAL');
    db.pragma('foreign_keys = ON');
    const version = await retrying(file, null, () => userVersion(db, file));
    if (version > SCHEMA_VERSION) {
      throw new AppError('DB_SCHEMA', `database ${file} has schema version ${version}, newer than this pigeon (${SCHEMA_VERSION}); upgrade pigeon`);
    }
    if (version < SCHEMA_VERSION) await migrateDb(db, file, version);
    return new SqliteStore(new Conn(db, file), null);
  } catch (e) {
    db.close();
    throw mapDbError(e, file);
  }
}

function userVersion(db: DB, file: string): number {
  const v = db.pragma('user_version', { simple: true });
  if (typeof v !== 'number') throw new AppError('DB_SCHEMA', `database ${file}: cannot read schema version`);
  return v;
}

async function migrateDb(db: DB, file: string, from: number): Promise<void> {
  for (let v = from; v < MIGRATIONS.length; v++) {
    const sql = MIGRATIONS[v];
    if (sql === undefined) break;
    await retrying(file, null, () =>
      db
        .transaction(() => {
          // re-check under the write lock: another process may have migrated meanwhile
          if (userVersion(db, file) > v) return;
          db.exec(sql);
          db.pragma(`user_version = ${v + 1}`);
        })
        .immediate(),
    );
  }
}

export class SqliteStore implements Store {
  readonly kind = 'sqlite' as const;
  readonly userLock = null;
  private readonly c: Conn;
  private readonly deadline: number | null;

  constructor(c: Conn, deadline: number | null) {
    this.c = c;
    this.deadline = deadline;
  }

  get where(): string {
    return this.c.file;
  }

  withDeadline(deadline: number): SqliteStore {
    return new SqliteStore(this.c, deadline);
  }

  async close(): Promise<void> {
    if (this.deadline !== null) return; // a view: the connection belongs to the store it came from
    if (this.c.poll) clearInterval(this.c.poll);
    this.c.poll = null;
    this.c.listeners.clear();
    if (this.c.db.open) this.c.db.close();
  }

  /** One statement (or a read of several) without a transaction of its own. */
  private run<T>(fn: () => T): Promise<T> {
    return retrying(this.c.file, this.deadline, fn);
  }

  /** One IMMEDIATE transaction. */
  private write<T>(fn: () => T): Promise<T> {
    return retrying(this.c.file, this.deadline, () => this.c.db.transaction(fn).immediate());
  }

  /** Several reads that must agree: one deferred transaction. */
  private read<T>(fn: () => T): Promise<T> {
    return retrying(this.c.file, this.deadline, () => this.c.db.transaction(fn).deferred());
  }

  // ---- synchronous pieces, used inside one transaction ---------------------------------

  private domainIdNow(name: string): number {
    const d = this.c.stmts.domain.get(normaliseDomain(name));
    if (!d) throw new AppError('NO_SUCH_DOMAIN', `no such domain: ${normaliseDomain(name)}`);
    return d.id;
  }

  private userNow(address: string): UserRecord | null {
    const r = this.c.stmts.user.get(normaliseAddress(address).address);
    return r ? toUser(r) : null;
  }

  private mustUserNow(address: string): UserRecord {
    const u = this.userNow(address);
    if (!u) throw new AppError('NO_SUCH_USER', `no such user: ${normaliseAddress(address).address}`);
    return u;
  }

  private addUserNow(address: string, password: string | null, home: string | null): UserRecord {
    const a = normaliseAddress(address);
    const d = this.c.stmts.domain.get(a.domain);
    if (!d) throw new AppError('NO_SUCH_DOMAIN', `domain ${a.domain} does not exist; add it first with "pigeon domain add ${a.domain}"`);
    if (this.c.stmts.user.get(a.address)) throw new AppError('DUPLICATE', `user ${a.address} already exists`);
    this.c.db.prepare('INSERT INTO users (address, domain_id, password, home) VALUES (?, ?, ?, ?)').run(a.address, d.id, password, home);
    return this.mustUserNow(a.address);
  }

  private addDomainNow(n: string): string {
    if (this.c.stmts.domain.get(n)) throw new AppError('DUPLICATE', `domain ${n} already exists`);
    this.c.db.prepare('INSERT INTO domains (name) VALUES (?)').run(n);
    return n;
  }

  private scopeIdNow(ref: ScopeRef): number {
    if (ref.scope === 'global') return 0;
    if (ref.name === null) throw new AppError('USAGE', `${ref.scope} scope needs a name`);
    return ref.scope === 'domain' ? this.domainIdNow(ref.name) : this.mustUserNow(ref.name).id;
  }

  private lookupNow(address: string): Lookup | null {
    return toLookup(this.c.stmts.lookup.all(address));
  }

  // ---- domains -------------------------------------------------------------------------

  async addDomain(name: string): Promise<string> {
    const n = normaliseDomain(name);
    return this.write(() => this.addDomainNow(n));
  }

  async listDomains(): Promise<{ name: string; users: number; created: string }[]> {
    return this.run(() =>
      this.c.db
        .prepare<[], { name: string; users: number; created: string }>(
          'SELECT d.name, count(u.id) AS users, d.created FROM domains d LEFT JOIN users u ON u.domain_id = d.id GROUP BY d.id ORDER BY d.name',
        )
        .all(),
    );
  }

  /** Rename a domain: every user address moves with it; settings and mailboxes stay attached. */
  async renameDomain(from: string, to: string): Promise<{ users: number }> {
    const a = normaliseDomain(from);
    const b = normaliseDomain(to);
    return this.write(() => {
      const id = this.domainIdNow(a);
      if (this.c.stmts.domain.get(b)) throw new AppError('DUPLICATE', `domain ${b} already exists`);
      this.c.db.prepare('UPDATE domains SET name = ? WHERE id = ?').run(b, id);
      const users = this.c.db.prepare<[number], { id: number; address: string }>('SELECT id, address FROM users WHERE domain_id = ?').all(id);
      const upd = this.c.db.prepare('UPDATE users SET address = ?, version = version + 1 WHERE id = ?');
      for (const u of users) upd.run(`${u.address.slice(0, u.address.lastIndexOf('@'))}@${b}`, u.id);
      return { users: users.length };
    });
  }

  /** Delete a domain and its settings. Refused while it has users, so no mailbox is orphaned silently. */
  async delDomain(name: string): Promise<void> {
    const n = normaliseDomain(name);
    return this.write(() => {
      const id = this.domainIdNow(n);
      const c = this.c.db.prepare<[number], { c: number }>('SELECT count(*) AS c FROM users WHERE domain_id = ?').get(id);
      if (c && c.c > 0) {
        throw new AppError('DOMAIN_NOT_EMPTY', `domain ${n} still has ${c.c} user(s); delete or move them first ("pigeon user list ${n}")`);
      }
      this.c.db.prepare("DELETE FROM settings WHERE scope = 'domain' AND scope_id = ?").run(id);
      this.c.db.prepare('DELETE FROM domains WHERE id = ?').run(id);
    });
  }

  // ---- users ---------------------------------------------------------------------------

  async getUser(address: string): Promise<UserRecord | null> {
    const a = normaliseAddress(address).address;
    dbUserReads.inc();
    return this.run(() => {
      const r = this.c.stmts.user.get(a);
      return r ? toUser(r) : null;
    });
  }

  async mustUser(address: string): Promise<UserRecord> {
    const u = await this.getUser(address);
    if (!u) throw new AppError('NO_SUCH_USER', `no such user: ${normaliseAddress(address).address}`);
    return u;
  }

  async addUser(address: string, password: string | null, home: string | null): Promise<UserRecord> {
    normaliseAddress(address);
    return this.write(() => this.addUserNow(address, password, home));
  }

  async importUsers(entries: readonly { address: string; hash: string }[], createDomains: boolean): Promise<{ createdDomains: string[] }> {
    return this.write(() => {
      const createdDomains: string[] = [];
      for (const e of entries) {
        const a = normaliseAddress(e.address);
        if (!this.c.stmts.domain.get(a.domain)) {
          if (!createDomains) throw new AppError('NO_SUCH_DOMAIN', `domain ${a.domain} does not exist (add it, or use --create-domains)`);
          this.addDomainNow(a.domain);
          createdDomains.push(a.domain);
        }
        this.addUserNow(a.address, e.hash, null);
      }
      return { createdDomains };
    });
  }

  async setPassword(address: string, hash: string): Promise<void> {
    return this.write(() => {
      const u = this.mustUserNow(address);
      this.c.db.prepare('UPDATE users SET password = ?, version = version + 1 WHERE id = ?').run(hash, u.id);
    });
  }

  async setState(address: string, state: 'active' | 'disabled'): Promise<void> {
    return this.write(() => {
      const u = this.mustUserNow(address);
      this.c.db.prepare('UPDATE users SET state = ?, version = version + 1 WHERE id = ?').run(state, u.id);
    });
  }

  async listUsers(domain?: string): Promise<UserRecord[]> {
    return this.read(() => {
      if (domain === undefined) return this.c.db.prepare<[], UserRow>(`${USER_SELECT} ORDER BY d.name, u.address`).all().map(toUser);
      const id = this.domainIdNow(domain);
      return this.c.db.prepare<[number], UserRow>(`${USER_SELECT} WHERE u.domain_id = ? ORDER BY u.address`).all(id).map(toUser);
    });
  }

  /** Rename a user; the allocation (mailbox path) and all settings stay with the user. */
  async renameUser(from: string, to: string): Promise<UserRecord> {
    const b = normaliseAddress(to);
    return this.write(() => {
      const u = this.mustUserNow(from);
      const d = this.c.stmts.domain.get(b.domain);
      if (!d) throw new AppError('NO_SUCH_DOMAIN', `domain ${b.domain} does not exist; add it first with "pigeon domain add ${b.domain}"`);
      if (this.c.stmts.user.get(b.address)) throw new AppError('DUPLICATE', `user ${b.address} already exists`);
      this.c.db.prepare('UPDATE users SET address = ?, domain_id = ?, version = version + 1 WHERE id = ?').run(b.address, d.id, u.id);
      return this.mustUserNow(b.address);
    });
  }

  /** Delete a user and their settings; returns the record so the caller can say where the mailbox is. */
  async delUser(address: string): Promise<UserRecord> {
    return this.write(() => {
      const u = this.mustUserNow(address);
      this.c.db.prepare("DELETE FROM settings WHERE scope = 'user' AND scope_id = ?").run(u.id);
      this.c.db.prepare('DELETE FROM users WHERE id = ?').run(u.id);
      return u;
    });
  }

  /**
   * Compare-and-set of a user's home and allocation: succeeds only if the row still has
   * `expectedVersion` (two nodes racing to allocate the same new user: one wins, one re-reads).
   */
  async casAllocation(id: number, expectedVersion: number, home: string | null, allocation: Allocation | null): Promise<boolean> {
    return this.write(
      () =>
        this.c.db
          .prepare('UPDATE users SET home = ?, allocation = ?, version = version + 1 WHERE id = ? AND version = ?')
          .run(home, allocation === null ? null : JSON.stringify(allocation), id, expectedVersion).changes === 1,
    );
  }

  /** Mark (or clear) a move in progress; compare-and-set on the version like casAllocation. */
  async casMoving(id: number, expectedVersion: number, to: string | null): Promise<boolean> {
    return this.write(() => this.c.db.prepare('UPDATE users SET moving_to = ?, version = version + 1 WHERE id = ? AND version = ?').run(to, id, expectedVersion).changes === 1);
  }

  /** The end of a move: new home and allocation, move mark cleared, in one transaction. */
  async casMoved(id: number, expectedVersion: number, home: string, allocation: Allocation): Promise<boolean> {
    return this.write(
      () =>
        this.c.db
          .prepare('UPDATE users SET home = ?, allocation = ?, moving_to = NULL, version = version + 1 WHERE id = ? AND version = ?')
          .run(home, JSON.stringify(allocation), id, expectedVersion).changes === 1,
    );
  }

  async movingUsers(): Promise<string[]> {
    return this.run(() => this.c.stmts.moving.all().map((r) => r.address));
  }

  // ---- settings ------------------------------------------------------------------------

  async setSetting(ref: ScopeRef, module: string, key: string, value: Json, flags: readonly Flag[]): Promise<void> {
    return this.write(() => {
      const id = this.scopeIdNow(ref);
      this.c.db
        .prepare(
          `INSERT INTO settings (scope, scope_id, module, key, value, flags) VALUES (?, ?, ?, ?, ?, ?)
           ON CONFLICT (scope, scope_id, module, key) DO UPDATE SET value = excluded.value, flags = excluded.flags`,
        )
        .run(ref.scope, id, module, key, JSON.stringify(value), flags.join(','));
    });
  }

  async unsetSetting(ref: ScopeRef, module: string, key: string): Promise<boolean> {
    return this.write(() => {
      const id = this.scopeIdNow(ref);
      return this.c.db.prepare('DELETE FROM settings WHERE scope = ? AND scope_id = ? AND module = ? AND key = ?').run(ref.scope, id, module, key).changes > 0;
    });
  }

  /** Rows that apply at a scope: global, plus the domain, plus the user (as a user would see). */
  async rowsFor(ref: ScopeRef): Promise<SettingRow[]> {
    return this.read(() => {
      if (ref.scope === 'user') {
        const l = this.lookupNow(normaliseAddress(ref.name ?? '').address);
        if (!l) throw new AppError('NO_SUCH_USER', `no such user: ${ref.name ?? ''}`);
        return l.rows;
      }
      const id = ref.scope === 'domain' ? this.scopeIdNow(ref) : -1;
      return this.c.stmts.domainSettings.all(id).map(toSetting);
    });
  }

  /**
   * The one read per login or delivery: the user and every setting row that applies. A user
   * looked up again while the database has not changed at all is answered from the connection's
   * last lookups (Conn.lookups; the check ≈ 24 µs in a busy serve worker, 3.7 µs in a tight
   * loop, against ≈ 60 µs for the query in a worker): the answer is the same frozen object.
   */
  async lookup(address: string): Promise<Lookup | null> {
    return this.run(() => {
      const c = this.c;
      const at = c.state();
      const hit = c.lookups.get(address);
      if (hit !== undefined && hit.at === at) return hit.found;
      dbUserReads.inc();
      const found = this.lookupNow(address);
      if (found === null) {
        c.lookups.delete(address);
        return null;
      }
      deepFreeze(found);
      if (c.lookups.size >= LOOKUPS_KEPT && hit === undefined) c.lookups.delete(c.lookups.keys().next().value as string);
      c.lookups.set(address, { at, found });
      return found;
    });
  }

  async settingRows(module: string, key: string): Promise<(SettingRow & { name: string | null })[]> {
    return this.run(() =>
      this.c.db
        .prepare<[string, string], SettingDbRow & { name: string | null }>(
          `SELECT s.scope, s.module, s.key, s.value, s.flags,
                  CASE s.scope WHEN 'domain' THEN (SELECT name FROM domains WHERE id = s.scope_id)
                               WHEN 'user' THEN (SELECT address FROM users WHERE id = s.scope_id) END AS name
             FROM settings s WHERE s.module = ? AND s.key = ? ORDER BY s.scope, name`,
        )
        .all(module, key)
        .map((r) => ({ ...toSetting(r), name: r.name })),
    );
  }

  // ---- nodes ---------------------------------------------------------------------------

  async listNodes(): Promise<NodeRow[]> {
    return this.run(() => this.c.stmts.nodes.all().map(toNode));
  }

  async getNode(name: string): Promise<NodeRow | null> {
    return this.run(() => {
      const r = this.c.stmts.node.get(name);
      return r ? toNode(r) : null;
    });
  }

  async revokedFingerprints(): Promise<Set<string>> {
    return this.run(() => new Set(this.c.stmts.revoked.all().map((r) => r.fingerprint)));
  }

  /** How many users each node holds (for `node list` and the `fewest` placement). */
  async usersPerNode(): Promise<Map<string, number>> {
    return this.run(() => {
      const rows = this.c.db.prepare<[], { home: string; n: number }>('SELECT home, count(*) AS n FROM users WHERE home IS NOT NULL GROUP BY home').all();
      return new Map(rows.map((r) => [r.home, r.n]));
    });
  }

  /**
   * Register this node at start (`pigeon serve`, `pigeon init`): insert its row, or refresh it.
   * Refuses a revoked certificate (the node was removed) and a name registered with another
   * certificate (two nodes with one name), unless the certificate is that row's announced next one
   * (`pigeon cert issue` re-issue), which is then promoted.
   */
  async registerSelf(me: SelfRegistration, opts: { heartbeat: boolean }): Promise<{ created: boolean; promoted: boolean; state: NodeState }> {
    const db = this.c.db;
    return this.write(() => {
      const rev = db.prepare<[string], { node: string; at: string }>('SELECT node, at FROM revoked WHERE fingerprint = ?').get(me.fingerprint);
      if (rev) {
        throw new AppError('NODE_REMOVED', `this node's certificate was revoked when node ${rev.node} was removed from the cluster (${rev.at}); issue a new certificate with "pigeon cert issue ${me.name} --out DIR" on the CA holder`);
      }
      const row = this.c.stmts.node.get(me.name);
      const seen = opts.heartbeat ? NOW : 'NULL';
      if (!row) {
        db.prepare(`INSERT INTO nodes (name, peer_address, fingerprint, state, last_seen, cert_expires) VALUES (?, ?, ?, 'active', ${seen}, ?)`).run(me.name, me.peerAddress, me.fingerprint, me.certExpires);
        return { created: true, promoted: false, state: 'active' as NodeState };
      }
      const promoted = reRegistration(row, me);
      db.prepare(
        `UPDATE nodes SET fingerprint = ?, next_fingerprint = CASE WHEN next_fingerprint = ? THEN NULL ELSE next_fingerprint END,
           cert_expires = ?, peer_address = coalesce(?, peer_address), last_seen = ${opts.heartbeat ? NOW : 'last_seen'} WHERE name = ?`,
      ).run(me.fingerprint, me.fingerprint, me.certExpires, me.peerAddress, me.name);
      return { created: false, promoted, state: toNode(row).state };
    });
  }

  async unregisterUnseen(name: string, fingerprint: string): Promise<void> {
    return this.write(() => {
      this.c.db.prepare('DELETE FROM nodes WHERE name = ? AND fingerprint = ? AND last_seen IS NULL').run(name, fingerprint);
    });
  }

  async heartbeat(name: string): Promise<void> {
    return this.write(() => {
      this.c.db.prepare(`UPDATE nodes SET last_seen = ${NOW} WHERE name = ?`).run(name);
    });
  }

  /** `pigeon cert issue`: the new certificate becomes acceptable next to the current one. */
  async announceCertificate(name: string, fingerprint: string, certExpires: string): Promise<'new' | 'next'> {
    return this.write(() => {
      if (!this.c.stmts.node.get(name)) {
        this.c.db.prepare(`INSERT INTO nodes (name, fingerprint, state, cert_expires) VALUES (?, ?, 'active', ?)`).run(name, fingerprint, certExpires);
        return 'new' as const;
      }
      this.c.db.prepare('UPDATE nodes SET next_fingerprint = ? WHERE name = ?').run(fingerprint, name);
      return 'next' as const;
    });
  }

  async setNodeState(name: string, state: NodeState): Promise<NodeRow> {
    return this.write(() => {
      const r = this.c.db.prepare(`UPDATE nodes SET state = ? WHERE name = ?`).run(state, name);
      if (r.changes === 0) throw new AppError('NO_SUCH_NODE', `no such node: ${name} (see "pigeon node list")`);
      return toNode(this.c.stmts.node.get(name) as NodeDbRow);
    });
  }

  /**
   * Remove a node: its certificates are revoked for good and its row deleted. Refused while users
   * live there (their mail would become unreachable): move them first.
   */
  async removeNode(name: string): Promise<{ revoked: number }> {
    const db = this.c.db;
    return this.write(() => {
      const row = this.c.stmts.node.get(name);
      if (!row) throw new AppError('NO_SUCH_NODE', `no such node: ${name} (see "pigeon node list")`);
      const n = db.prepare<[string, string], { n: number }>('SELECT count(*) AS n FROM users WHERE home = ? OR moving_to = ?').get(name, name)?.n ?? 0;
      if (n > 0) {
        throw new AppError('NODE_BUSY', `node ${name} still holds ${n} user mailbox(es); move them first ("pigeon user move ADDR --to NODE"), or "pigeon node disable ${name}" to stop its links now`);
      }
      let revoked = 0;
      for (const fp of [row.fingerprint, row.next_fingerprint]) {
        if (fp === null) continue;
        db.prepare('INSERT OR IGNORE INTO revoked (fingerprint, node) VALUES (?, ?)').run(fp, name);
        revoked++;
      }
      db.prepare('DELETE FROM nodes WHERE name = ?').run(name);
      return { revoked };
    });
  }

  // ---- change notifications (polled) ----------------------------------------------------

  onChange(fn: (c: StoreChange) => void): () => void {
    const c = this.c;
    c.listeners.add(fn);
    if (!c.poll) {
      let seen = this.snapshot();
      c.poll = setInterval(() => {
        const now = this.snapshot(seen);
        if (now === null || now === seen) return;
        const changes: StoreChange[] = [];
        if (seen !== null && now.registry !== seen.registry) changes.push({ kind: 'nodes' });
        if (seen !== null) {
          // a user row changed (password, state, home, allocation, move, rename) or went away
          const before = seen.users;
          for (const [id, u] of now.users) {
            const b = before.get(id);
            if (b !== undefined && b.version === u.version && b.address === u.address) continue;
            changes.push({ kind: 'user', address: u.address });
            if (b !== undefined && b.address !== u.address) changes.push({ kind: 'user', address: b.address });
          }
          for (const [id, b] of before) if (!now.users.has(id)) changes.push({ kind: 'user', address: b.address });
        }
        seen = now;
        for (const ch of changes) for (const l of [...c.listeners]) l(ch);
      }, POLL_MS);
      c.poll.unref();
    }
    return () => {
      c.listeners.delete(fn);
      if (c.listeners.size === 0 && c.poll) {
        clearInterval(c.poll);
        c.poll = null;
      }
    };
  }

  /**
   * What the poll compares: the registry (nodes + revoked) and the users being moved, read only
   * when a commit happened since `prev`. Never waits for a lock (null: try next round).
   */
  private snapshot(prev: Snapshot | null = null): Snapshot | null {
    const c = this.c;
    try {
      const version = c.state();
      if (prev !== null && prev.version === version) return prev;
      return c.db
        .transaction(() => ({
          version,
          registry: JSON.stringify([c.stmts.nodes.all().map(({ last_seen: _l, ...rest }) => rest), c.stmts.revoked.all()]),
          users: new Map(c.stmts.userVersions.all().map((r) => [r.id, { address: r.address, version: r.version }])),
        }))
        .deferred();
    } catch {
      return prev; // locked (or briefly unreadable): the next round tries again
    }
  }

  // ---- schema and copy ------------------------------------------------------------------

  async serverInfo(): Promise<ServerInfo> {
    const v = await this.run(() => this.c.db.prepare<[], { v: string }>('SELECT sqlite_version() AS v').get()?.v ?? '?');
    return { engine: `SQLite ${v}`, role: 'embedded', server: this.c.file, user: null, database: null };
  }

  async schemaStatus(): Promise<SchemaStatus> {
    return this.run(() => ({ version: userVersion(this.c.db, this.c.file), minUsable: MIN_USABLE_VERSION, latest: SCHEMA_VERSION }));
  }

  async migrate(): Promise<{ from: number; to: number }> {
    const from = await this.run(() => userVersion(this.c.db, this.c.file));
    await migrateDb(this.c.db, this.c.file, from);
    return { from, to: await this.run(() => userVersion(this.c.db, this.c.file)) };
  }

  async dump(): Promise<TableDump[]> {
    return this.read(() =>
      TABLE_ORDER.map((table) => ({
        table,
        rows: this.c.db.prepare<[], Record<string, string | number | null>>(`SELECT ${TABLES[table].join(', ')} FROM ${table} ORDER BY 1`).all(),
      })),
    );
  }

  async load(tables: readonly TableDump[]): Promise<void> {
    return this.write(() => {
      for (const t of TABLE_ORDER) {
        const n = this.c.db.prepare<[], { n: number }>(`SELECT count(*) AS n FROM ${t}`).get()?.n ?? 0;
        if (n > 0) throw new AppError('DUPLICATE', `database ${this.c.file} is not empty (table ${t} has ${n} row(s)); copy into an empty database only`);
      }
      for (const t of TABLE_ORDER) {
        const dump = tables.find((x) => x.table === t);
        if (!dump) continue;
        const cols = TABLES[t];
        const ins = this.c.db.prepare(`INSERT INTO ${t} (${cols.join(', ')}) VALUES (${cols.map(() => '?').join(', ')})`);
        for (const row of dump.rows) {
          const unknown = Object.keys(row).filter((k) => !cols.includes(k));
          if (unknown.length > 0) throw new AppError('INVALID_VALUE', `table ${t}: unknown column(s) ${unknown.join(', ')}`);
          ins.run(...cols.map((k) => row[k] ?? null));
        }
      }
    });
  }
}

interface Snapshot {
  readonly version: string;
  readonly registry: string;
  readonly users: Map<number, { readonly address: string; readonly version: number }>;
}
