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
// CI keeps only the tail of the output: every failure is repeated at the end, with the path of
// subtests that leads to it and its diagnostic block (bounded), so the tail alone says what failed
const path = []; // [{ indent, name }] of the open subtests
const failures = []; // { where, lines }
let diag = null; // the failure whose YAML block is being read, and that block's indent
const DIAG_LINES = 40;
const rl = createInterface({ input: child.stdout });
rl.on('line', (line) => {
  process.stdout.write(`${line}\n`);
  if (diag) {
    const indent = line.length - line.trimStart().length;
    if (indent >= diag.indent && line.trim() !== '' && diag.open) {
      if (diag.failure.lines.length < DIAG_LINES) diag.failure.lines.push(line.slice(diag.indent));
      if (line.trim() === '...') diag = null;
      return;
    }
    if (!diag.open && line.trim() === '---') {
      diag.open = true;
      diag.indent = indent;
      diag.failure.lines.push(line.slice(indent));
      return;
    }
    diag = null;
  }
  const sub = /^(\s*)# Subtest: (.*)$/.exec(line);
  if (sub) {
    containers.add(`${sub[1].length}\0${sub[2]}`);
    while (path.length && path[path.length - 1].indent >= sub[1].length) path.pop();
    path.push({ indent: sub[1].length, name: sub[2], failuresAtOpen: failures.length });
    return;
  }
  const m = /^(\s*)(not ok|ok) \d+(?: - (.*?))?(?: # (SKIP|TODO)\b.*| # time=\S+)?(?: \{)?$/.exec(line);
  if (!m) return;
  const key = `${m[1].length}\0${m[3] ?? ''}`;
  let quiet = false;
  if (m[2] === 'not ok') {
    while (path.length && path[path.length - 1].indent > m[1].length) path.pop();
    const outer = path.filter((p) => p.indent < m[1].length).map((p) => p.name);
    // a subtest or file that failed because an assertion in it failed: its name is enough (the
    // assertion is listed with its block); one that failed with none failing inside (a crash, a
    // timeout, a planned count missed): its own block says why
    const self = containers.has(key) ? path.findLast((p) => p.indent === m[1].length && p.name === (m[3] ?? '')) : undefined;
    quiet = self !== undefined && failures.length === self.failuresAtOpen;
    const failure = { where: [...outer, m[3] ?? '(unnamed)'].join(' > '), lines: [] };
    failures.push(failure);
    if (!containers.has(key) || quiet) diag = { failure, open: false, indent: 0 };
  }
  if (containers.has(key)) {
    // a subtest or file: its assertions were counted; one that failed with nothing failing
    // inside it (a crash, a timeout) counts as one failure
    containers.delete(key);
    if (quiet) failed++;
    return;
  }
  if (m[4] === 'SKIP') skipped++;
  else if (m[2] === 'ok') passed++;
  else failed++;
});
child.on('close', (code) => {
  if (code !== 0 && failed === 0) failed = 1; // a file crashed without a failing assertion
  if (failures.length) {
    console.log(`\n# What failed (${failures.length} lines marked not ok, innermost first):`);
    for (const f of failures.slice(0, 30)) {
      console.log(`# not ok: ${f.where}`);
      for (const l of f.lines) console.log(`#   ${l}`);
    }
  }
  console.log(`${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ''}`);
  process.exit(failed > 0 ? 1 : 0);
});
