/**
 * NAME        src/db — the embedded SQLite database: open, migrate, map errors
 * DESCRIPTION better-sqlite3 in WAL mode with a busy timeout, so several processes (CLI, proxy
 *             sessions, deliveries, other nodes on the same host) share one file. Migrations are
 *             versioned by `PRAGMA user_version` and run in one transaction each.
 * DIAGNOSTICS A locked database maps to DB_LOCKED (75, retry later); a read-only, missing or foreign
 *             file to DB_READONLY / DB_MISSING / DB_SCHEMA (78, fix the configuration).
 */
import Database from 'better-sqlite3';
import { existsSync } from 'node:fs';
import { AppError } from './errors.js';

export type DB = Database.Database;

export const BUSY_TIMEOUT_MS = 5000;

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

function sqliteCode(e: unknown): string {
  return typeof e === 'object' && e !== null && 'code' in e && typeof e.code === 'string' ? e.code : '';
}

/** Translate a SQLite error into the AppError an admin can act on. */
export function mapDbError(e: unknown, file: string): unknown {
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

/** Parse `--db` forms: `sqlite:PATH` or a plain path. */
export function parseDbUrl(url: string): { kind: 'sqlite'; path: string } {
  if (url.startsWith('sqlite:')) return { kind: 'sqlite', path: url.slice('sqlite:'.length).replace(/^\/\/(?=\/)/, '') };
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(url)) {
    throw new AppError('CONFIG_INVALID', `database URL ${JSON.stringify(url.replace(/:[^:@/]*@/, ':***@'))}: only sqlite:PATH is supported in this version`);
  }
  if (url === '') throw new AppError('CONFIG_INVALID', 'database URL is empty');
  return { kind: 'sqlite', path: url };
}

export function openDb(file: string, opts: { create?: boolean; readonly?: boolean } = {}): DB {
  if (!opts.create && !existsSync(file)) {
    throw new AppError('DB_MISSING', `database ${file} does not exist (create an instance with "pigeon init")`);
  }
  let db: DB;
  try {
    db = new Database(file, { fileMustExist: !opts.create, readonly: opts.readonly ?? false, timeout: BUSY_TIMEOUT_MS });
  } catch (e) {
    throw mapDbError(e, file);
  }
  try {
    db.pragma(`busy_timeout = ${BUSY_TIMEOUT_MS}`);
    if (!opts.readonly) {
      db.pragma('journal_mode = WAL');
      db.pragma('synchronous = NORMAL');
    }
    db.pragma('foreign_keys = ON');
    const version = db.pragma('user_version', { simple: true });
    if (typeof version !== 'number') throw new AppError('DB_SCHEMA', `database ${file}: cannot read schema version`);
    if (version > SCHEMA_VERSION) {
      throw new AppError('DB_SCHEMA', `database ${file} has schema version ${version}, newer than this pigeon (${SCHEMA_VERSION}); upgrade pigeon`);
    }
    if (version < SCHEMA_VERSION) {
      if (opts.readonly) throw new AppError('DB_SCHEMA', `database ${file} needs migration to schema ${SCHEMA_VERSION}; open it read-write once`);
      migrate(db, version);
    }
  } catch (e) {
    db.close();
    throw mapDbError(e, file);
  }
  return db;
}

function migrate(db: DB, from: number): void {
  for (let v = from; v < MIGRATIONS.length; v++) {
    const sql = MIGRATIONS[v];
    if (sql === undefined) break;
    db.transaction(() => {
      // re-check under the write lock: another process may have migrated meanwhile
      const now = db.pragma('user_version', { simple: true });
      if (typeof now === 'number' && now > v) return;
      db.exec(sql);
      db.pragma(`user_version = ${v + 1}`);
    }).immediate();
  }
}
