/**
 * NAME        src/nodes — the node registry: who is in the cluster, with which certificate
 * DESCRIPTION One row per node in the shared database: name, peer address, the SHA-256
 *             fingerprint of its host certificate (and the next one during a re-issue), state
 *             (`active` | `disabled`), last seen, certificate expiry. Removed nodes leave their
 *             fingerprints in `revoked`, so a removed node that comes back is refused.
 *             `registerSelf` is what `pigeon serve` does at start (a new node registers itself);
 *             `NodeDirectory` is a process's cached view, refreshed on a timer by the daemon so a
 *             peer session costs no database read, and so a disabled node's links close at once.
 * DIAGNOSTICS AppError NODE_CONFLICT (two nodes, one name), NODE_REMOVED (revoked certificate),
 *             NO_SUCH_NODE, NODE_BUSY (remove while users live there).
 */
import type { Store } from './store.js';
import { AppError } from './errors.js';

export type NodeState = 'active' | 'disabled';

export interface NodeRow {
  readonly name: string;
  readonly peerAddress: string | null;
  readonly fingerprint: string | null;
  readonly nextFingerprint: string | null;
  readonly state: NodeState;
  readonly lastSeen: string | null;
  readonly certExpires: string | null;
}

interface DbRow {
  name: string;
  peer_address: string | null;
  fingerprint: string | null;
  next_fingerprint: string | null;
  state: string;
  last_seen: string | null;
  cert_expires: string | null;
}

/** A node is up when it was seen within this many seconds (serve refreshes every HEARTBEAT_S). */
export const HEARTBEAT_S = 10;
export const UP_WITHIN_S = 3 * HEARTBEAT_S;
const MISS_REFRESH_MS = 250;

const NAME_RE = /^[a-z0-9][a-z0-9.-]{0,62}$/i;

export function checkNodeName(name: string, what = 'node name'): string {
  if (!NAME_RE.test(name)) throw new AppError('USAGE', `invalid ${what} ${JSON.stringify(name)}: letters, digits, dots and hyphens`);
  return name;
}

