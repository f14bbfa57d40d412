/**
 * NAME        src/metrics — the node's Prometheus metrics, served by a `metrics=HOST:PORT` listener
 * SYNOPSIS    curl http://127.0.0.1:9900/metrics
 * DESCRIPTION Prometheus text format (0.0.4) from prom-client, every family with `# HELP` and
 *             `# TYPE`. Each process counts in its own registry (below); `pigeon serve
 *             --workers N` (N > 1) serves the listener from the primary, which asks every worker
 *             that announced itself for its registry (as JSON, over the cluster channel) and
 *             answers with the sum made by prom-client's AggregatorRegistry.aggregate: one
 *             scrape, the whole process tree. With one process the listener answers from that
 *             process's registry. Every series carries `node`. A restarted worker starts from
 *             zero (Prometheus sees a counter reset).
 *             Families (README "Metrics"):
 *               pigeon_logins_total{protocol,result}            result ok|failed|tempfail
 *               pigeon_sessions{protocol,backend}               gauge: relayed sessions now
 *               pigeon_backend_start_duration_seconds{protocol,backend}   histogram
 *               pigeon_peer_handoffs_sent_total{kind,result}, pigeon_peer_handoffs_received_total{kind,result},
 *               pigeon_peer_links_refused_total{reason}, pigeon_peer_handshakes_total{side,kind}
 *               pigeon_deliveries_total{module,status}          status delivered|deferred|rejected
 *               pigeon_delivery_duration_seconds                histogram: one message, all recipients
 *               pigeon_db_errors_total{code}, pigeon_db_user_reads_total, pigeon_password_checks_total
 * DIAGNOSTICS A worker that does not answer within METRICS_WORKER_MS (one that is stopping) is left
 *             out of that scrape; `pigeon_metrics_workers{answered}` says how many answered and
 *             how many did not.
 * SECURITY    No user name, address or client IP is ever a label (bounded cardinality, no
 *             personal data in the monitoring system). The listener has no authentication:
 *             bind it to loopback or a private network.
 */
import type { Server } from 'node:http';
import type { Worker } from 'node:cluster';
import { createRequire } from 'node:module';
import type * as PromClient from 'prom-client';
import type { MetricObjectWithValues, MetricValue } from 'prom-client';
import { METRICS_WORKER_MS } from './limits.js';

// prom-client's index also loads its default process metrics and, through them,
// @opentelemetry/api: ≈ 33 ms of CPU in every process that counts anything, one `pigeon deliver`
// per message included (perf stat task-clock: the index 41 ms over `node -e 0`, these five files
// 8 ms). pigeon uses none of those: the five classes come from their own files (prom-client has no
// "exports" map; its version is pinned by package-lock.json).
const load = createRequire(import.meta.url);
const Registry = load('prom-client/lib/registry') as typeof PromClient.Registry;
const Counter = load('prom-client/lib/counter') as typeof PromClient.Counter;
const Gauge = load('prom-client/lib/gauge') as typeof PromClient.Gauge;
const Histogram = load('prom-client/lib/histogram') as typeof PromClient.Histogram;


/** this process's metrics; in a serve worker, what the primary collects */
export const registry = new Registry();

type Json = MetricObjectWithValues<MetricValue<string>>[];
const READY = 'pigeon:metrics-ready';
const REQ = 'pigeon:metrics-req';
const RES = 'pigeon:metrics-res';

function message(m: unknown, type: string): { id: number; metrics: Json } | null {
  if (typeof m !== 'object' || m === null || (m as { type?: unknown }).type !== type) return null;
  const { id, metrics } = m as { id?: unknown; metrics?: unknown };
  return { id: typeof id === 'number' ? id : -1, metrics: Array.isArray(metrics) ? (metrics as Json) : [] };
}

/**
 * In a worker of `serve --workers N`: answer the primary's requests for this registry, and
 * announce that this worker can (a worker still starting is not asked). Called by the worker
 * itself (forkers/listen.ts): node:cluster and prom-client's AggregatorRegistry are loaded only by
 * the processes that use them, not by every process that counts something (an in-process
 * `pigeon deliver`: node:cluster brings node:child_process and node:net with it, ≈ 8 ms of CPU).
 */
