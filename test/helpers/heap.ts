// Test helper: what a running Node process keeps on its JS heap, counted from a heap snapshot
// taken through its inspector (the process runs with --inspect=127.0.0.1:0 and printed
// `Debugger listening on ws://…`). The snapshot is taken and counted by a separate node process
// (Node 20's WebSocket client is behind --experimental-websocket); only the counts come back.
// V8 collects all garbage before it takes a snapshot, so the counts are of live objects.
import { spawn } from 'node:child_process';

export interface HeapCounts {
  /** the inspected process's pid */
  readonly pid: number;
  /** heap snapshot nodes by type (object, closure, string, hidden, code, …) */
  readonly types: Readonly<Record<string, number>>;
  /** `object` nodes by constructor name (ClientConn, Socket, Promise, …) */
  readonly names: Readonly<Record<string, number>>;
}

const COUNTER = `
const url = process.argv[1];
const ws = new WebSocket(url);
await new Promise((r, j) => { ws.onopen = r; ws.onerror = () => j(new Error('cannot reach ' + url)); });
let id = 0;
const pending = new Map();
const chunks = [];
ws.onmessage = (m) => {
  const x = JSON.parse(m.data);
  if (x.method === 'HeapProfiler.addHeapSnapshotChunk') chunks.push(x.params.chunk);
  else if (x.id !== undefined) pending.get(x.id)?.(x);
};
const call = (method, params = {}) => new Promise((r) => { const i = ++id; pending.set(i, r); ws.send(JSON.stringify({ id: i, method, params })); });
const pid = (await call('Runtime.evaluate', { expression: 'process.pid', returnByValue: true })).result.result.value;
await call('HeapProfiler.collectGarbage');
await call('HeapProfiler.takeHeapSnapshot', { reportProgress: false });
ws.close();
const s = JSON.parse(chunks.join(''));
const f = s.snapshot.meta.node_fields;
const kinds = s.snapshot.meta.node_types[0];
const W = f.length, it = f.indexOf('type'), iname = f.indexOf('name');
const types = {}, names = {};
for (let i = 0; i < s.nodes.length; i += W) {
  const ty = kinds[s.nodes[i + it]];
  types[ty] = (types[ty] ?? 0) + 1;
  if (ty === 'object') { const n = s.strings[s.nodes[i + iname]]; names[n] = (names[n] ?? 0) + 1; }
}
process.stdout.write(JSON.stringify({ pid, types, names }));
process.exit(0);
`;

/** Count the live heap of the process whose inspector listens at `url`. */
export function heapCounts(url: string): Promise<HeapCounts> {
  return new Promise((resolve, reject) => {
    const c = spawn(process.execPath, ['--experimental-websocket', '--no-warnings', '--input-type=module', '-e', COUNTER, url], { stdio: ['ignore', 'pipe', 'pipe'], env: { PATH: process.env['PATH'] ?? '/usr/bin:/bin' } });
    let out = '';
    let err = '';
    c.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
    c.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
    c.once('error', reject);
    c.once('close', (code) => {
      if (code !== 0) reject(new Error(`heap snapshot of ${url} failed (exit ${code}): ${err}`));
      else resolve(JSON.parse(out) as HeapCounts);
    });
  });
}

/**
 * Nodes that grew from `a` to `b`, per one of `n` things added in between. Code objects (JIT work)
 * and object shapes (hidden classes: one per code path and property layout, made once, not per
 * object) are left out: they are not data the things keep.
 */
export function perThing(a: HeapCounts, b: HeapCounts, n: number): { readonly nodes: number; readonly byType: Readonly<Record<string, number>> } {
  const byType: Record<string, number> = {};
  let nodes = 0;
  for (const [k, v] of Object.entries(b.types)) {
    if (k === 'code' || k === 'object shape') continue;
    const d = (v - (a.types[k] ?? 0)) / n;
    byType[k] = Math.round(d * 100) / 100;
    nodes += d;
  }
  return { nodes: Math.round(nodes * 100) / 100, byType };
}
