/**
 * NAME        src/store/rows — the row shapes both stores read, and their conversion to records
 * DESCRIPTION SQLite (src/store/sqlite.ts) and PostgreSQL (src/store/postgres.ts) keep the same
 *             tables and columns; a row read from either becomes the same UserRecord, SettingRow
 *             or NodeRow here (allocation and setting values are JSON text in both).
 */
import type { Scope } from '../settings.js';
import type { Allocation, UserRecord, NodeRow, Flag, SettingRow, Json, SelfRegistration } from './types.js';
import { AppError } from '../errors.js';

export interface UserRow {
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

export interface SettingDbRow {
  scope: Scope;
  module: string;
  key: string;
  value: string;
  flags: string;
}

export interface NodeDbRow {
  name: string;
  peer_address: string | null;
  fingerprint: string | null;
  next_fingerprint: string | null;
  state: string;
  last_seen: string | null;
  cert_expires: string | null;
}

export function toUser(r: UserRow): UserRecord {
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

export function parseFlags(s: string): Flag[] {
  return s.split(',').filter((f): f is Flag => f === 'override' || f === 'ignore');
}

export function toSetting(r: SettingDbRow): SettingRow {
  return { scope: r.scope, module: r.module, key: r.key, value: JSON.parse(r.value) as Json, flags: parseFlags(r.flags) };
}

/** A row of the one-statement lookup: the user, and one setting row that applies (null: none). */
export type LookupRow = UserRow & { s_scope: Scope | null; s_module: string | null; s_key: string | null; s_value: string | null; s_flags: string | null };

/** The rows of a lookup as the user and its setting rows; null when there is no such user. */
export function toLookup(rs: readonly LookupRow[]): { user: UserRecord; rows: SettingRow[] } | null {
  const first = rs[0];
  if (!first) return null;
  const rows: SettingRow[] = [];
  for (const r of rs) {
    if (r.s_scope === null || r.s_module === null || r.s_key === null || r.s_value === null) continue;
    rows.push(toSetting({ scope: r.s_scope, module: r.s_module, key: r.s_key, value: r.s_value, flags: r.s_flags ?? '' }));
  }
  return { user: toUser(first), rows };
}

export function toNode(r: NodeDbRow): NodeRow {
  return {
    name: r.name,
    peerAddress: r.peer_address,
    fingerprint: r.fingerprint,
    nextFingerprint: r.next_fingerprint,
    state: r.state === 'disabled' ? 'disabled' : 'active',
    lastSeen: r.last_seen,
    certExpires: r.cert_expires,
  };
}


/**
 * A node registering itself again (`registerSelf`): whether its certificate is the re-issued one
 * recorded as next (or the row had none yet), which it then promotes; the same certificate is no
 * change. Another certificate under this name is a second node with the same name: NODE_CONFLICT.
 */
export function reRegistration(row: Pick<NodeDbRow, 'fingerprint' | 'next_fingerprint'>, me: SelfRegistration): boolean {
  if (row.fingerprint === me.fingerprint) return false;
  if (row.next_fingerprint === me.fingerprint || row.fingerprint === null) return true;
  throw new AppError(
    'NODE_CONFLICT',
    `node name ${me.name} is already registered with another certificate (fingerprint ${row.fingerprint.slice(0, 23)}…): two nodes cannot share a name; choose another --node, or re-issue with "pigeon cert issue ${me.name}"`,
  );
}
