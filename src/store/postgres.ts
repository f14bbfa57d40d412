/**
 * NAME        src/store/postgres — the configuration store on PostgreSQL (nodes on several hosts)
 * SYNOPSIS    const store = await openPostgresStore('postgres://pigeon@db1,db2/pigeon?target_session_attrs=read-write',
 *               { passwordFile, log });
 * DESCRIPTION ConfigStore (src/store/types.ts) over the `postgres` client (postgres.js): a bounded
 *             pool per process with pipelining and automatically prepared statements, `poolMin`
 *             connections kept warm, hosts tried in order with target_session_attrs (after a
 *             fail-over the pool reconnects to the new primary by itself). Semantics are
 *             SQLite's (src/store.ts, src/nodes.ts), written for READ COMMITTED and several
 *             writers at once:
 *             - every write is one transaction; a check-then-write takes the row lock that makes
 *               its check hold (a domain FOR KEY SHARE while adding a user to it, FOR UPDATE
 *               while renaming or deleting it; `users` in SHARE mode while a node is removed);
 *             - cas* are one UPDATE … WHERE version = expected: of two racing, exactly one
 *               changes the row (the other re-checks the version after the first commits);
 *             - `lookup` is one prepared statement (the user row and every setting row that
 *               applies), on a pooled connection;
 *             - `userLock` is a session-level advisory lock (class USER_LOCK, the user id) on a
 *               connection reserved from a separate small pool (so the holder's own queries
 *               never wait for the connection it holds), waited for in slices shorter than the
 *               statement timeout until `waitMs`, then AppError TEMPFAIL (the server drops the
 *               lock with the session: a holder whose connection dies loses it, so what the
 *               holder writes must still be a cas* write, as the creators' are);
 *             - `onChange`: LISTEN pigeon_change on a connection of its own (the triggers of
 *               src/store/pg-migrations.ts); whenever a LISTEN takes effect (the first one
 *               too, and every one after its connection was lost) subscribers get
 *               { kind: 'nodes' }, since what was committed before it was not notified.
 *             Orders are byte orders (COLLATE "C"), as in SQLite, whatever the database's locale.
 * CONFIG      The URL (src/store/pg-url.ts) and PostgresStoreOptions: connectTimeoutMs (5000, per
 *             host; the URL's connect_timeout wins), statementTimeoutMs (5000, enforced by the
 *             server), queryTimeoutMs (statement + 3000: the client's bound, waiting for a
 *             connection included, for a server that went silent), poolMax (4), poolMin (1),
 *             lockPoolMax (8), reconnectMaxMs (1000: longest pause between connection attempts
 *             while the database is down), listenCheckMs (30000: how often the LISTEN connection
 *             is asked a `SELECT 1`, so that one the server or the network dropped without a
 *             word is noticed: within listenCheckMs + queryTimeoutMs + the cancel timeout),
 *             passwordFile, log.
 * DIAGNOSTICS Outages: AppError DB_UNAVAILABLE (75) within the bounds above, never a hang; the
 *             next operation after the database is back succeeds (no restart). `log` gets one
 *             line per change of state (available → unavailable → available), not one per request;
 *             likewise for change notifications: one line when they stop arriving (the LISTEN
 *             connection lost, or a LISTEN refused) and one when a LISTEN works again.
 *             Other codes as SQLite's: DUPLICATE, NO_SUCH_USER, NO_SUCH_DOMAIN, DOMAIN_NOT_EMPTY,
 *             NODE_CONFLICT, NODE_REMOVED, NODE_BUSY, NO_SUCH_NODE; see src/store/pg-errors.ts.
 * SECURITY    The password (URL, passwordFile, or ~/.pgpass / PGPASSFILE via the client) is
 *             handed to the client only; `where`, messages and log lines carry the URL without
 *             it. The password file is read at each new connection (a rotated password needs no
 *             restart) and refused when others may read it.
 */
import postgres, { type Sql, type TransactionSql, type Options } from 'postgres';
import { readFileSync, statSync } from 'node:fs';
import { AppError } from '../errors.js';
import { normaliseAddress, normaliseDomain } from '../address.js';
import { countDbError, dbUserReads } from '../metrics.js';
import { PG_POOL_SIZE, PG_CONNECT_TIMEOUT_S, PG_STATEMENT_TIMEOUT_S, PG_LISTEN_CHECK_S } from '../limits.js';
import type { ConfigStore, StoreChange, SchemaStatus, ServerInfo, TableDump, Allocation, UserRecord, ScopeRef, NodeRow, NodeState, SelfRegistration, Flag, SettingRow, Json } from './types.js';
import { parsePgUrl, type PgUrl } from './pg-url.js';
import { toUser, toSetting, toNode, toLookup, reRegistration, type UserRow, type SettingDbRow, type NodeDbRow, type LookupRow } from './rows.js';
import { mapPgError } from './pg-errors.js';
import { PG_SCHEMA_VERSION, PG_MIN_USABLE_VERSION, migrateIn, schemaVersion } from './pg-migrations.js';

export interface PostgresStoreOptions {
  /** the instance's `database_password_file`: the password is its first line */
  readonly passwordFile?: string | null;
  readonly connectTimeoutMs?: number;
  readonly statementTimeoutMs?: number;
  readonly queryTimeoutMs?: number;
  readonly poolMax?: number;
  readonly poolMin?: number;
  readonly lockPoolMax?: number;
  readonly reconnectMaxMs?: number;
  /** how often the idle LISTEN connection is checked with a `SELECT 1` */
  readonly listenCheckMs?: number;
  /** one line per change of the database's state */
  readonly log?: (level: 'info' | 'warn' | 'error', message: string) => void;
}

interface ResolvedOptions {
  readonly passwordFile: string | null;
  readonly connectTimeoutMs: number;
  readonly statementTimeoutMs: number;
  readonly queryTimeoutMs: number;
  readonly poolMax: number;
  readonly poolMin: number;
  readonly lockPoolMax: number;
  readonly reconnectMaxMs: number;
  readonly listenCheckMs: number;
  readonly log: (level: 'info' | 'warn' | 'error', message: string) => void;
}

export const PG_DEFAULTS = {
  connectTimeoutMs: PG_CONNECT_TIMEOUT_S * 1000,
  statementTimeoutMs: PG_STATEMENT_TIMEOUT_S * 1000,
  poolMax: PG_POOL_SIZE,
  poolMin: 1,
  lockPoolMax: 8,
  reconnectMaxMs: 1000,
  listenCheckMs: PG_LISTEN_CHECK_S * 1000,
} as const;

/** the NOTIFY channel of src/store/pg-migrations.ts */
export const CHANGE_CHANNEL = 'pigeon_change';
/** advisory lock class of `userLock` (pg_advisory_lock(USER_LOCK, user id)) */
export const USER_LOCK = 0x70696701;

