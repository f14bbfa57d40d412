#!/usr/bin/env node
// Build, run the whole tap suite, and end with one line CI recognises: "N passed, N failed".
// Extra arguments are passed to tap (e.g. a test file). Exit status: 0 only when nothing failed.
import { spawn, spawnSync } from 'node:child_process';
import { createInterface } from 'node:readline';

// the same build as `npm run build` (it also makes dist/src/cli.js executable, which the
// set-up line's `pigeon` link and test/install-link.test.ts rely on)
const build = spawnSync('npm', ['run', '--silent', 'build'], { stdio: 'inherit' });
if (build.status !== 0) {
  console.log('0 passed, 1 failed (build)');
  process.exit(1);
}
// the tests themselves are type-checked too (tap runs them without checking)
const tcheck = spawnSync('npx', ['tsc', '-p', 'tsconfig.test.json'], { stdio: 'inherit' });
if (tcheck.status !== 0) {
  console.log('0 passed, 1 failed (type errors in the tests)');
  process.exit(1);
}
const args = ['tap', '--reporter=tap', ...process.argv.slice(2)];
const child = spawn('npx', args, { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, FORCE_COLOR: '0' } });
let passed = 0;
let failed = 0;
let skipped = 0;
const containers = new Set();
let sawLeafFailure = false;
const rl = createInterface({ input: child.stdout });
rl.on('line', (line) => {
  process.stdout.write(`${line}\n`);
  const sub = /^(\s*)# Subtest: (.*)$/.exec(line);
  if (sub) {
    containers.add(`${sub[1].length}\0${sub[2]}`);
    return;
  }
  const m = /^(\s*)(not ok|ok) \d+(?: - (.*?))?(?: # (SKIP|TODO)\b.*| # time=\S+)?(?: \{)?$/.exec(line);
  if (!m) return;
  const key = `${m[1].length}\0${m[3] ?? ''}`;
  if (containers.has(key)) {
    // a subtest or file: its assertions were counted; a crash shows as a failed container
    containers.delete(key);
    if (m[2] === 'not ok' && !sawLeafFailure) failed++;
    sawLeafFailure = false;
    return;
  }
  if (m[4] === 'SKIP') skipped++;
  else if (m[2] === 'ok') passed++;
  else {
    failed++;
    sawLeafFailure = true;
  }
});
child.on('close', (code) => {
  if (code !== 0 && failed === 0) failed = 1; // a file crashed without a failing assertion
  console.log(`${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ''}`);
  process.exit(failed > 0 ? 1 : 0);
});
