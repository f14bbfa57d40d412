/**
 * NAME        src/nodes — the node registry: who is in the cluster, with which certificate
 * DESCRIPTION One row per node in the shared database: name, peer address, the SHA-256
 *             fingerprint of its host certificate (and the next one during a re-issue), state
 *             (`active` | `disabled`), last seen, certificate expiry. Removed nodes leave their
 *             fingerprints in `revoked`, so a removed node that comes back is refused.
 *             The rows are read and written through the store (src/store.ts: registerSelf is
 *             what `pigeon serve` does at start, a new node registers itself); `NodeDirectory` is
 *             a process's cached view, refreshed on a timer and on change notifications by the
 *             daemon so a peer session costs no database read, and so a disabled node's links
 *             close at once.
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

/** A node is up when it was seen within this many seconds (serve refreshes every HEARTBEAT_S). */
export const HEARTBEAT_S = 10;
export const UP_WITHIN_S = 3 * HEARTBEAT_S;
const MISS_REFRESH_MS = 250;

const NAME_RE = /^[a-z0-9][a-z0-9.-]{0,62}$/i;

export function checkNodeName(name: string, what = 'node name'): string {
  if (!NAME_RE.test(name)) throw new AppError('USAGE', `invalid ${what} ${JSON.stringify(name)}: letters, digits, dots and hyphens`);
  return name;
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

export type PeerCheck = { ok: true; node: NodeRow } | { ok: false; reason: string };

/**
 * A process's view of the registry, with no SQL of its own: it asks the store. The daemon
 * refreshes it every `refreshMs` on a timer and at once when the store reports a registry change
 * (`onChange`), so the peer path reads no database; one-shot processes (deliver, a CLI) load it
 * once on first use. A node missing from the view (or not usable in it) triggers one refresh,
 * at most every MISS_REFRESH_MS.
 */
export class NodeDirectory {
  private nodes = new Map<string, NodeRow>();
  private revoked = new Set<string>();
  private loadedAt = 0;
  private loading: Promise<void> | null = null;
  private timer: NodeJS.Timeout | null = null;
  private unsubscribe: (() => void) | null = null;
  private readonly listeners: (() => void)[] = [];

  private readonly store: Store;

  constructor(store: Store) {
    this.store = store;
  }

  /** Re-read the registry (concurrent callers share one read). */
  refresh(): Promise<void> {
    this.loading ??= (async () => {
      try {
        const [ns, revoked] = await Promise.all([this.store.listNodes(), this.store.revokedFingerprints()]);
        this.revoked = revoked;
        this.nodes = new Map(ns.map((n) => [n.name, n]));
        this.loadedAt = Date.now();
      } finally {
        this.loading = null;
      }
      for (const l of this.listeners) l();
    })();
    return this.loading;
  }

  /** Refresh every `ms` (the daemon) and on every registry change; a failed refresh keeps the last view. */
  start(ms: number, onError: (e: unknown) => void): void {
    if (this.timer) return;
    const go = (): void => {
      this.refresh().catch(onError);
    };
    this.timer = setInterval(go, ms);
    this.timer.unref();
    this.unsubscribe = this.store.onChange((c) => {
      if (c.kind === 'nodes') go();
    });
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    this.unsubscribe?.();
    this.unsubscribe = null;
  }

  /** Called after every refresh (to close links of nodes that were disabled or removed). */
  onRefresh(fn: () => void): void {
    this.listeners.push(fn);
  }

  private async ensure(): Promise<void> {
    if (this.loadedAt === 0) await this.refresh();
  }

  /**
   * A node that just joined (or just got a peer address) may be newer than this view: on a miss,
   * re-read the registry once, at most every MISS_REFRESH_MS (a stranger cannot force a read storm).
   */
  private async refreshOnMiss(): Promise<boolean> {
    if (Date.now() - this.loadedAt < MISS_REFRESH_MS) return false;
    await this.refresh();
    return true;
  }

  async get(name: string): Promise<NodeRow | null> {
    await this.ensure();
    const n = this.nodes.get(name);
    if ((!n || n.peerAddress === null || n.state !== 'active') && (await this.refreshOnMiss())) return this.nodes.get(name) ?? null;
    return n ?? null;
  }

  async all(): Promise<NodeRow[]> {
    await this.ensure();
    return [...this.nodes.values()];
  }

  /**
   * May a peer presenting a certificate with this fingerprint, naming itself `name`, use a link?
   * Only a registered, enabled node whose current (or announced next) fingerprint matches.
   */
  async check(name: string, fingerprint: string): Promise<PeerCheck> {
    await this.ensure();
    const first = this.checkCached(name, fingerprint);
    if (first.ok || this.revoked.has(fingerprint) || !(await this.refreshOnMiss())) return first;
    return this.checkCached(name, fingerprint);
  }

  /** `check` against the view as it is, without reading anything (after a refresh). */
  checkCached(name: string, fingerprint: string): PeerCheck {
    if (this.revoked.has(fingerprint)) return { ok: false, reason: `certificate of ${name} is revoked (node removed)` };
    const n = this.nodes.get(name);
    if (!n) return { ok: false, reason: `node ${name} is not registered` };
    if (n.state !== 'active') return { ok: false, reason: `node ${name} is ${n.state}` };
    if (n.fingerprint !== fingerprint && n.nextFingerprint !== fingerprint) return { ok: false, reason: `certificate of ${name} does not match its registered fingerprint` };
    return { ok: true, node: n };
  }
}