function positive(name: string, v: number | undefined, dflt: number, min = 1): number {
  if (v === undefined) return dflt;
  if (!Number.isFinite(v) || v < min) throw new AppError('CONFIG_INVALID', `database option ${name}: ${v} is not a number ≥ ${min}`);
  return v;
}

function resolveOptions(o: PostgresStoreOptions, url: PgUrl): ResolvedOptions {
  const statementTimeoutMs = positive('statementTimeoutMs', o.statementTimeoutMs, PG_DEFAULTS.statementTimeoutMs, 100);
  const poolMax = positive('poolMax', o.poolMax, PG_DEFAULTS.poolMax);
  return {
    passwordFile: o.passwordFile ?? null,
    connectTimeoutMs: url.connectTimeoutS !== null ? url.connectTimeoutS * 1000 : positive('connectTimeoutMs', o.connectTimeoutMs, PG_DEFAULTS.connectTimeoutMs, 100),
    statementTimeoutMs,
    queryTimeoutMs: positive('queryTimeoutMs', o.queryTimeoutMs, statementTimeoutMs + 3000, statementTimeoutMs),
    poolMax,
    poolMin: Math.min(poolMax, positive('poolMin', o.poolMin, PG_DEFAULTS.poolMin, 0)),
    lockPoolMax: positive('lockPoolMax', o.lockPoolMax, PG_DEFAULTS.lockPoolMax),
    reconnectMaxMs: positive('reconnectMaxMs', o.reconnectMaxMs, PG_DEFAULTS.reconnectMaxMs, 10),
    listenCheckMs: positive('listenCheckMs', o.listenCheckMs, PG_DEFAULTS.listenCheckMs, 100),
    log: o.log ?? (() => undefined),
  };
}

/**
 * target_session_attrs as the client must be told it. libpq's read-write means "not a hot standby
 * and not default_transaction_read_only"; postgres.js 4.2 checks only default_transaction_read_only
 * on servers that report in_hot_standby (PostgreSQL 14+), which is off on a standby, so it took a
 * standby for read-write (a failover test saw logins served by the not yet promoted standby).
 * Its 'primary' checks in_hot_standby (or pg_is_in_recovery()): what read-write needs.
 */
function clientSessionAttrs(a: PgUrl['targetSessionAttrs']): Options['target_session_attrs'] {
  if (a === 'any') return null;
  return a === 'read-write' ? 'primary' : a;
}

/** The password file's first line; refused when others may read it, or when it is not UTF-8. */
export function readPasswordFile(file: string): string {
  let st;
  let bytes: Buffer;
  try {
    st = statSync(file);
    bytes = readFileSync(file);
  } catch (e) {
    throw new AppError('CONFIG_INVALID', `database_password_file ${file}: cannot read (${(e as NodeJS.ErrnoException).code ?? 'error'})`);
  }
  if ((st.mode & 0o007) !== 0) throw new AppError('CONFIG_INVALID', `database_password_file ${file} is accessible to others (chmod o-rwx, e.g. 0600 or 0640)`);
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(bytes);
  } catch {
    throw new AppError('CONFIG_INVALID', `database_password_file ${file} is not UTF-8 text`);
  }
  const line = text.split('\n')[0]?.replace(/\r$/, '') ?? '';
  if (line === '') throw new AppError('CONFIG_INVALID', `database_password_file ${file} is empty (the password goes on its first line)`);
  return line;
}

function sslOption(u: PgUrl): Options['ssl'] {
  switch (u.sslmode) {
    case 'disable':
      return false;
    case 'allow':
    case 'prefer':
      return 'prefer';
    case 'require':
      // as libpq: with a root certificate, require checks the chain (verify-ca)
      return u.sslrootcert !== null && u.sslrootcert !== 'system' ? { ca: readCa(u.sslrootcert), checkServerIdentity: () => undefined } : 'require';
    case 'verify-ca':
      return { ca: readCa(u.sslrootcert ?? ''), checkServerIdentity: () => undefined };
    case 'verify-full':
      return u.sslrootcert === 'system' || u.sslrootcert === null ? { rejectUnauthorized: true } : { ca: readCa(u.sslrootcert), rejectUnauthorized: true };
  }
}

function readCa(file: string): Buffer {
  try {
    return readFileSync(file);
  } catch (e) {
    throw new AppError('CONFIG_INVALID', `database URL: sslrootcert ${file}: cannot read (${(e as NodeJS.ErrnoException).code ?? 'error'})`);
  }
}

// ---- rows -------------------------------------------------------------------------------

/** every table and column `dump`/`load` move, in SQLite's column names; key = the order of rows */
const TABLES = {
  domains: { columns: ['id', 'name', 'created'], key: 'id' },
  users: { columns: ['id', 'address', 'domain_id', 'password', 'state', 'home', 'allocation', 'version', 'created', 'moving_to'], key: 'id' },
  settings: { columns: ['scope', 'scope_id', 'module', 'key', 'value', 'flags'], key: 'scope COLLATE "C", scope_id, module COLLATE "C", key COLLATE "C"' },
  nodes: { columns: ['name', 'peer_address', 'fingerprint', 'state', 'last_seen', 'next_fingerprint', 'cert_expires'], key: 'name COLLATE "C"' },
  revoked: { columns: ['fingerprint', 'node', 'at'], key: 'fingerprint COLLATE "C"' },
} as const satisfies Record<TableDump['table'], { columns: readonly string[]; key: string }>;
const TABLE_ORDER = ['domains', 'users', 'settings', 'nodes', 'revoked'] as const;

const USER_COLUMNS = `u.id, u.address, d.name AS domain, u.domain_id, u.password, u.state, u.home, u.allocation, u.version, u.created, u.moving_to`;

function pgCode(e: unknown): string {
  return typeof e === 'object' && e !== null && 'code' in e && typeof e.code === 'string' ? e.code : '';
}

// ---- the store ------------------------------------------------------------------------------

/** A failure this soon after the database came back changes no state (see fail()). */
const FLAP_MS = 1000;

class PostgresStore implements ConfigStore {
  readonly kind = 'postgres' as const;
  readonly where: string;
  /** the unix socket file, when the URL names a socket directory */
  private readonly socket: string | null;
  private readonly sql: Sql;
  /** reserved connections holding user locks; separate, so a holder's queries never wait for it */
  private readonly lockSql: Sql;
  private readonly o: ResolvedOptions;
  private state: 'unknown' | 'up' | 'down' = 'unknown';
  private downSince = 0;
  /** when an operation last succeeded */
  private lastOk = 0;
  private closed = false;
  private readonly subscribers = new Set<(c: StoreChange) => void>();
  /** options shared by every pool of this store */
  private readonly base: Options;
  /** the LISTEN connection (one, of its own), made on the first onChange */
  private listenSql: Sql | null = null;
  private listenState: 'off' | 'starting' | 'live' = 'off';
  private listenLostWhileStarting = false;
  private listenTimer: NodeJS.Timeout | null = null;
  /** since when notifications are known not to arrive (0: they do, or nothing was logged) */
  private listenDownSince = 0;
  /** while subscribed: the periodic `SELECT 1` on the LISTEN connection (see checkListen) */
  private listenCheck: NodeJS.Timeout | null = null;
  private listenChecking = false;
  /** when the state last went from down to up (0: never) */
  private recoveredAt = 0;