export function answerPrimary(): void {
  process.on('message', (m: unknown) => {
    const req = message(m, REQ);
    if (!req) return;
    void registry.getMetricsAsJSON().then(
      (metrics) => process.send?.({ type: RES, id: req.id, metrics }),
      () => process.send?.({ type: RES, id: req.id, metrics: [] }),
    );
  });
  process.send?.({ type: READY });
}

/** The node's name on every series (set once the configuration is read). */
export function setNode(node: string): void {
  nodeLabels = { node };
  registry.setDefaultLabels(nodeLabels);
}
let nodeLabels: Record<string, string> = {};

const LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];

export const logins = new Counter({
  name: 'pigeon_logins_total',
  help: 'IMAP and POP3 authentications, by protocol and result (ok, failed: refused like a wrong password, tempfail: database or auth outage)',
  labelNames: ['protocol', 'result'] as const,
  registers: [registry],
});

export const sessions = new Gauge({
  name: 'pigeon_sessions',
  help: 'IMAP and POP3 sessions relayed to a backend right now, by protocol and backend (dovecot, courier, peer:NODE)',
  labelNames: ['protocol', 'backend'] as const,
  registers: [registry],
});

export const backendStart = new Histogram({
  name: 'pigeon_backend_start_duration_seconds',
  help: 'Time from a successful authentication to a running backend session (allocation, backend start or peer hand-off), by protocol and backend',
  labelNames: ['protocol', 'backend'] as const,
  buckets: LATENCY_BUCKETS,
  registers: [registry],
});

export const peerHandoffsSent = new Counter({
  name: 'pigeon_peer_handoffs_sent_total',
  help: 'Hand-offs sent to other nodes over peer links, by kind (imap pop3 deliver move-out move-in) and result',
  labelNames: ['kind', 'result'] as const,
  registers: [registry],
});

export const peerHandoffsReceived = new Counter({
  name: 'pigeon_peer_handoffs_received_total',
  help: 'Hand-offs received from other nodes over peer links, by kind and result (accepted or the refusal code)',
  labelNames: ['kind', 'result'] as const,
  registers: [registry],
});

export const peerLinksPooled = new Gauge({
  name: 'pigeon_peer_links_pooled',
  help: 'Spare, already verified peer links waiting for a session, by the node they lead to (peer.pool_size per node and process)',
  labelNames: ['to'] as const,
  registers: [registry],
});

export const peerLinksOpened = new Counter({
  name: 'pigeon_peer_links_opened_total',
  help: 'Peer links used for a hand-off, by how they were had: pooled (a spare, no handshake) or dialed (a TLS handshake while the session waited)',
  labelNames: ['how'] as const,
  registers: [registry],
});

export const peerHandshakes = new Counter({
  name: 'pigeon_peer_handshakes_total',
  help: 'TLS handshakes of peer links that passed the checks, by side (dialed: this node opened the link; accepted: another node did) and kind (full: certificates exchanged and verified; resumed: a TLS 1.3 resumption of an earlier full handshake, peer.resume_s)',
  labelNames: ['side', 'kind'] as const,
  registers: [registry],
});

export const peerLinksRefused = new Counter({
  name: 'pigeon_peer_links_refused_total',
  help: 'Incoming peer links refused, by reason (tls, certificate, registry)',
  labelNames: ['reason'] as const,
  registers: [registry],
});

export const deliveries = new Counter({
  name: 'pigeon_deliveries_total',
  help: 'Recipients of delivered messages, by delivery module and status (delivered, deferred, rejected); a failure counts against the module that failed (pipeline: before any module, spool: reading the message)',
  labelNames: ['module', 'status'] as const,
  registers: [registry],
});

export const deliveryDuration = new Histogram({
  name: 'pigeon_delivery_duration_seconds',
  help: 'Time to deliver one message to all its recipients (spooling included)',
  buckets: LATENCY_BUCKETS,
  registers: [registry],
});

export const dbErrors = new Counter({
  name: 'pigeon_db_errors_total',
  help: 'Database operations that failed, by error code (DB_LOCKED, DB_UNAVAILABLE, DB_READONLY, ...; other: not classified)',
  labelNames: ['code'] as const,
  registers: [registry],
});

export const dbUserReads = new Counter({
  name: 'pigeon_db_user_reads_total',
  help: 'User records read from the configuration database',
  registers: [registry],
});

