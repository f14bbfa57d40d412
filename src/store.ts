/**
 * NAME        src/store — the configuration layer's storage contract (SQLite or PostgreSQL)
 * SYNOPSIS    const store = await openStore(instance.database, { baseDir: instance.dir });
 *             const found = await store.lookup(address);   // the one read per login or delivery
 * DESCRIPTION One asynchronous interface, `Store`, two implementations: src/store/sqlite.ts
 *             (embedded default, better-sqlite3, WAL; several nodes on one host may share the
 *             file) and src/store/postgres.ts (nodes on several hosts). Nothing outside src/store/
 *             speaks SQL. Every write is one transaction; `lookup` is the one read per login or
 *             delivery (the user row and every setting row that applies, one statement).
 *             Settings reference domains and users by id, so renaming keeps every setting and the
 *             allocation (the mailbox stays where it is).
 *             A locked or unreachable database is waited for without blocking the event loop, for
 *             at most one busy timeout (BUSY_TIMEOUT_MS) per operation, or until the deadline of a
 *             `withDeadline` view (a login: one busy timeout for the whole login); then DB_LOCKED /
 *             DB_UNAVAILABLE (75).
 *             `openStore(url)` picks the implementation from the URL: `sqlite:PATH` or a plain path
 *             (SQLite), `postgres://…` / `postgresql://…` (src/store/postgres.ts, which exports
 *             `open(url, opts): Promise<Store>`).
 * DIAGNOSTICS AppError codes: DB_LOCKED / DB_UNAVAILABLE (75: retry; database locked, down,
 *             unreachable, failing over, statement timeout), DB_READONLY / DB_MISSING / DB_SCHEMA /
 *             CONFIG_INVALID (78), NO_SUCH_USER, NO_SUCH_DOMAIN, DUPLICATE, DOMAIN_NOT_EMPTY,
 *             NO_SUCH_NODE, NODE_CONFLICT, NODE_REMOVED, NODE_BUSY.
 * SECURITY    No password of the database URL in any message, log line or `where`: URLs are shown
 *             only through `redactUrl` (the PostgreSQL URL parser's printable form).
 */
import { isAbsolute, join } from 'node:path';
import { AppError } from './errors.js';
import { isPgUrl, parsePgUrl, redactUrl as maskUrl } from './store/pg-url.js';
import type { Json, Scope } from './settings.js';
import type { Flag, SettingRow } from './resolve.js';
import type { NodeRow, NodeState, SelfRegistration } from './nodes.js';

export type { NodeRow, NodeState, SelfRegistration, Flag, SettingRow, Json };

/** How long one operation waits for a locked (or briefly unreachable) database. */
export const BUSY_TIMEOUT_MS = 5000;

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

/** What changed, as LISTEN/NOTIFY (PostgreSQL) or polling (SQLite) reports it. */
export type StoreChange = { readonly kind: 'nodes' } | { readonly kind: 'user'; readonly address: string };

/** What `pigeon db status` shows about the connection (never a password). */
export interface ServerInfo {
  /** the engine and its version, e.g. "PostgreSQL 15.14" or "SQLite 3.50.4" */
  readonly engine: string;
  /** primary (read-write), standby (read-only, in recovery), or embedded (a SQLite file) */
  readonly role: 'primary' | 'standby' | 'embedded';
  /** the server address this connection reached (host:port or socket), or the file */
  readonly server: string;
  /** the database user and database name (PostgreSQL), null for SQLite */
  readonly user: string | null;
  readonly database: string | null;
}

export interface SchemaStatus {
  /** the schema version the database is at */
  readonly version: number;
  /** the oldest schema version this code can run on, and the newest it knows */
  readonly minUsable: number;
  readonly latest: number;
}

/** One table's rows, for `pigeon db copy` (plain JSON-able values, column name → value). */
export interface TableDump {
  readonly table: 'domains' | 'users' | 'settings' | 'nodes' | 'revoked';
  readonly rows: readonly Record<string, string | number | null>[];
}

export interface Store {
  readonly kind: 'sqlite' | 'postgres';
  /** where the database is, printable (never a password) */
  readonly where: string;
  close(): Promise<void>;
  /**
   * The same store (same connection), whose operations wait for a locked or unavailable database
   * only until `deadline` (epoch ms) instead of one busy timeout each: a login's password check
   * and mailbox allocation together wait at most one busy timeout. A deadline already passed
   * means one try, no waiting. Closing the view closes nothing.
   */
  withDeadline(deadline: number): Store;