  constructor(url: PgUrl, o: ResolvedOptions) {
    this.where = url.where;
    this.socket = url.socketDir === null ? null : `${url.socketDir}/.s.PGSQL.${url.socketPort}`;
    this.o = o;
    const passwordFile = o.passwordFile;
    if (passwordFile !== null && url.password !== null) {
      throw new AppError('CONFIG_INVALID', `database ${url.where}: the URL carries a password and database_password_file is set; keep one (the file is recommended)`);
    }
    if (passwordFile !== null) readPasswordFile(passwordFile); // refuse a bad file now, not at the first login
    const maxBackoffS = o.reconnectMaxMs / 1000;
    const base: Options = {
      ...(url.socketDir !== null ? { path: `${url.socketDir}/.s.PGSQL.${url.socketPort}` } : { host: url.hosts.map((h) => h.host), port: url.hosts.map((h) => h.port) }),
      ...(url.database !== null ? { database: url.database } : {}),
      ...(url.user !== null ? { username: url.user } : {}),
      ...(passwordFile !== null ? { password: () => readPasswordFile(passwordFile) } : url.password !== null ? { password: url.password } : {}),
      ssl: sslOption(url),
      target_session_attrs: clientSessionAttrs(url.targetSessionAttrs),
      connect_timeout: o.connectTimeoutMs / 1000,
      query_timeout: o.queryTimeoutMs / 1000,
      queue_timeout: o.queryTimeoutMs / 1000,
      cancel_timeout: Math.max(1, o.connectTimeoutMs / 1000),
      backoff: (attempt: number) => Math.min(maxBackoffS, 0.02 * 2 ** attempt),
      keep_alive: 30,
      idle_timeout: 300,
      prepare: true,
      onnotice: false,
      unref_sockets: true,
      connection: {
        application_name: url.applicationName ?? 'pigeon',
        statement_timeout: o.statementTimeoutMs,
        // a client that died inside a transaction must not hold row locks for long
        idle_in_transaction_session_timeout: Math.max(10_000, 2 * o.queryTimeoutMs),
      },
    };
    this.base = base;
    this.sql = postgres({ ...base, max: o.poolMax, min: o.poolMin });
    this.lockSql = postgres({ ...base, max: o.lockPoolMax, min: 0, idle_timeout: 30, prepare: false, queue_timeout: 0 });
  }

  /**
   * A view whose operations give up at `deadline` (epoch ms) with DB_UNAVAILABLE, for a login's
   * one budget. The server-side statement may still finish; every write is a single transaction
   * or a compare-and-set, so a caller that gave up and retries never half-applies anything.
   */
  withDeadline(deadline: number): ConfigStore {
    return deadlineView(this, deadline);
  }

  // ---- state and errors -------------------------------------------------------------------

  private up(): void {
    if (this.state === 'down') {
      this.recoveredAt = Date.now();
      this.o.log('info', `database ${this.where} is available again (after ${Math.round((Date.now() - this.downSince) / 1000)} s out of service)`);
    }
    this.lastOk = Date.now();
    this.state = 'up';
  }

  /**
   * Map an error; an outage moves the state to down (logged once). `started`: when the failed
   * operation began; when another operation succeeded after that, the database was reachable
   * meanwhile and this failure is its connection's (one made while the server was still
   * starting up, or a pooled one the restart closed): it changes no state (it logged "available
   * again", then "unavailable: starting up", then "available again" within a second). Nor does
   * a failure within FLAP_MS of the recovery: a pooled connection attempt made while the server
   * was starting up can fail an operation that began after the first success (two suites at
   * once showed that flap); an outage that lasts is logged by the next failure.
   */
  private fail(e: unknown, started?: number): unknown {
    const m = mapPgError(e, this.where);
    if (m instanceof AppError && m.code.startsWith('DB_')) countDbError(m);
    if (m instanceof AppError && m.code === 'DB_UNAVAILABLE') {
      if (this.state === 'up' && started !== undefined && started <= this.lastOk) return m;
      if (this.state === 'up' && Date.now() - this.recoveredAt < FLAP_MS) return m;
      if (this.state !== 'down' && !this.closed) {
        this.downSince = Date.now();
        this.o.log('error', `${m.message}; logins and deliveries get a temporary failure until it is back`);
      }
      this.state = 'down';
    } else if (m instanceof AppError && m.code !== 'CONFIG_INVALID' && m.code !== 'DB_MISSING') {
      this.up(); // the server answered
    }
    return m;
  }

  private async op<T>(fn: () => Promise<T>): Promise<T> {
    const started = Date.now();
    try {
      const r = await fn();
      this.up();
      return r;
    } catch (e) {
      throw this.fail(e, started);
    }
  }