export const passwordChecks = new Counter({
  name: 'pigeon_password_checks_total',
  help: 'Password hashes checked',
  registers: [registry],
});

/** A delivery result's status word from its DSN (2.x.x delivered, 4.x.x deferred, 5.x.x rejected). */
export function deliveryStatus(dsn: string): 'delivered' | 'deferred' | 'rejected' {
  return dsn.startsWith('2') ? 'delivered' : dsn.startsWith('5') ? 'rejected' : 'deferred';
}

/** Count a database error by its AppError code ('other' for anything unclassified). */
export function countDbError(e: unknown): void {
  const code = typeof e === 'object' && e !== null && 'code' in e && typeof e.code === 'string' && /^DB_[A-Z_]+$/.test(e.code) ? e.code : 'other';
  dbErrors.inc({ code });
}

/**
 * In the primary of `serve --workers N`: the sum over every worker that announced itself, each
 * asked once; one that does not answer within METRICS_WORKER_MS (or exits) is left out.
 */
function clusterCollector(): () => Promise<string> {
  const cluster = load('node:cluster') as typeof import('node:cluster').default;
  const AggregatorRegistry = load('prom-client/lib/cluster') as typeof PromClient.AggregatorRegistry;
  const ready = new Set<Worker>();
  const waiting = new Map<number, { readonly left: Set<Worker>; readonly got: Json[]; readonly done: () => void }>();
  let nextId = 1;
  cluster.on('message', (w: Worker, m: unknown) => {
    if (message(m, READY)) ready.add(w);
    const res = message(m, RES);
    const q = res ? waiting.get(res.id) : undefined;
    if (!res || !q || !q.left.delete(w)) return;
    q.got.push(res.metrics);
    if (q.left.size === 0) q.done();
  });
  cluster.on('exit', (w: Worker) => {
    ready.delete(w);
    for (const q of waiting.values()) if (q.left.delete(w) && q.left.size === 0) q.done();
  });
  return () =>
    new Promise<string>((resolve, reject) => {
      const id = nextId++;
      const asked = [...ready].filter((w) => w.isConnected());
      const got: Json[] = [];
      const left = new Set(asked);
      const done = (): void => {
        clearTimeout(timer);
        waiting.delete(id);
        const answered = new Registry();
        // (Registry.merge keeps no default labels: the node label is set here)
        const g = new Gauge({ name: 'pigeon_metrics_workers', help: 'serve workers asked for this scrape, by whether they answered in time', labelNames: ['answered', ...Object.keys(nodeLabels)], registers: [answered] });
        g.set({ answered: 'yes', ...nodeLabels }, got.length);
        g.set({ answered: 'no', ...nodeLabels }, asked.length - got.length);
        const merged = Registry.merge([AggregatorRegistry.aggregate(got), answered]);
        merged.metrics().then(resolve, reject);
      };
      const timer = setTimeout(done, METRICS_WORKER_MS);
      waiting.set(id, { left, got, done });
      for (const w of asked) w.send({ type: REQ, id });
      if (left.size === 0) done();
    });
}

/**
 * GET /metrics → the metrics; anything else 404. `aggregate`: answer for all cluster workers
 * (the primary of `serve --workers N`), else for this process.
 */
export function metricsServer(aggregate: boolean): Server {
  const collect = aggregate ? clusterCollector() : () => registry.metrics();
  // node:http only here: every process that counts something (one `pigeon deliver` per message)
  // imports this module, and only `serve` answers scrapes (≈ 5 ms of CPU per process otherwise)
  const { createServer } = load('node:http') as typeof import('node:http');
  return createServer((req, res) => {
    if (req.method !== 'GET' || (req.url !== '/metrics' && req.url !== '/')) {
      res.writeHead(404, { 'content-type': 'text/plain' });
      res.end('not found: GET /metrics\n');
      return;
    }
    collect().then(
      (text) => {
        res.writeHead(200, { 'content-type': registry.contentType });
        res.end(text);
      },
      (e: unknown) => {
        res.writeHead(503, { 'content-type': 'text/plain' });
        res.end(`metrics unavailable: ${e instanceof Error ? e.message : String(e)}\n`);
      },
    );
  });
}
