#!/usr/bin/env node
/**
 * NAME        scripts/build-native — build native/pigeon_spawn.c (npm's install step, `npm run build:native`)
 * SYNOPSIS    node scripts/build-native.mjs [--strict] [--if-stale]
 * DESCRIPTION Builds the spawner's vfork module (build/Release/pigeon_spawn.node) with node-gyp,
 *             against the running Node's headers. Without g++, make or python3 the build fails:
 *             the install goes on (`pigeon serve` then starts backends with Node's child_process,
 *             slower, and its log says so), and this prints what to install. --strict (npm run
 *             build:native) exits non-zero instead. --if-stale (npm run build): nothing to do when
 *             the module is newer than its source and than the running Node.
 * EXIT        0 built (or not, without --strict); 1 not built with --strict.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const strict = process.argv.includes('--strict');
const MODULE = join(ROOT, 'build', 'Release', 'pigeon_spawn.node');
if (process.argv.includes('--if-stale') && existsSync(MODULE)) {
  const built = statSync(MODULE).mtimeMs;
  if ([join(ROOT, 'native', 'pigeon_spawn.c'), join(ROOT, 'binding.gyp'), process.execPath].every((f) => statSync(f).mtimeMs < built)) process.exit(0);
}
// npm tells its scripts where its node-gyp is; by hand, npm's own copy beside this Node
const gyp = [process.env.npm_config_node_gyp, join(dirname(process.execPath), '..', 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js')].find((p) => p && existsSync(p));
const missing = ['g++', 'make', 'python3'].filter((c) => spawnSync('sh', ['-c', `command -v ${c}`]).status !== 0);
let ok = false;
let why = '';
if (!gyp) why = 'node-gyp was not found (it comes with npm)';
else if (missing.length > 0) why = `missing: ${missing.join(', ')}`;
else {
  // npm tells node-gyp where Node's headers are (npm_config_nodedir, from npm's configuration):
  // run outside npm, ask npm for it, or node-gyp tries to download them
  const env = { ...process.env };
  if (!env.npm_config_nodedir) {
    const nd = spawnSync('npm', ['config', 'get', 'nodedir'], { encoding: 'utf8' });
    const dir = nd.status === 0 ? nd.stdout.trim() : '';
    if (dir && dir !== 'undefined' && existsSync(dir)) env.npm_config_nodedir = dir;
  }
  const r = spawnSync(process.execPath, [gyp, 'rebuild'], { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] });
  ok = r.status === 0 && existsSync(MODULE);
  if (!ok) why = `node-gyp rebuild failed:\n${String(r.stderr).split('\n').filter((l) => /error|Error/.test(l)).slice(0, 10).join('\n')}`;
}
if (!ok) {
  process.stderr.write(`pigeon: the native spawn module was not built (${why}).\n` + `pigeon: pigeon serve works without it but starts each backend by forking a Node process (slower logins, more memory per session).\n` + `pigeon: to build it: apt-get install g++ make python3 && npm run build:native\n`);
  process.exit(strict ? 1 : 0);
}