  // domains
  addDomain(name: string): Promise<string>;
  listDomains(): Promise<{ name: string; users: number; created: string }[]>;
  renameDomain(from: string, to: string): Promise<{ users: number }>;
  delDomain(name: string): Promise<void>;

  // users
  getUser(address: string): Promise<UserRecord | null>;
  mustUser(address: string): Promise<UserRecord>;
  addUser(address: string, password: string | null, home: string | null): Promise<UserRecord>;
  /** `user import`: every user (and missing domain when createDomains) in one transaction */
  importUsers(entries: readonly { address: string; hash: string }[], createDomains: boolean): Promise<{ createdDomains: string[] }>;
  setPassword(address: string, hash: string): Promise<void>;
  setState(address: string, state: 'active' | 'disabled'): Promise<void>;
  listUsers(domain?: string): Promise<UserRecord[]>;
  renameUser(from: string, to: string): Promise<UserRecord>;
  delUser(address: string): Promise<UserRecord>;
  /** compare-and-set on the user's version: two allocators racing, exactly one wins */
  casAllocation(id: number, expectedVersion: number, home: string | null, allocation: Allocation | null): Promise<boolean>;
  casMoving(id: number, expectedVersion: number, to: string | null): Promise<boolean>;
  casMoved(id: number, expectedVersion: number, home: string, allocation: Allocation): Promise<boolean>;
  /** users with a move in progress */
  movingUsers(): Promise<string[]>;
  /**
   * Run `fn` holding a cluster-wide lock for allocating one user's mailbox (creator `lock`): a
   * session-level advisory lock on PostgreSQL, waited for at most `waitMs` (then AppError
   * TEMPFAIL). null when the database offers none (SQLite: the creator keeps its host-local lock
   * file under the mail root, which is enough because nodes sharing a SQLite file share a host).
   */
  readonly userLock: (<T>(userId: number, waitMs: number, fn: () => Promise<T>) => Promise<T>) | null;

  // settings
  setSetting(ref: ScopeRef, module: string, key: string, value: Json, flags: readonly Flag[]): Promise<void>;
  unsetSetting(ref: ScopeRef, module: string, key: string): Promise<boolean>;
  rowsFor(ref: ScopeRef): Promise<SettingRow[]>;
  /** the one read per login or delivery (`address` normalised) */
  lookup(address: string): Promise<{ user: UserRecord; rows: SettingRow[] } | null>;
  /** every row of one module.key at any scope (config test, backend switch warnings) */
  settingRows(module: string, key: string): Promise<(SettingRow & { name: string | null })[]>;

  // nodes
  listNodes(): Promise<NodeRow[]>;
  getNode(name: string): Promise<NodeRow | null>;
  revokedFingerprints(): Promise<Set<string>>;
  usersPerNode(): Promise<Map<string, number>>;
  registerSelf(me: SelfRegistration, opts: { heartbeat: boolean }): Promise<{ created: boolean; promoted: boolean; state: NodeState }>;
  /** undo an `init` registration that never served */
  unregisterUnseen(name: string, fingerprint: string): Promise<void>;
  heartbeat(name: string): Promise<void>;
  announceCertificate(name: string, fingerprint: string, certExpires: string): Promise<'new' | 'next'>;
  setNodeState(name: string, state: NodeState): Promise<NodeRow>;
  removeNode(name: string): Promise<{ revoked: number }>;

  /** change notifications (registry and user changes); returns an unsubscribe function */
  onChange(fn: (c: StoreChange) => void): () => void;

  // schema and copy
  /** the connection as `pigeon db status` shows it (one round trip) */
  serverInfo(): Promise<ServerInfo>;
  schemaStatus(): Promise<SchemaStatus>;
  migrate(): Promise<{ from: number; to: number }>;
  dump(): Promise<TableDump[]>;
  /** into an empty database only (refuses otherwise), one transaction */
  load(tables: readonly TableDump[]): Promise<void>;
}

/**
 * Node-local settings of a database server connection (pigeon.yaml `database_*`), handed to the
 * PostgreSQL store (src/store/postgres.ts PostgresStoreOptions); SQLite ignores them.
 */
export interface ServerDbOptions {
  /** the password is this file's first line (database_password_file) */
  readonly passwordFile?: string | null;
  readonly poolMax?: number;
  readonly connectTimeoutMs?: number;
  readonly statementTimeoutMs?: number;
  /** how often the LISTEN connection is checked (database_listen_check_s) */
  readonly listenCheckMs?: number;
  /** one line per change of the database's state (available → unavailable → available) */
  readonly log?: (level: 'info' | 'warn' | 'error', message: string) => void;
}