  private write<T>(fn: (tx: TransactionSql) => Promise<T>): Promise<T> {
    return this.op(async () => (await this.sql.begin(fn)) as T);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.listenTimer) clearTimeout(this.listenTimer);
    if (this.listenCheck) clearInterval(this.listenCheck);
    this.subscribers.clear();
    const l = this.listenSql;
    this.listenSql = null;
    await Promise.all([this.sql.end({ timeout: 5 }), this.lockSql.end({ timeout: 5 }), l?.end({ timeout: 1 })]);
  }

  // ---- domains ----------------------------------------------------------------------------

  private async domainRow(tx: TransactionSql, name: string, lock: 'share' | 'update' | null): Promise<{ id: number; name: string } | null> {
    const rows =
      lock === 'share'
        ? await tx<{ id: number; name: string }[]>`SELECT id, name FROM domains WHERE name = ${name} FOR KEY SHARE`
        : lock === 'update'
          ? await tx<{ id: number; name: string }[]>`SELECT id, name FROM domains WHERE name = ${name} FOR UPDATE`
          : await tx<{ id: number; name: string }[]>`SELECT id, name FROM domains WHERE name = ${name}`;
    return rows[0] ?? null;
  }

  private async mustDomain(tx: TransactionSql, name: string, lock: 'share' | 'update' | null, hint = false): Promise<number> {
    const d = await this.domainRow(tx, name, lock);
    if (!d) throw new AppError('NO_SUCH_DOMAIN', hint ? `domain ${name} does not exist; add it first with "pigeon domain add ${name}"` : `no such domain: ${name}`);
    return d.id;
  }

  async addDomain(name: string): Promise<string> {
    const n = normaliseDomain(name);
    return this.write(async (tx) => {
      const r = await tx`INSERT INTO domains (name) VALUES (${n}) ON CONFLICT (name) DO NOTHING RETURNING id`;
      if (r.count === 0) throw new AppError('DUPLICATE', `domain ${n} already exists`);
      return n;
    });
  }

  async listDomains(): Promise<{ name: string; users: number; created: string }[]> {
    return this.op(async () => [
      ...(await this.sql<{ name: string; users: number; created: string }[]>`
        SELECT d.name, count(u.id)::int AS users, d.created FROM domains d LEFT JOIN users u ON u.domain_id = d.id
         GROUP BY d.id ORDER BY d.name COLLATE "C"`),
    ]);
  }

  async renameDomain(from: string, to: string): Promise<{ users: number }> {
    const a = normaliseDomain(from);
    const b = normaliseDomain(to);
    return this.write(async (tx) => {
      const id = await this.mustDomain(tx, a, 'update');
      if (await this.domainRow(tx, b, null)) throw new AppError('DUPLICATE', `domain ${b} already exists`);
      await tx`UPDATE domains SET name = ${b} WHERE id = ${id}`;
      const r = await tx`UPDATE users SET address = split_part(address, '@', 1) || '@' || ${b}::text, version = version + 1 WHERE domain_id = ${id}`;
      return { users: r.count };
    }).catch((e: unknown) => {
      throw pgCode(e) === '23505' ? new AppError('DUPLICATE', `domain ${b} already exists`) : e;
    });
  }

  async delDomain(name: string): Promise<void> {
    const n = normaliseDomain(name);
    return this.write(async (tx) => {
      const id = await this.mustDomain(tx, n, 'update');
      const [c] = await tx<{ c: number }[]>`SELECT count(*)::int AS c FROM users WHERE domain_id = ${id}`;
      if (c && c.c > 0) {
        throw new AppError('DOMAIN_NOT_EMPTY', `domain ${n} still has ${c.c} user(s); delete or move them first ("pigeon user list ${n}")`);
      }
      await tx`DELETE FROM settings WHERE scope = 'domain' AND scope_id = ${id}`;
      await tx`DELETE FROM domains WHERE id = ${id}`;
    });
  }

  // ---- users ------------------------------------------------------------------------------

  private async userIn(tx: Sql | TransactionSql, address: string, lock: 'share' | 'update' | null = null): Promise<UserRecord | null> {
    const rows =
      lock === 'update'
        ? await tx<UserRow[]>`SELECT ${tx.unsafe(USER_COLUMNS)} FROM users u JOIN domains d ON d.id = u.domain_id WHERE u.address = ${address} FOR UPDATE OF u`
        : lock === 'share'
          ? await tx<UserRow[]>`SELECT ${tx.unsafe(USER_COLUMNS)} FROM users u JOIN domains d ON d.id = u.domain_id WHERE u.address = ${address} FOR KEY SHARE OF u`
          : await tx<UserRow[]>`SELECT ${tx.unsafe(USER_COLUMNS)} FROM users u JOIN domains d ON d.id = u.domain_id WHERE u.address = ${address}`;
    const r = rows[0];
    return r ? toUser(r) : null;
  }

  private async mustUserIn(tx: TransactionSql, address: string, lock: 'share' | 'update' | null): Promise<UserRecord> {
    const a = normaliseAddress(address).address;
    const u = await this.userIn(tx, a, lock);
    if (!u) throw new AppError('NO_SUCH_USER', `no such user: ${a}`);
    return u;
  }

  async getUser(address: string): Promise<UserRecord | null> {
    const a = normaliseAddress(address).address;
    dbUserReads.inc();
    return this.op(() => this.userIn(this.sql, a));
  }

  async mustUser(address: string): Promise<UserRecord> {
    const u = await this.getUser(address);
    if (!u) throw new AppError('NO_SUCH_USER', `no such user: ${normaliseAddress(address).address}`);
    return u;
  }

  async addUser(address: string, password: string | null, home: string | null): Promise<UserRecord> {
    const a = normaliseAddress(address);
    return this.write(async (tx) => {
      const domainId = await this.mustDomain(tx, a.domain, 'share', true);
      const r = await tx`INSERT INTO users (address, domain_id, password, home) VALUES (${a.address}, ${domainId}, ${password}, ${home})
                         ON CONFLICT (address) DO NOTHING RETURNING id`;
      if (r.count === 0) throw new AppError('DUPLICATE', `user ${a.address} already exists`);
      return (await this.userIn(tx, a.address)) as UserRecord;
    });
  }

  async importUsers(entries: readonly { address: string; hash: string }[], createDomains: boolean): Promise<{ createdDomains: string[] }> {
    const list = entries.map((e) => ({ a: normaliseAddress(e.address), hash: e.hash }));
    const seen = new Set<string>();
    for (const e of list) {
      if (seen.has(e.a.address)) throw new AppError('DUPLICATE', `${e.a.address} appears twice`);
      seen.add(e.a.address);
    }
    return this.write(async (tx) => {
      const created: string[] = [];
      const ids = new Map<string, number>();
      for (const domain of [...new Set(list.map((e) => e.a.domain))]) {
        const d = await this.domainRow(tx, domain, 'share');
        if (d) ids.set(domain, d.id);
        else if (!createDomains) throw new AppError('NO_SUCH_DOMAIN', `domain ${domain} does not exist (add it, or use --create-domains)`);
        else {
          const [n] = await tx<{ id: number }[]>`INSERT INTO domains (name) VALUES (${domain}) RETURNING id`;
          ids.set(domain, n?.id ?? 0);
          created.push(domain);
        }
      }
      for (let i = 0; i < list.length; i += 1000) {
        const chunk = list.slice(i, i + 1000);
        const addresses = chunk.map((e) => e.a.address);
        const [dup] = await tx<{ address: string }[]>`SELECT address FROM users WHERE address = ANY(${addresses}::text[]) ORDER BY address COLLATE "C" LIMIT 1`;
        if (dup) throw new AppError('DUPLICATE', `user ${dup.address} already exists`);
        const rows = chunk.map((e) => ({ address: e.a.address, domain_id: ids.get(e.a.domain) ?? 0, password: e.hash }));
        await tx`INSERT INTO users ${tx(rows, 'address', 'domain_id', 'password')}`;
      }
      return { createdDomains: created };
    }).catch((e: unknown) => {
      throw pgCode(e) === '23505' ? new AppError('DUPLICATE', 'a user or domain of the import was added meanwhile; run the import again') : e;
    });
  }

  async setPassword(address: string, hash: string): Promise<void> {
    const a = normaliseAddress(address).address;
    return this.op(async () => {
      const r = await this.sql`UPDATE users SET password = ${hash}, version = version + 1 WHERE address = ${a}`;
      if (r.count === 0) throw new AppError('NO_SUCH_USER', `no such user: ${a}`);
    });
  }

  async setState(address: string, state: 'active' | 'disabled'): Promise<void> {
    const a = normaliseAddress(address).address;
    return this.op(async () => {
      const r = await this.sql`UPDATE users SET state = ${state}, version = version + 1 WHERE address = ${a}`;
      if (r.count === 0) throw new AppError('NO_SUCH_USER', `no such user: ${a}`);
    });
  }

  async listUsers(domain?: string): Promise<UserRecord[]> {
    if (domain === undefined) {
      return this.op(async () =>
        (await this.sql<UserRow[]>`SELECT ${this.sql.unsafe(USER_COLUMNS)} FROM users u JOIN domains d ON d.id = u.domain_id
                                    ORDER BY d.name COLLATE "C", u.address COLLATE "C"`).map(toUser),
      );
    }
    const n = normaliseDomain(domain);
    return this.write(async (tx) => {
      const id = await this.mustDomain(tx, n, null);
      return (await tx<UserRow[]>`SELECT ${tx.unsafe(USER_COLUMNS)} FROM users u JOIN domains d ON d.id = u.domain_id
                                   WHERE u.domain_id = ${id} ORDER BY u.address COLLATE "C"`).map(toUser);
    });
  }

  async renameUser(from: string, to: string): Promise<UserRecord> {
    const b = normaliseAddress(to);
    return this.write(async (tx) => {
      const u = await this.mustUserIn(tx, from, 'update');
      const d = await this.domainRow(tx, b.domain, 'share');
      if (!d) throw new AppError('NO_SUCH_DOMAIN', `domain ${b.domain} does not exist; add it first with "pigeon domain add ${b.domain}"`);
      if (await this.userIn(tx, b.address)) throw new AppError('DUPLICATE', `user ${b.address} already exists`);
      await tx`UPDATE users SET address = ${b.address}, domain_id = ${d.id}, version = version + 1 WHERE id = ${u.id}`;
      return (await this.userIn(tx, b.address)) as UserRecord;
    }).catch((e: unknown) => {
      throw pgCode(e) === '23505' ? new AppError('DUPLICATE', `user ${b.address} already exists`) : e;
    });
  }

  async delUser(address: string): Promise<UserRecord> {
    return this.write(async (tx) => {
      const u = await this.mustUserIn(tx, address, 'update');
      await tx`DELETE FROM settings WHERE scope = 'user' AND scope_id = ${u.id}`;
      await tx`DELETE FROM users WHERE id = ${u.id}`;
      return u;
    });
  }

  async casAllocation(id: number, expectedVersion: number, home: string | null, allocation: Allocation | null): Promise<boolean> {
    const alloc = allocation === null ? null : JSON.stringify(allocation);
    return this.op(
      async () => (await this.sql`UPDATE users SET home = ${home}, allocation = ${alloc}, version = version + 1 WHERE id = ${id} AND version = ${expectedVersion}`).count === 1,
    );
  }

  async casMoving(id: number, expectedVersion: number, to: string | null): Promise<boolean> {
    return this.op(async () => (await this.sql`UPDATE users SET moving_to = ${to}, version = version + 1 WHERE id = ${id} AND version = ${expectedVersion}`).count === 1);
  }

  async casMoved(id: number, expectedVersion: number, home: string, allocation: Allocation): Promise<boolean> {
    const alloc = JSON.stringify(allocation);
    return this.op(
      async () =>
        (await this.sql`UPDATE users SET home = ${home}, allocation = ${alloc}, moving_to = NULL, version = version + 1 WHERE id = ${id} AND version = ${expectedVersion}`).count ===
        1,
    );
  }

  async movingUsers(): Promise<string[]> {
    return this.op(async () => (await this.sql<{ address: string }[]>`SELECT address FROM users WHERE moving_to IS NOT NULL ORDER BY address COLLATE "C"`).map((r) => r.address));
  }

  readonly userLock = async <T>(userId: number, waitMs: number, fn: () => Promise<T>): Promise<T> => {
    const deadline = Date.now() + Math.max(0, waitMs);
    const tooLong = (): AppError => new AppError('TEMPFAIL', `the allocation lock of user #${userId} is still held elsewhere after ${waitMs} ms; try again later`);
    let r;
    try {
      r = await this.lockSql.reserve().signal(AbortSignal.timeout(Math.max(1, deadline - Date.now())));
    } catch (e) {
      if (pgCode(e) === '57014') throw tooLong();
      throw this.fail(e);
    }
    let held = false;
    try {
      // wait in slices shorter than the statement timeout; within a slice the server wakes us
      // the moment the holder lets go
      const slice = Math.max(50, Math.floor(this.o.statementTimeoutMs / 2));
      while (!held) {
        const left = deadline - Date.now();
        if (left <= 0) throw tooLong();
        try {
          await r`SELECT set_config('lock_timeout', ${String(Math.min(slice, left))}, false), pg_advisory_lock(${USER_LOCK}::int, ${userId}::int)`;
          held = true;
        } catch (e) {
          if (pgCode(e) !== '55P03') throw this.fail(e);
        }
      }
      this.up();
      return await fn();
    } finally {
      try {
        await Promise.all([r`RESET lock_timeout`, held ? r`SELECT pg_advisory_unlock(${USER_LOCK}::int, ${userId}::int)` : Promise.resolve()]);
      } catch {
        // a broken connection: the server ends its session, and with it the lock
      }
      r.release();
    }
  };

  // ---- settings ---------------------------------------------------------------------------

  private async scopeId(tx: TransactionSql, ref: ScopeRef): Promise<number> {
    if (ref.scope === 'global') return 0;
    if (ref.name === null) throw new AppError('USAGE', `${ref.scope} scope needs a name`);
    if (ref.scope === 'domain') return this.mustDomain(tx, normaliseDomain(ref.name), 'share');
    return (await this.mustUserIn(tx, ref.name, 'share')).id;
  }

  async setSetting(ref: ScopeRef, module: string, key: string, value: Json, flags: readonly Flag[]): Promise<void> {
    const v = JSON.stringify(value);
    const f = flags.join(',');
    return this.write(async (tx) => {
      const id = await this.scopeId(tx, ref);
      await tx`INSERT INTO settings (scope, scope_id, module, key, value, flags) VALUES (${ref.scope}, ${id}, ${module}, ${key}, ${v}, ${f})
               ON CONFLICT (scope, scope_id, module, key) DO UPDATE SET value = excluded.value, flags = excluded.flags`;
    });
  }

  async unsetSetting(ref: ScopeRef, module: string, key: string): Promise<boolean> {
    return this.write(async (tx) => {
      const id = await this.scopeId(tx, ref);
      return (await tx`DELETE FROM settings WHERE scope = ${ref.scope} AND scope_id = ${id} AND module = ${module} AND key = ${key}`).count > 0;
    });
  }

  async rowsFor(ref: ScopeRef): Promise<SettingRow[]> {
    if (ref.scope === 'user') {
      const l = await this.lookup(ref.name ?? '');
      if (!l) throw new AppError('NO_SUCH_USER', `no such user: ${ref.name ?? ''}`);
      return l.rows;
    }
    if (ref.scope === 'global') {
      return this.op(async () => (await this.sql<SettingDbRow[]>`SELECT scope, module, key, value, flags FROM settings WHERE scope = 'global' AND scope_id = 0`).map(toSetting));
    }
    if (ref.name === null) throw new AppError('USAGE', 'domain scope needs a name');
    const n = normaliseDomain(ref.name);
    return this.write(async (tx) => {
      const id = await this.mustDomain(tx, n, null);
      return (
        await tx<SettingDbRow[]>`SELECT scope, module, key, value, flags FROM settings
                                  WHERE (scope = 'global' AND scope_id = 0) OR (scope = 'domain' AND scope_id = ${id})`
      ).map(toSetting);
    });
  }

  async lookup(address: string): Promise<{ user: UserRecord; rows: SettingRow[] } | null> {
    dbUserReads.inc();
    return this.op(async () => {
      // one statement, prepared once per connection: the user, then every setting row that applies
      const rs = await this.sql<LookupRow[]>`
        SELECT u.id, u.address, d.name AS domain, u.domain_id, u.password, u.state, u.home, u.allocation, u.version, u.created, u.moving_to,
               s.scope AS s_scope, s.module AS s_module, s.key AS s_key, s.value AS s_value, s.flags AS s_flags
          FROM users u JOIN domains d ON d.id = u.domain_id
          LEFT JOIN settings s ON (s.scope = 'global' AND s.scope_id = 0)
                               OR (s.scope = 'domain' AND s.scope_id = u.domain_id)
                               OR (s.scope = 'user' AND s.scope_id = u.id)
         WHERE u.address = ${address}`;
      return toLookup(rs);
    });
  }

  async settingRows(module: string, key: string): Promise<(SettingRow & { name: string | null })[]> {
    return this.op(async () =>
      (
        await this.sql<(SettingDbRow & { name: string | null })[]>`
          SELECT s.scope, s.module, s.key, s.value, s.flags,
                 CASE s.scope WHEN 'domain' THEN d.name WHEN 'user' THEN u.address END AS name
            FROM settings s
            LEFT JOIN domains d ON s.scope = 'domain' AND d.id = s.scope_id
            LEFT JOIN users u ON s.scope = 'user' AND u.id = s.scope_id
           WHERE s.module = ${module} AND s.key = ${key}
           ORDER BY CASE s.scope WHEN 'global' THEN 0 WHEN 'domain' THEN 1 ELSE 2 END, name COLLATE "C"`
      ).map((r) => ({ ...toSetting(r), name: r.name })),
    );
  }

  // ---- nodes ------------------------------------------------------------------------------

  async listNodes(): Promise<NodeRow[]> {
    return this.op(async () => (await this.sql<NodeDbRow[]>`SELECT * FROM nodes ORDER BY name COLLATE "C"`).map(toNode));
  }

  async getNode(name: string): Promise<NodeRow | null> {
    return this.op(async () => {
      const [r] = await this.sql<NodeDbRow[]>`SELECT * FROM nodes WHERE name = ${name}`;
      return r ? toNode(r) : null;
    });
  }

  async revokedFingerprints(): Promise<Set<string>> {
    return this.op(async () => new Set((await this.sql<{ fingerprint: string }[]>`SELECT fingerprint FROM revoked`).map((r) => r.fingerprint)));
  }

  async usersPerNode(): Promise<Map<string, number>> {
    return this.op(async () => {
      const rows = await this.sql<{ home: string; n: number }[]>`SELECT home, count(*)::int AS n FROM users WHERE home IS NOT NULL GROUP BY home`;
      return new Map(rows.map((r) => [r.home, r.n]));
    });
  }

  /** A write that inserts a row another writer may insert at the same moment: once more on a unique violation. */
  private async writeOrRetry<T>(fn: (tx: TransactionSql) => Promise<T>): Promise<T> {
    try {
      return await this.write(fn);
    } catch (e) {
      if (pgCode(e) !== '23505') throw e;
      return this.write(fn);
    }
  }

  async registerSelf(me: SelfRegistration, opts: { heartbeat: boolean }): Promise<{ created: boolean; promoted: boolean; state: NodeState }> {
    return this.writeOrRetry(async (tx) => {
      const [rev] = await tx<{ node: string; at: string }[]>`SELECT node, at FROM revoked WHERE fingerprint = ${me.fingerprint}`;
      if (rev) {
        throw new AppError(
          'NODE_REMOVED',
          `this node's certificate was revoked when node ${rev.node} was removed from the cluster (${rev.at}); issue a new certificate with "pigeon cert issue ${me.name} --out DIR" on the CA holder`,
        );
      }
      const [row] = await tx<NodeDbRow[]>`SELECT * FROM nodes WHERE name = ${me.name} FOR UPDATE`;
      if (!row) {
        await tx`INSERT INTO nodes (name, peer_address, fingerprint, state, last_seen, cert_expires)
                 VALUES (${me.name}, ${me.peerAddress}, ${me.fingerprint}, 'active', ${opts.heartbeat ? tx`pigeon_now()` : null}, ${me.certExpires})`;
        return { created: true, promoted: false, state: 'active' as NodeState };
      }
      const promoted = reRegistration(row, me);
      await tx`UPDATE nodes SET fingerprint = ${me.fingerprint},
                 next_fingerprint = CASE WHEN next_fingerprint = ${me.fingerprint} THEN NULL ELSE next_fingerprint END,
                 cert_expires = ${me.certExpires}, peer_address = coalesce(${me.peerAddress}, peer_address),
                 last_seen = ${opts.heartbeat ? tx`pigeon_now()` : tx`last_seen`}
               WHERE name = ${me.name}`;
      return { created: false, promoted, state: toNode(row).state };
    });
  }

  async unregisterUnseen(name: string, fingerprint: string): Promise<void> {
    return this.op(async () => {
      await this.sql`DELETE FROM nodes WHERE name = ${name} AND fingerprint = ${fingerprint} AND last_seen IS NULL`;
    });
  }

  async heartbeat(name: string): Promise<void> {
    return this.op(async () => {
      await this.sql`UPDATE nodes SET last_seen = pigeon_now() WHERE name = ${name}`;
    });
  }

  async announceCertificate(name: string, fingerprint: string, certExpires: string): Promise<'new' | 'next'> {
    return this.writeOrRetry(async (tx) => {
      const [row] = await tx<NodeDbRow[]>`SELECT * FROM nodes WHERE name = ${name} FOR UPDATE`;
      if (!row) {
        await tx`INSERT INTO nodes (name, fingerprint, state, cert_expires) VALUES (${name}, ${fingerprint}, 'active', ${certExpires})`;
        return 'new' as const;
      }
      await tx`UPDATE nodes SET next_fingerprint = ${fingerprint} WHERE name = ${name}`;
      return 'next' as const;
    });
  }

  async setNodeState(name: string, state: NodeState): Promise<NodeRow> {
    return this.op(async () => {
      const [r] = await this.sql<NodeDbRow[]>`UPDATE nodes SET state = ${state} WHERE name = ${name} RETURNING *`;
      if (!r) throw new AppError('NO_SUCH_NODE', `no such node: ${name} (see "pigeon node list")`);
      return toNode(r);
    });
  }

  async removeNode(name: string): Promise<{ revoked: number }> {
    return this.write(async (tx) => {
      const [row] = await tx<NodeDbRow[]>`SELECT * FROM nodes WHERE name = ${name} FOR UPDATE`;
      if (!row) throw new AppError('NO_SUCH_NODE', `no such node: ${name} (see "pigeon node list")`);
      // no allocation or move onto this node may commit between the count and the delete
      await tx`LOCK TABLE users IN SHARE MODE`;
      const [c] = await tx<{ n: number }[]>`SELECT count(*)::int AS n FROM users WHERE home = ${name} OR moving_to = ${name}`;
      const n = c?.n ?? 0;
      if (n > 0) {
        throw new AppError(
          'NODE_BUSY',
          `node ${name} still holds ${n} user mailbox(es); move them first ("pigeon user move ADDR --to NODE"), or "pigeon node disable ${name}" to stop its links now`,
        );
      }
      let revoked = 0;
      for (const fp of [row.fingerprint, row.next_fingerprint]) {
        if (fp === null) continue;
        await tx`INSERT INTO revoked (fingerprint, node) VALUES (${fp}, ${name}) ON CONFLICT (fingerprint) DO NOTHING`;
        revoked++;
      }
      await tx`DELETE FROM nodes WHERE name = ${name}`;
      return { revoked };
    });
  }

  // ---- change notifications ---------------------------------------------------------------

  onChange(fn: (c: StoreChange) => void): () => void {
    this.subscribers.add(fn);
    this.listen(0);
    return () => {
      this.subscribers.delete(fn);
      if (this.subscribers.size > 0) return;
      // the last one gone: no LISTEN connection keeps the process alive any more
      const l = this.listenSql;
      this.listenSql = null;
      this.listenState = 'off';
      this.listenDownSince = 0;
      if (this.listenTimer) clearTimeout(this.listenTimer);
      this.listenTimer = null;
      if (this.listenCheck) clearInterval(this.listenCheck);
      this.listenCheck = null;
      this.listenChecking = false; // a check still on its way belongs to the pool ended here
      l?.end({ timeout: 1 }).catch(() => undefined);
    };
  }

  private emit(c: StoreChange): void {
    for (const s of [...this.subscribers]) {
      try {
        s(c);
      } catch {
        // a subscriber's bug must not stop the others
      }
    }
  }

  private onNotify(channel: string, payload: string): void {
    if (channel !== CHANGE_CHANNEL) return;
    if (payload === 'nodes') this.emit({ kind: 'nodes' });
    else if (payload.startsWith('user:')) this.emit({ kind: 'user', address: payload.slice(5) });
  }

  /**
   * LISTEN on the store's own one-connection pool; when that connection closes, LISTEN again
   * (the pool reconnects, to the new primary after a fail-over), pausing between failed tries.
   * Every LISTEN that takes effect, the first one too, tells subscribers { kind: 'nodes' }: a
   * change committed after onChange() returned but before the LISTEN took effect (or while the
   * connection was lost) was not notified. The first one matters as much as the others: its
   * connection is made while the subscriber already relies on it, and during a fail-over it can
   * take effect only on the promoted standby (two suites at once lost the registration made
   * meanwhile, and a fail-over test waited for ever). `log` gets one line when notifications
   * stop (or cannot start) and one when they are back, never one per attempt.
   */
  private listen(attempt: number): void {
    if (this.closed || this.listenState !== 'off' || this.subscribers.size === 0 || this.listenTimer) return;
    this.listenState = 'starting';
    this.listenLostWhileStarting = false;
    if (this.listenSql === null) {
      // while subscribed, the LISTEN connection (and a pending re-LISTEN) keeps the process alive
      const pool: Sql = postgres({
        ...this.base,
        max: 1,
        min: 0,
        idle_timeout: null,
        max_lifetime: null,
        prepare: false,
        unref_sockets: false,
        onnotify: (channel, payload) => this.onNotify(channel, payload),
        onclose: () => {
          if (this.listenSql === pool) this.listenLost();
        },
      });
      this.listenSql = pool;
    }
    const pool = this.listenSql;
    pool`LISTEN pigeon_change`.then(
      () => {
        if (this.listenSql !== pool) return;
        if (this.listenLostWhileStarting) {
          this.listenState = 'off';
          this.listen(attempt + 1);
          return;
        }
        this.listenState = 'live';
        this.listenCheck ??= setInterval(() => this.checkListen(), this.o.listenCheckMs).unref();
        this.up();
        if (this.listenDownSince !== 0) {
          this.o.log('info', `database ${this.where}: change notifications work again (after ${Math.round((Date.now() - this.listenDownSince) / 1000)} s); subscribers re-read what may have changed meanwhile`);
          this.listenDownSince = 0;
        }
        this.emit({ kind: 'nodes' });
      },
      (e: unknown) => {
        if (this.listenSql !== pool) return;
        this.listenState = 'off';
        this.fail(e);
        if (this.closed) return;
        this.listenDown('LISTEN failed');
        this.listenTimer = setTimeout(
          () => {
            this.listenTimer = null;
            this.listen(attempt + 1);
          },
          Math.min(this.o.reconnectMaxMs, 20 * 2 ** attempt),
        );
      },
    );
  }

  private listenLost(): void {
    if (this.listenState === 'starting') this.listenLostWhileStarting = true;
    if (this.listenState !== 'live') return;
    this.listenState = 'off';
    this.listenDown('the LISTEN connection closed');
    this.listen(1);
  }

  /**
   * A LISTEN connection only receives: one whose server went away without a word (a partition
   * that drops packets, a server or backend that hangs) would never be noticed by TCP before its
   * keepalive gives up (30 s + 9 × 75 s with Linux's defaults; Node 20 sets only the first).
   * So it is asked a `SELECT 1` every listenCheckMs: an answer proves it; none within the query
   * timeout makes the client cancel, and a cancel unanswered within the cancel timeout makes it
   * destroy the connection (postgres.js CANCEL_UNANSWERED), whose close is a loss like any
   * other (listenLost: logged once, LISTEN again, subscribers re-read). The failure itself is
   * not the database's state: the other pools say whether the database is down.
   */
  private checkListen(): void {
    const pool = this.listenSql;
    if (pool === null || this.listenState !== 'live' || this.listenChecking) return;
    this.listenChecking = true;
    pool`SELECT 1 AS listen_check`.then(
      () => (this.listenChecking = false),
      () => (this.listenChecking = false),
    );
  }

  /** The one line for "notifications do not arrive" (until the next LISTEN takes effect). */
  private listenDown(why: string): void {
    if (this.listenDownSince !== 0 || this.closed) return;
    this.listenDownSince = Date.now();
    this.o.log('warn', `database ${this.where}: change notifications do not arrive (${why}); listening again, subscribers re-read what changed when they do`);
  }

  // ---- schema and copy --------------------------------------------------------------------

  async serverInfo(): Promise<ServerInfo> {
    return this.op(async () => {
      const [r] = await this.sql<{ v: string; standby: boolean; addr: string | null; port: number | null; usr: string; db: string }[]>`
        SELECT current_setting('server_version') AS v, pg_is_in_recovery() AS standby, host(inet_server_addr()) AS addr,
               inet_server_port() AS port, current_user AS usr, current_database() AS db`;
      if (!r) throw new AppError('DB_UNAVAILABLE', `database ${this.where}: no answer`);
      const server = r.addr === null ? `unix socket ${this.socket ?? ''}`.trim() : `${r.addr.includes(':') ? `[${r.addr}]` : r.addr}:${r.port ?? ''}`;
      return { engine: `PostgreSQL ${r.v}`, role: r.standby ? 'standby' : 'primary', server, user: r.usr, database: r.db };
    });
  }

  async schemaStatus(): Promise<SchemaStatus> {
    return this.op(async () => ({ version: await schemaVersion(this.sql), minUsable: PG_MIN_USABLE_VERSION, latest: PG_SCHEMA_VERSION }));
  }

  async migrate(): Promise<{ from: number; to: number }> {
    const r = await this.write((tx) => migrateIn(tx));
    if (r.from > PG_SCHEMA_VERSION) {
      throw new AppError('DB_SCHEMA', `database ${this.where} has schema version ${r.from}, newer than this pigeon (${PG_SCHEMA_VERSION}); upgrade pigeon`);
    }
    return r;
  }

  async dump(): Promise<TableDump[]> {
    return this.op(async () =>
      (await this.sql.begin('isolation level repeatable read read only', async (tx) => {
        const out: TableDump[] = [];
        for (const table of TABLE_ORDER) {
          const t = TABLES[table];
          const rows = await tx.unsafe<Record<string, string | number | null>[]>(`SELECT ${t.columns.join(', ')} FROM ${table} ORDER BY ${t.key}`);
          out.push({ table, rows: rows.map((r) => ({ ...r })) });
        }
        return out;
      })) as TableDump[],
    );
  }

  async load(tables: readonly TableDump[]): Promise<void> {
    const byName = new Map<string, TableDump>();
    for (const t of tables) {
      if (!(t.table in TABLES)) throw new AppError('INVALID_VALUE', `load: unknown table ${JSON.stringify(String(t.table))}`);
      if (byName.has(t.table)) throw new AppError('INVALID_VALUE', `load: table ${t.table} given twice`);
      const want = [...TABLES[t.table].columns].sort().join(',');
      t.rows.forEach((r, i) => {
        const got = Object.keys(r).sort().join(',');
        if (got !== want) throw new AppError('INVALID_VALUE', `load: table ${t.table}, row ${i + 1}: columns ${got}, expected ${want}`);
        for (const v of Object.values(r)) {
          if (v !== null && typeof v !== 'string' && typeof v !== 'number') throw new AppError('INVALID_VALUE', `load: table ${t.table}, row ${i + 1}: a value is neither text, number nor null`);
        }
      });
      byName.set(t.table, t);
    }
    const version = (await this.schemaStatus()).version;
    if (version !== PG_SCHEMA_VERSION) {
      throw new AppError('DB_SCHEMA', `database ${this.where} is at schema version ${version}, not ${PG_SCHEMA_VERSION}: run "pigeon db migrate" on it first`);
    }
    await this.write(async (tx) => {
      await tx.unsafe(`LOCK TABLE ${TABLE_ORDER.join(', ')} IN EXCLUSIVE MODE`);
      const counts: string[] = [];
      for (const table of TABLE_ORDER) {
        const [c] = await tx.unsafe<{ n: number }[]>(`SELECT count(*)::int AS n FROM ${table}`);
        if (c && c.n > 0) counts.push(`${table}: ${c.n} row(s)`);
      }
      if (counts.length > 0) throw new AppError('DUPLICATE', `database ${this.where} is not empty (${counts.join(', ')}); load copies into an empty database only`);
      for (const table of TABLE_ORDER) {
        const t = byName.get(table);
        if (!t) continue;
        const columns = TABLES[table].columns;
        for (let i = 0; i < t.rows.length; i += 500) {
          const chunk = t.rows.slice(i, i + 500);
          try {
            await tx`INSERT INTO ${tx(table)} ${tx(chunk as Record<string, string | number | null>[], ...columns)}`;
          } catch (e) {
            const code = pgCode(e);
            if (code.startsWith('22') || code.startsWith('23')) {
              throw new AppError('INVALID_VALUE', `load: table ${table}, rows ${i + 1}–${i + chunk.length}: ${(e as Error).message}`);
            }
            throw e;
          }
        }
      }
      // explicit ids were inserted: the next generated id continues after the largest
      for (const table of ['domains', 'users'] as const) {
        await tx.unsafe(`SELECT setval(pg_get_serial_sequence('${table}', 'id'), coalesce(max(id), 0) + 1, false) FROM ${table}`);
      }
    });
  }
}

