/**
 * NAME        src/peer/duties — what `pigeon serve` does as a cluster member
 * DESCRIPTION At start (once, before workers fork) `registerAtStart` checks this node's certificate
 *             against the cluster CA and registers the node: name, peer address (peer.advertise,
 *             else the peer= listener's), fingerprint, certificate expiry. A new node joins this
 *             way, without touching the others. In every worker `startDuties` refreshes the cached
 *             registry every second (links of disabled or removed nodes close), keeps `last_seen`
 *             fresh every HEARTBEAT_S seconds. Registry
 *             changes arrive through the store's onChange (PostgreSQL: LISTEN/NOTIFY) at once; the
 *             one-second refresh is the fallback for a lost notification.
 * DIAGNOSTICS AppError CONFIG_INVALID (certificate), NODE_CONFLICT, NODE_REMOVED: serve exits 78.
 *             A duty that fails while the database is away logs one line when it starts failing
 *             and one when it works again, not one per try (dutyLog).
 */
import type { Instance } from '../instance.js';
import type { Logger } from '../log.js';
import type { NodeDirectory } from '../nodes.js';
import type { Store } from '../store.js';
import { openInstanceStore } from '../context.js';
import { AppError } from '../errors.js';
import { HEARTBEAT_S } from '../nodes.js';
import { EXPIRY_WARN_DAYS } from '../../certs/verify.js';

export const REGISTRY_REFRESH_MS = 1000;

/** The address other nodes use to reach this one, or null without a peer listener. */
export function peerAddress(instance: Instance): string | null {
  if (instance.config.peer.advertise !== null) return instance.config.peer.advertise;
  const l = instance.config.listen.find((x) => x.protocol === 'peer');
  if (!l || l.host === null) return null;
  if (l.port === 0) throw new AppError('CONFIG_INVALID', `${instance.file}: the peer listener needs a fixed port (other nodes connect to it), not ${l.host}:0`);
  if (l.host === '0.0.0.0' || l.host === '::' || l.host === '') {
    throw new AppError('CONFIG_INVALID', `${instance.file}: peer listener on ${l.host}:${l.port} is not an address other nodes can reach; set peer.advertise: HOST:PORT`);
  }
  return l.host.includes(':') ? `[${l.host}]:${l.port}` : `${l.host}:${l.port}`;
}

/**
 * Before any worker: the checks `config test` runs too (src/config-check.ts checkStart), then the
 * registration. A failed check throws its AppError (every problem named; serve exits 78).
 */
export async function registerAtStart(instance: Instance): Promise<{ lines: string[] }> {
  // the schema must be one this code can run on (checked once, before any worker starts)
  const store = await openInstanceStore(instance, { checkSchema: true });
  const lines: string[] = [];
  try {
    const { checkStart } = await import('../config-check.js');
    const { creds, failures } = await checkStart(instance, store, { lines: [], warnings: [], problems: [] });
    const first = failures[0];
    if (first !== undefined || creds === null) {
      const all = failures.map((f) => f.message);
      throw new AppError(first?.code ?? 'CONFIG_INVALID', all.length > 1 ? `${all.length} problems (pigeon config test lists them): ${all.join('; ')}` : (all[0] ?? 'node certificate unusable'));
    }
    const r = await store.registerSelf(
      { name: instance.config.node, fingerprint: creds.fingerprint, certExpires: creds.notAfter.toISOString(), peerAddress: peerAddress(instance) },
      { heartbeat: true },
    );
    if (r.created) lines.push(`node ${instance.config.node} registered in the cluster`);
    if (r.promoted) lines.push(`node ${instance.config.node} now uses its re-issued certificate`);
    if (r.state === 'disabled') lines.push(`warning: node ${instance.config.node} is disabled in the cluster: other nodes refuse its links ("pigeon node enable ${instance.config.node}")`);
    const days = Math.floor((creds.notAfter.getTime() - Date.now()) / 86400_000);
    if (days < EXPIRY_WARN_DAYS) lines.push(`warning: this node's certificate expires in ${days} days; re-issue it with "pigeon cert issue ${instance.config.node} --out DIR" on the CA holder`);
  } finally {
    await store.close();
  }
  return { lines };
}

/**
 * The log of a periodic duty: one line when it starts failing (with the first error), one when
 * it works again; the tries in between are silent (a database down for an hour is two lines).
 */
export function dutyLog(log: (level: 'info' | 'warn', message: string) => void, what: string): { ok(): void; failed(e: unknown): void } {
  let failing: { since: number; tries: number } | null = null;
  return {
    ok() {
      if (failing === null) return;
      log('info', `${what} works again (after ${failing.tries} failed tries in ${Math.round((Date.now() - failing.since) / 1000)} s)`);
      failing = null;
    },
    failed(e) {
      if (failing !== null) {
        failing.tries++;
        return;
      }
      failing = { since: Date.now(), tries: 1 };
      log('warn', `${what} failed: ${e instanceof Error ? e.message : String(e)} (retrying; logged again when it works)`);
    },
  };
}

/** Per worker: registry refresh and heartbeat (read at each use: a reload swaps instance and log). */
export function startDuties(env: { readonly instance: Instance; readonly store: Store; readonly nodes: NodeDirectory; readonly log: Logger }): void {
  const registry = dutyLog((level, m) => env.log.log(level, 'peer', m), 'node registry refresh');
  env.nodes.onRefresh(() => registry.ok());
  env.nodes.start(REGISTRY_REFRESH_MS, (e) => registry.failed(e));
  const beat = dutyLog((level, m) => env.log.log(level, 'peer', m), 'heartbeat');
  // every worker beats (one UPDATE per HEARTBEAT_S each): the node stays "up" while any worker lives
  let beating = false;
  const t = setInterval(() => {
    if (beating) return; // the last one still waits for a locked database (without blocking anything)
    beating = true;
    env.store.heartbeat(env.instance.config.node).then(
      () => {
        beating = false;
        beat.ok();
      },
      (e: unknown) => {
        beating = false;
        beat.failed(e);
      },
    );
  }, HEARTBEAT_S * 1000);
  t.unref();
}
