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
// They are loaded when this process first counts something or serves its metrics, never in a
// process that said at its start that it serves none (countNothing: an in-process `pigeon
// deliver`, one inetd or master.cf session, `pigeon lmtp`), whose counts nobody could read: there,
// loading them cost ≈ 6 ms of an in-process delivery's ≈ 90 ms of CPU.
let required: NodeJS.Require | undefined;
/** require() from this file, made on first use (not in a process that counts nothing) */
const load = (id: string): unknown => (required ??= createRequire(import.meta.url))(id);

interface Prom {
  readonly registry: PromClient.Registry;
  readonly Registry: typeof PromClient.Registry;
  readonly Counter: typeof PromClient.Counter;
  readonly Gauge: typeof PromClient.Gauge;
  readonly Histogram: typeof PromClient.Histogram;
}
let prom: Prom | null = null;
/** `node` on every series (setNode) */
let nodeLabels: Record<string, string> = {};
let counting = true;
/** every metric's construction, run once prom-client is loaded: all families appear in a scrape, counted or not */
const families: ((p: Prom) => void)[] = [];

/** prom-client, this process's registry and every metric in it (made on first use). */
function loaded(): Prom {
  if (prom === null) {
    const Registry = load('prom-client/lib/registry') as typeof PromClient.Registry;
    const p: Prom = {
      registry: new Registry(),
      Registry,
      Counter: load('prom-client/lib/counter') as typeof PromClient.Counter,
      Gauge: load('prom-client/lib/gauge') as typeof PromClient.Gauge,
      Histogram: load('prom-client/lib/histogram') as typeof PromClient.Histogram,
    };
    p.registry.setDefaultLabels(nodeLabels);
    prom = p;
    for (const make of families) make(p);
  }
  return prom;
}

/**
 * This process serves no metrics (a one-shot command): counting does nothing from now on and
 * prom-client is never loaded. Call it first thing; `serve` never does.
 */
export function countNothing(): void {
  counting = false;
}

type Labels<T extends string> = PromClient.LabelValues<T>;

/** A metric of prom-client's, made in this process's registry when prom-client is loaded. */
class Lazy<M> {
  private real: M | null = null;
  constructor(make: (p: Prom) => M) {
    families.push((p) => {
      this.real = make(p);
    });
  }
  protected get m(): M {
    loaded();
    return this.real as M;
  }
}

class LazyCounter<T extends string> extends Lazy<PromClient.Counter<T>> {
  constructor(conf: PromClient.CounterConfiguration<T>) {
    super((p) => new p.Counter({ ...conf, registers: [p.registry] }));
  }
  inc(labels?: Labels<T>, value?: number): void {
    if (!counting) return;
    if (labels === undefined) this.m.inc(value);
    else this.m.inc(labels, value);
  }
}

class LazyGauge<T extends string> extends Lazy<PromClient.Gauge<T>> {
  constructor(conf: PromClient.GaugeConfiguration<T>) {
    super((p) => new p.Gauge({ ...conf, registers: [p.registry] }));
  }
  inc(labels: Labels<T>): void {
    if (counting) this.m.inc(labels);
  }
  dec(labels: Labels<T>): void {
    if (counting) this.m.dec(labels);
  }
  set(labels: Labels<T>, value: number): void {
    if (counting) this.m.set(labels, value);
  }
}

class LazyHistogram<T extends string> extends Lazy<PromClient.Histogram<T>> {
  constructor(conf: PromClient.HistogramConfiguration<T>) {
    super((p) => new p.Histogram({ ...conf, registers: [p.registry] }));
  }
  observe(labels: Labels<T>, value: number): void {
    if (counting) this.m.observe(labels, value);
  }
  /** ends with the seconds since the start (0 when nothing is counted) */
  startTimer(): () => number {
    return counting ? this.m.startTimer() : () => 0;
  }
}

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
    void loaded().registry.getMetricsAsJSON().then(
      (metrics) => process.send?.({ type: RES, id: req.id, metrics }),
      () => process.send?.({ type: RES, id: req.id, metrics: [] }),
    );
  });
  process.send?.({ type: READY });
}

