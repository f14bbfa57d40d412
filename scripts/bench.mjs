#!/usr/bin/env node
// Build, then run every benchmark script in order. Add a benchmark by adding its file to BENCHES.
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const BENCHES = ['bench-config.mjs', 'bench-proxy.mjs'];

const build = spawnSync('npx', ['tsc', '-p', 'tsconfig.json'], { stdio: 'inherit' });
if (build.status !== 0) {
  console.error('bench: build failed');
  process.exit(1);
}
let failed = 0;
for (const b of BENCHES) {
  const r = spawnSync(process.execPath, [fileURLToPath(new URL(b, import.meta.url)), ...process.argv.slice(2)], { stdio: 'inherit' });
  if (r.status !== 0) {
    console.error(`bench: ${b} failed (exit ${r.status ?? r.signal})`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