export interface OpenOptions {
  /** create the database when it does not exist (`pigeon init`) */
  readonly create?: boolean;
  /** a relative SQLite path is relative to this directory (the instance's) */
  readonly baseDir?: string;
  /** settings of a server connection (PostgreSQL) */
  readonly pg?: ServerDbOptions;
}

export type DbTarget = { readonly kind: 'sqlite'; readonly path: string } | { readonly kind: 'postgres'; readonly url: string };

/**
 * A database URL as it may be shown (messages, logs, `config test`, `init`): a PostgreSQL URL
 * in the parser's printable form (src/store/pg-url.ts `where`: never the password, wherever it
 * was written, whatever characters it holds); a URL that does not parse with its user-info part
 * and any password= parameter masked; a SQLite path as it is.
 */
export function redactUrl(url: string): string {
  if (isPgUrl(url)) {
    try {
      return parsePgUrl(url).where;
    } catch {
      return maskUrl(url);
    }
  }
  return /^[a-z][a-z0-9+.-]*:\/\//i.test(url) ? maskUrl(url) : url;
}

/** Parse `--db` / `database:` forms: `sqlite:PATH`, a plain path, `postgres://…`, `postgresql://…`. */
export function parseDbUrl(url: string): DbTarget {
  if (url === '') throw new AppError('CONFIG_INVALID', 'database URL is empty');
  if (url.startsWith('sqlite:')) return { kind: 'sqlite', path: url.slice('sqlite:'.length).replace(/^\/\/(?=\/)/, '') };
  if (isPgUrl(url)) {
    parsePgUrl(url); // a malformed URL is refused where it is read (init, the configuration), naming the part at fault
    return { kind: 'postgres', url };
  }
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(url)) {
    throw new AppError('CONFIG_INVALID', `database URL ${JSON.stringify(redactUrl(url))}: expected sqlite:PATH, a path, or postgres://…`);
  }
  return { kind: 'sqlite', path: url };
}

interface PostgresModule {
  open(url: string, opts: { readonly create?: boolean; readonly pg?: ServerDbOptions }): Promise<Store>;
}

/**
 * Refuse a database whose schema this code cannot run on: older than `minUsable` (run "pigeon db
 * migrate" once every node runs this release) or newer than `latest` (upgrade pigeon first).
 * Inside the range it runs as it is: during a rolling upgrade the nodes still on the previous
 * release keep working on the migrated schema (src/store/pg-migrations.ts ROLLING UPGRADES).
 */
export async function checkSchema(store: Store): Promise<SchemaStatus> {
  const s = await store.schemaStatus();
  if (s.version === 0) {
    throw new AppError('DB_SCHEMA', `database ${store.where} has no PigeonDeliver schema yet: run "pigeon db migrate" (or create it with "pigeon init --db URL")`);
  }
  if (s.version < s.minUsable) {
    throw new AppError(
      'DB_SCHEMA',
      `database ${store.where} has schema version ${s.version}, older than this pigeon can use (${s.minUsable}..${s.latest}): once every node runs this release, run "pigeon db migrate" once`,
    );
  }
  if (s.version > s.latest) {
    throw new AppError('DB_SCHEMA', `database ${store.where} has schema version ${s.version}, newer than this pigeon understands (${s.minUsable}..${s.latest}): upgrade pigeon on this node`);
  }
  return s;
}

/** Open the store a URL names (SQLite: migrated to the current schema on open, as always). */
export async function openStore(url: string, opts: OpenOptions = {}): Promise<Store> {
  const t = parseDbUrl(url);
  if (t.kind === 'sqlite') {
    const { openSqlite } = await import('./store/sqlite.js');
    const path = isAbsolute(t.path) || opts.baseDir === undefined ? t.path : join(opts.baseDir, t.path);
    return openSqlite(path, opts);
  }
  // loaded only for a postgres:// URL, so the SQLite path never pays for the client library
  let mod: PostgresModule;
  try {
    // a literal path: `npm run build` bundles it into dist/src/deliver-inproc.cjs with the rest
    // of the delivery code (one copy of AppError in that process)
    mod = (await import('./store/postgres.js')) as PostgresModule;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ERR_MODULE_NOT_FOUND' && String((e as Error).message).includes('store/postgres.js')) {
      throw new AppError('CONFIG_INVALID', `database URL ${JSON.stringify(redactUrl(url))}: PostgreSQL support is not built into this version yet; use sqlite:PATH`);
    }
    throw e;
  }
  return mod.open(url, { ...(opts.create !== undefined ? { create: opts.create } : {}), ...(opts.pg !== undefined ? { pg: opts.pg } : {}) });
}
