/**
 * NAME        src/store — the configuration layer's storage contract (SQLite or PostgreSQL)
 * DESCRIPTION One asynchronous interface, two implementations: src/store/sqlite.ts (embedded
 *             default, better-sqlite3, WAL; several nodes on one host may share the file) and
 *             src/store/postgres.ts (the `postgres` client; nodes on several hosts). Nothing outside
 *             src/store/ speaks SQL. Every write is one transaction; `lookup` is the one read per
 *             login or delivery (the user row and every setting row that applies, one statement).
 *             (While the code moves over, the synchronous class in src/store.ts still exists; this
 *             interface is named ConfigStore until it replaces it.)
 *             `openStore(url)` picks the implementation from the URL (sqlite:PATH, a plain path,
 *             postgres://…, postgresql://…).
 * DIAGNOSTICS AppError codes: DB_LOCKED / DB_UNAVAILABLE (75: retry; database locked, down,
 *             unreachable, failing over, statement timeout), DB_READONLY / DB_MISSING / DB_SCHEMA /
 *             CONFIG_INVALID (78), NO_SUCH_USER, NO_SUCH_DOMAIN, DUPLICATE, DOMAIN_NOT_EMPTY,
 *             NO_SUCH_NODE, NODE_CONFLICT, NODE_REMOVED, NODE_BUSY.
 * SECURITY    No password of the database URL in any message, log line or `where`.
 */

import type { Json } from '../settings.js';
import type { Flag, SettingRow } from '../resolve.js';
import type { Allocation, UserRecord, ScopeRef } from '../store.js';
import type { NodeRow, NodeState, SelfRegistration } from '../nodes.js';

export type { Allocation, UserRecord, ScopeRef, NodeRow, NodeState, SelfRegistration, Flag, SettingRow, Json };

/** What changed, as LISTEN/NOTIFY (PostgreSQL) or polling (SQLite) reports it. */
export type StoreChange = { readonly kind: 'nodes' } | { readonly kind: 'user'; readonly address: string };

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

export interface ConfigStore {
  readonly kind: 'sqlite' | 'postgres';
  /** where the database is, printable (never a password) */
  readonly where: string;
  close(): Promise<void>;

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
  /** the one read per login or delivery */
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
  schemaStatus(): Promise<SchemaStatus>;
  migrate(): Promise<{ from: number; to: number }>;
  dump(): Promise<TableDump[]>;
  /** into an empty database only (refuses otherwise), one transaction */
  load(tables: readonly TableDump[]): Promise<void>;
}
