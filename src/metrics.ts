/**
 * NAME        src/metrics — process-wide counters, served by a `metrics=HOST:PORT` listener
 * SYNOPSIS    curl http://127.0.0.1:9900/metrics
 * DESCRIPTION Prometheus text format. Counters are per process: `pigeon serve --workers N` has one
 *             set per worker (label `worker`), so scrape with --workers 1 or sum the series.
 *             What is counted: user reads from the configuration database, password checks, peer
 *             hand-offs sent and received per kind and result, sessions started.
 */
import { createServer, type Server } from 'node:http';

const counters = new Map<string, number>();

function key(name: string, labels?: Readonly<Record<string, string>>): string {
  if (!labels) return name;
  const l = Object.entries(labels)
    .map(([k, v]) => `${k}="${v.replace(/["\\\n]/g, '_')}"`)
    .join(',');
  return `${name}{${l}}`;
}

export function count(name: string, labels?: Readonly<Record<string, string>>, by = 1): void {
  const k = key(name, labels);
  counters.set(k, (counters.get(k) ?? 0) + by);
}

export function value(name: string, labels?: Readonly<Record<string, string>>): number {
  return counters.get(key(name, labels)) ?? 0;
}

export function render(extraLabels: Readonly<Record<string, string>> = {}): string {
  const extra = Object.entries(extraLabels).map(([k, v]) => `${k}="${v}"`);
  const lines: string[] = [];
  for (const [k, v] of [...counters.entries()].sort()) {
    const brace = k.indexOf('{');
    const name = brace < 0 ? k : k.slice(0, brace);
    const labels = brace < 0 ? [] : [k.slice(brace + 1, -1)];
    const all = [...labels, ...extra].filter((x) => x !== '');
    lines.push(`${name}${all.length > 0 ? `{${all.join(',')}}` : ''} ${v}`);
  }
  return `${lines.join('\n')}\n`;
}

/** GET /metrics → the counters; anything else 404. */
export function metricsServer(labels: Readonly<Record<string, string>>): Server {
  return createServer((req, res) => {
    if (req.method === 'GET' && (req.url === '/metrics' || req.url === '/')) {
      res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4' });
      res.end(render(labels));
    } else {
      res.writeHead(404, { 'content-type': 'text/plain' });
      res.end('not found: GET /metrics\n');
    }
  });
}