/** Methods of a view that are not bounded by its deadline. */
const UNBOUNDED = new Set<PropertyKey>(['kind', 'where', 'close', 'onChange', 'withDeadline', 'userLock']);

function deadlineView(store: ConfigStore, deadline: number): ConfigStore {
  return new Proxy(store, {
    get(target, prop, receiver) {
      if (prop === 'close') return async () => undefined; // a view owns no connection
      if (prop === 'withDeadline') return (d: number) => deadlineView(target, Math.min(d, deadline));
      const v: unknown = Reflect.get(target, prop, receiver);
      if (typeof v !== 'function' || UNBOUNDED.has(prop)) return v;
      return (...args: unknown[]) => {
        const left = deadline - Date.now();
        const p = (v as (...a: unknown[]) => Promise<unknown>).apply(target, args);
        if (left <= 0) return p; // one try, no waiting beyond the store's own timeouts
        let timer: NodeJS.Timeout | undefined;
        const late = new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new AppError('DB_UNAVAILABLE', `database ${target.where} did not answer in time`)), left);
        });
        return Promise.race([p, late]).finally(() => clearTimeout(timer));
      };
    },
  });
}

/** The entry src/store.ts `openStore` loads for postgres:// URLs; `create` (pigeon init) migrates. */
export async function open(url: string, opts: { readonly create?: boolean; readonly pg?: PostgresStoreOptions } = {}): Promise<ConfigStore> {
  const store = await openPostgresStore(url, opts.pg ?? {});
  if (opts.create === true) {
    try {
      await store.migrate();
    } catch (e) {
      await store.close();
      throw e;
    }
  }
  return store;
}

/**
 * A PostgreSQL store for `url` (postgres:// or postgresql://). Connects lazily: the first
 * operation opens the pool (and keeps `poolMin` connections warm from then on).
 */
export async function openPostgresStore(url: string, opts: PostgresStoreOptions = {}): Promise<ConfigStore> {
  const u = parsePgUrl(url);
  return new PostgresStore(u, resolveOptions(opts, u));
}
