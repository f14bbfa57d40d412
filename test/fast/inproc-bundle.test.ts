// Fast tier: how `pigeon deliver` compiles its in-process bundle (src/delivery/inproc-bundle.ts).
// A code cache is used only when it belongs to the bundle's own build; a cache of another build,
// a damaged one or none: compiled from source, the same code. The bundle's import() goes to the
// function the caller passes, also when the script was compiled from a cache that another
// process made (on Node 20 an import() there has no loader of its own).
import t, { type Test } from 'tap';
import * as fs from 'node:fs';
import * as vm from 'node:vm';
import { createRequire } from 'node:module';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { tmpdir } from 'node:os';
import { pathToFileURL } from 'node:url';
import { loadInprocBundle, cacheFile } from '../../src/delivery/inproc-bundle.js';
import { ROOT } from '../helpers/instance.js';

interface Exports {
  answer: () => number;
  load: (s: string) => Promise<unknown>;
}

function bundle(t: Test, id: string, answer: number): string {
  const dir = fs.mkdtempSync(join(tmpdir(), 'pigeon-bundle-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = join(dir, 'deliver-inproc.cjs');
  fs.writeFileSync(file, `/* pigeon-build ${id} */\nmodule.exports = { answer: () => ${answer}, load: (s) => __pigeonImport(s), os: require('node:os').platform() };\n`);
  return file;
}

const deps = (file: string, imported: string[]) => ({
  fs,
  vm,
  require: createRequire(file),
  import: (s: string): Promise<unknown> => {
    imported.push(s);
    return import(s);
  },
});

/**
 * A code cache for `file`, made in another process as the build makes it (scripts/bundle-deliver.mjs:
 * dist's loadInprocBundle from source, the bundle run, then createCachedData).
 */
function cacheFromAnotherProcess(file: string, id: string): void {
  const loader = pathToFileURL(join(ROOT, 'dist', 'src', 'delivery', 'inproc-bundle.js')).href;
  const code = `const fs = require('fs'), vm = require('vm');
import(${JSON.stringify(loader)}).then(({ loadInprocBundle }) => {
  const b = loadInprocBundle(${JSON.stringify(file)}, { fs, vm, require, import: (x) => import(x) }, false);
  b.exports.answer();
  fs.writeFileSync(${JSON.stringify(cacheFile(file, id))}, b.script.createCachedData());
});`;
  const r = spawnSync(process.execPath, ['-e', code], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(r.stderr);
}

t.test('its own cache is taken; import() goes to the caller\'s function', async (t) => {
  const id = '0123456789abcdef';
  const file = bundle(t, id, 42);
  cacheFromAnotherProcess(file, id);
  const imported: string[] = [];
  const b = loadInprocBundle<Exports>(file, deps(file, imported));
  t.equal(b.cached, true, 'the cache was given and V8 took it');
  t.equal(b.exports.answer(), 42);
  const os = (await b.exports.load('node:os')) as typeof import('node:os');
  t.equal(typeof os.cpus, 'function', 'an import() from the cached script works');
  t.same(imported, ['node:os'], 'through the function passed in');
});

t.test('a cache of another build is not read; a damaged one is rejected: compiled from source, the same code', async (t) => {
  const file = bundle(t, 'aaaaaaaaaaaaaaaa', 7);
  cacheFromAnotherProcess(file, 'aaaaaaaaaaaaaaaa');
  // the bundle rebuilt with the same length but other code: its ID changes, the old cache is not its own
  fs.writeFileSync(file, fs.readFileSync(file, 'utf8').replace('aaaaaaaaaaaaaaaa', 'bbbbbbbbbbbbbbbb').replace('=> 7', '=> 8'));
  const b = loadInprocBundle<Exports>(file, deps(file, []));
  t.equal(b.cached, false, 'no cache for this build');
  t.equal(b.exports.answer(), 8, 'the new code runs, not the cached one');
  const d = loadInprocBundle<Exports>(file, deps(file, []), false);
  t.equal(d.cached, false, 'useCache false: from source');
  t.equal(d.exports.answer(), 8);
  // a damaged cache (a bundle this process has not compiled yet: V8 answers a source it already
  // compiled from its own memory and never looks at the cache)
  const other = bundle(t, 'cccccccccccccccc', 9);
  fs.writeFileSync(cacheFile(other, 'cccccccccccccccc'), Buffer.alloc(4096, 0x5a));
  const c = loadInprocBundle<Exports>(other, deps(other, []));
  t.equal(c.script.cachedDataRejected, true, 'a damaged cache: V8 rejects it');
  t.equal(c.cached, false, 'and it is not counted as taken');
  t.equal(c.exports.answer(), 9, 'compiled from source');
});

t.test('a bundle without the build line: from source', async (t) => {
  const file = bundle(t, '0000000000000000', 1);
  fs.writeFileSync(file, fs.readFileSync(file, 'utf8').replace(/^\/\*.*\*\/\n/, ''));
  const b = loadInprocBundle<Exports>(file, deps(file, []));
  t.equal(b.cached, false);
  t.equal(b.exports.answer(), 1);
});