/** The node's name on every series (set once the configuration is read). */
export function setNode(node: string): void {
  nodeLabels = { node };
  prom?.registry.setDefaultLabels(nodeLabels);
}

const LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];

export const logins = new LazyCounter({
  name: 'pigeon_logins_total',
  help: 'IMAP and POP3 authentications, by protocol and result (ok, failed: refused like a wrong password, tempfail: database or auth outage)',
  labelNames: ['protocol', 'result'] as const,
});

export const sessions = new LazyGauge({
  name: 'pigeon_sessions',
  help: 'IMAP and POP3 sessions relayed to a backend right now, by protocol and backend (dovecot, courier, peer:NODE)',
  labelNames: ['protocol', 'backend'] as const,
});

export const backendStart = new LazyHistogram({
  name: 'pigeon_backend_start_duration_seconds',
  help: 'Time from a successful authentication to a running backend session (allocation, backend start or peer hand-off), by protocol and backend',
  labelNames: ['protocol', 'backend'] as const,
  buckets: LATENCY_BUCKETS,
});

export const peerHandoffsSent = new LazyCounter({
  name: 'pigeon_peer_handoffs_sent_total',
  help: 'Hand-offs sent to other nodes over peer links, by kind (imap pop3 deliver move-out move-in) and result',
  labelNames: ['kind', 'result'] as const,
});

export const peerHandoffsReceived = new LazyCounter({
  name: 'pigeon_peer_handoffs_received_total',
  help: 'Hand-offs received from other nodes over peer links, by kind and result (accepted or the refusal code)',
  labelNames: ['kind', 'result'] as const,
});

export const peerLinksPooled = new LazyGauge({
  name: 'pigeon_peer_links_pooled',
  help: 'Spare, already verified peer links waiting for a session, by the node they lead to (peer.pool_size per node and process)',
  labelNames: ['to'] as const,
});

export const peerLinksOpened = new LazyCounter({
  name: 'pigeon_peer_links_opened_total',
  help: 'Peer links used for a hand-off, by how they were had: pooled (a spare, no handshake) or dialed (a TLS handshake while the session waited)',
  labelNames: ['how'] as const,
});

export const peerHandshakes = new LazyCounter({
  name: 'pigeon_peer_handshakes_total',
  help: 'TLS handshakes of peer links that passed the checks, by side (dialed: this node opened the link; accepted: another node did) and kind (full: certificates exchanged and verified; resumed: a TLS 1.3 resumption of an earlier full handshake, peer.resume_s)',
  labelNames: ['side', 'kind'] as const,
});

export const peerLinksRefused = new LazyCounter({
  name: 'pigeon_peer_links_refused_total',
  help: 'Incoming peer links refused, by reason (tls, certificate, registry)',
  labelNames: ['reason'] as const,
});

export const deliveries = new LazyCounter({
  name: 'pigeon_deliveries_total',
  help: 'Recipients of delivered messages, by delivery module and status (delivered, deferred, rejected); a failure counts against the module that failed (pipeline: before any module, spool: reading the message)',
  labelNames: ['module', 'status'] as const,
});

export const deliveryDuration = new LazyHistogram({
  name: 'pigeon_delivery_duration_seconds',
  help: 'Time to deliver one message to all its recipients (spooling included)',
  buckets: LATENCY_BUCKETS,
});

export const dbErrors = new LazyCounter({
  name: 'pigeon_db_errors_total',
  help: 'Database operations that failed, by error code (DB_LOCKED, DB_UNAVAILABLE, DB_READONLY, ...; other: not classified)',
  labelNames: ['code'] as const,
});

export const dbUserReads = new LazyCounter({
  name: 'pigeon_db_user_reads_total',
  help: 'User records read from the configuration database',
});

export const passwordChecks = new LazyCounter({
  name: 'pigeon_password_checks_total',
  help: 'Password hashes checked',
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
  const { Registry, Gauge } = loaded();
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
  const { registry } = loaded();
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