function toNode(r: DbRow): NodeRow {
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

const NOW = "strftime('%Y-%m-%dT%H:%M:%SZ','now')";

export function listNodes(store: Store): NodeRow[] {
  return store.read(() => store.db.prepare<[], DbRow>('SELECT * FROM nodes ORDER BY name').all().map(toNode));
}

export function getNode(store: Store, name: string): NodeRow | null {
  const r = store.read(() => store.db.prepare<[string], DbRow>('SELECT * FROM nodes WHERE name = ?').get(name));
  return r ? toNode(r) : null;
}

export function revokedFingerprints(store: Store): Set<string> {
  return new Set(store.read(() => store.db.prepare<[], { fingerprint: string }>('SELECT fingerprint FROM revoked').all().map((r) => r.fingerprint)));
}

/** How many users each node holds (for `node list` and the `fewest` placement). */
export function usersPerNode(store: Store): Map<string, number> {
  const rows = store.read(() => store.db.prepare<[], { home: string; n: number }>('SELECT home, count(*) AS n FROM users WHERE home IS NOT NULL GROUP BY home').all());
  return new Map(rows.map((r) => [r.home, r.n]));
}

export function isUp(n: NodeRow, now = Date.now()): boolean {
  if (n.lastSeen === null) return false;
  return now - Date.parse(n.lastSeen) <= UP_WITHIN_S * 1000;
}

export interface SelfRegistration {
  readonly name: string;
  readonly fingerprint: string;
  readonly certExpires: string;
  readonly peerAddress: string | null;
}

/**
 * Register this node at start (`pigeon serve`, `pigeon init`): insert its row, or refresh it.
 * Refuses a revoked certificate (the node was removed) and a name registered with another
 * certificate (two nodes with one name), unless the certificate is that row's announced next one
 * (`pigeon cert issue` re-issue), which is then promoted.
 */
export function registerSelf(store: Store, me: SelfRegistration, opts: { heartbeat: boolean }): { created: boolean; promoted: boolean; state: NodeState } {
  return store.write(() => {
    const rev = store.db.prepare<[string], { node: string; at: string }>('SELECT node, at FROM revoked WHERE fingerprint = ?').get(me.fingerprint);
    if (rev) {
      throw new AppError('NODE_REMOVED', `this node's certificate was revoked when node ${rev.node} was removed from the cluster (${rev.at}); issue a new certificate with "pigeon cert issue ${me.name} --out DIR" on the CA holder`);
    }
    const row = store.db.prepare<[string], DbRow>('SELECT * FROM nodes WHERE name = ?').get(me.name);
    const seen = opts.heartbeat ? NOW : 'NULL';
    if (!row) {
      store.db
        .prepare(`INSERT INTO nodes (name, peer_address, fingerprint, state, last_seen, cert_expires) VALUES (?, ?, ?, 'active', ${seen}, ?)`)
        .run(me.name, me.peerAddress, me.fingerprint, me.certExpires);
      return { created: true, promoted: false, state: 'active' as NodeState };
    }
    let promoted = false;
    if (row.fingerprint !== me.fingerprint) {
      if (row.next_fingerprint === me.fingerprint || row.fingerprint === null) promoted = true;
      else {
        throw new AppError(
          'NODE_CONFLICT',
          `node name ${me.name} is already registered with another certificate (fingerprint ${row.fingerprint.slice(0, 23)}…): two nodes cannot share a name; choose another --node, or re-issue with "pigeon cert issue ${me.name}"`,
        );
      }
    }
    store.db
      .prepare(
        `UPDATE nodes SET fingerprint = ?, next_fingerprint = CASE WHEN next_fingerprint = ? THEN NULL ELSE next_fingerprint END,
           cert_expires = ?, peer_address = coalesce(?, peer_address), last_seen = ${opts.heartbeat ? NOW : 'last_seen'} WHERE name = ?`,
      )
      .run(me.fingerprint, me.fingerprint, me.certExpires, me.peerAddress, me.name);
    return { created: false, promoted, state: toNode(row).state };
  });
}

export function heartbeat(store: Store, name: string): void {
  store.write(() => store.db.prepare(`UPDATE nodes SET last_seen = ${NOW} WHERE name = ?`).run(name));
}

/** `pigeon cert issue`: the new certificate becomes acceptable next to the current one. */
export function announceCertificate(store: Store, name: string, fingerprint: string, certExpires: string): 'new' | 'next' {
  return store.write(() => {
    const row = store.db.prepare<[string], DbRow>('SELECT * FROM nodes WHERE name = ?').get(name);
    if (!row) {
      store.db.prepare(`INSERT INTO nodes (name, fingerprint, state, cert_expires) VALUES (?, ?, 'active', ?)`).run(name, fingerprint, certExpires);
      return 'new' as const;
    }
    store.db.prepare('UPDATE nodes SET next_fingerprint = ? WHERE name = ?').run(fingerprint, name);
    return 'next' as const;
  });
}

export function setNodeState(store: Store, name: string, state: NodeState): NodeRow {
  return store.write(() => {
    const r = store.db.prepare(`UPDATE nodes SET state = ? WHERE name = ?`).run(state, name);
    if (r.changes === 0) throw new AppError('NO_SUCH_NODE', `no such node: ${name} (see "pigeon node list")`);
    return toNode(store.db.prepare<[string], DbRow>('SELECT * FROM nodes WHERE name = ?').get(name) as DbRow);
  });
}

/**
 * Remove a node: its certificates are revoked for good and its row deleted. Refused while users
 * live there (their mail would become unreachable): move them first.
 */
export function removeNode(store: Store, name: string): { revoked: number } {
  return store.write(() => {
    const row = store.db.prepare<[string], DbRow>('SELECT * FROM nodes WHERE name = ?').get(name);
    if (!row) throw new AppError('NO_SUCH_NODE', `no such node: ${name} (see "pigeon node list")`);
    const n = store.db.prepare<[string, string], { n: number }>('SELECT count(*) AS n FROM users WHERE home = ? OR moving_to = ?').get(name, name)?.n ?? 0;
    if (n > 0) {
      throw new AppError('NODE_BUSY', `node ${name} still holds ${n} user mailbox(es); move them first ("pigeon user move ADDR --to NODE"), or "pigeon node disable ${name}" to stop its links now`);
    }
    let revoked = 0;
    for (const fp of [row.fingerprint, row.next_fingerprint]) {
      if (fp === null) continue;
      store.db.prepare('INSERT OR IGNORE INTO revoked (fingerprint, node) VALUES (?, ?)').run(fp, name);
      revoked++;
    }
    store.db.prepare('DELETE FROM nodes WHERE name = ?').run(name);
    return { revoked };
  });
}

export type PeerCheck = { ok: true; node: NodeRow } | { ok: false; reason: string };

/**
 * A process's view of the registry. The daemon refreshes it every `refreshMs` on a timer, so the
 * peer path reads no database; one-shot processes (deliver, a CLI) load it once on first use.
 */
export class NodeDirectory {
  private nodes = new Map<string, NodeRow>();
  private revoked = new Set<string>();
  private loadedAt = 0;
  private timer: NodeJS.Timeout | null = null;
  private readonly listeners: (() => void)[] = [];

  private readonly store: Store;

  constructor(store: Store) {
    this.store = store;
  }

  refresh(): void {
    const ns = listNodes(this.store);
    this.revoked = revokedFingerprints(this.store);
    this.nodes = new Map(ns.map((n) => [n.name, n]));
    this.loadedAt = Date.now();
    for (const l of this.listeners) l();
  }

  /** Refresh every `ms` (the daemon); a failed refresh keeps the last view. */
  start(ms: number, onError: (e: unknown) => void): void {
    if (this.timer) return;
    this.timer = setInterval(() => {
      try {
        // no waiting for a locked database (it would stall the process): the next round retries
        this.store.tryNow(() => this.refresh());
      } catch (e) {
        onError(e);
      }
    }, ms);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  /** Called after every refresh (to close links of nodes that were disabled or removed). */
  onRefresh(fn: () => void): void {
    this.listeners.push(fn);
  }

  private ensure(): void {
    if (this.loadedAt === 0) this.refresh();
  }

  /**
   * A node that just joined (or just got a peer address) may be newer than this view: on a miss,
   * re-read the registry once, at most every MISS_REFRESH_MS (a stranger cannot force a read storm).
   */
  private refreshOnMiss(): boolean {
    if (Date.now() - this.loadedAt < MISS_REFRESH_MS) return false;
    this.refresh();
    return true;
  }

  get(name: string): NodeRow | null {
    this.ensure();
    const n = this.nodes.get(name);
    if ((!n || n.peerAddress === null || n.state !== 'active') && this.refreshOnMiss()) return this.nodes.get(name) ?? null;
    return n ?? null;
  }

  all(): NodeRow[] {
    this.ensure();
    return [...this.nodes.values()];
  }

  /**
   * May a peer presenting a certificate with this fingerprint, naming itself `name`, use a link?
   * Only a registered, enabled node whose current (or announced next) fingerprint matches.
   */
  check(name: string, fingerprint: string): PeerCheck {
    this.ensure();
    const first = this.checkCached(name, fingerprint);
    if (first.ok || this.revoked.has(fingerprint) || !this.refreshOnMiss()) return first;
    return this.checkCached(name, fingerprint);
  }

  private checkCached(name: string, fingerprint: string): PeerCheck {
    if (this.revoked.has(fingerprint)) return { ok: false, reason: `certificate of ${name} is revoked (node removed)` };
    const n = this.nodes.get(name);
    if (!n) return { ok: false, reason: `node ${name} is not registered` };
    if (n.state !== 'active') return { ok: false, reason: `node ${name} is ${n.state}` };
    if (n.fingerprint !== fingerprint && n.nextFingerprint !== fingerprint) return { ok: false, reason: `certificate of ${name} does not match its registered fingerprint` };
    return { ok: true, node: n };
  }
}
