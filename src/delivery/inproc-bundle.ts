/**
 * NAME        src/delivery/inproc-bundle — load dist/src/deliver-inproc.cjs with V8's code cache
 * SYNOPSIS    loadInprocBundle(file, { fs, vm, require, import: (s) => import(s) })
 * DESCRIPTION When no running `pigeon serve` takes a message, `pigeon deliver` (dist/src/cli.cjs,
 *             src/launcher.ts) delivers it itself with the delivery code that `npm run build`
 *             bundles into one CommonJS file, dist/src/deliver-inproc.cjs
 *             (scripts/bundle-deliver.mjs). Compiling that file's ≈ 1.6 MB, and the functions a
 *             delivery runs, is a third of what is left of an in-process delivery's CPU; so the
 *             build also writes V8's code cache for it, taken after a real delivery into a
 *             scratch instance (every function that delivery compiled is in it), and this
 *             module compiles the bundle with that cache, the way node's CommonJS loader would
 *             compile it otherwise (the same wrapper, the same arguments).
 *             The cache belongs to exactly one bundle: the bundle's first line names its build
 *             (`/* pigeon-build ID *\/`, a hash of its contents) and the cache file is
 *             `deliver-inproc.cjs.ID.v8cache`, so a rebuilt bundle never meets an older cache
 *             (V8 itself checks the source's length, its own version and its flags, and
 *             compiles from source when the cache does not fit). No cache, a rejected cache or
 *             a bundle without the line: compiled from source, the same code.
 *             Node built-ins are passed in, so the `pigeon` command loads node:vm only when it
 *             delivers in-process; inlined into dist/src/cli.cjs (scripts/bundle-deliver.mjs's
 *             closed list: no state).
 * SECURITY    The cache is read from next to the bundle, dist/src/, which only whoever installed
 *             pigeon may write (the same trust as the code itself); never from the instance
 *             directory, which the mail user may write.
 * SEE ALSO    src/launcher.ts, scripts/bundle-deliver.mjs
 */
import type * as FS from 'node:fs';
import type * as VM from 'node:vm';

/** The first line of dist/src/deliver-inproc.cjs: its build ID. */
export const BUILD_LINE = /^\/\* pigeon-build ([0-9a-f]{16}) \*\//;

/** The code cache file of a bundle whose build ID is `id`. */
export const cacheFile = (bundle: string, id: string): string => `${bundle}.${id}.v8cache`;

/** What the bundle runs with: node built-ins, and its require and import() from a real CommonJS file. */
export interface BundleDeps {
  readonly fs: typeof FS;
  readonly vm: typeof VM;
  /** the bundle's require(): node built-ins and the packages with a native part */
  readonly require: NodeJS.Require;
  /**
   * the bundle's import() (a module file named in the configuration, the password-hash
   * packages): the build turns each into a call of this. On Node 20 an import() in a script
   * compiled with a code cache made by another process fails ("A dynamic import callback was
   * not specified": the cache drops the script's link to node's loader), so the import runs in
   * the caller's own file instead, where node's loader serves it as always
   */
  readonly import: (specifier: string) => Promise<unknown>;
}

export interface LoadedBundle<T> {
  readonly exports: T;
  /** the compiled script: `createCachedData()` after a delivery gives the build its cache */
  readonly script: VM.Script;
  /** whether the code cache was given and taken */
  readonly cached: boolean;
}

/**
 * Compile and run the bundle as a CommonJS module (node's wrapper, `req` as its require: the
 * bundle requires node built-ins and packages with a native part only). `useCache` false: from
 * source, for the build's training run.
 */
export function loadInprocBundle<T>(file: string, deps: BundleDeps, useCache = true): LoadedBundle<T> {
  const { fs, vm } = deps;
  // the build writes the bundle in ASCII only (scripts/bundle-deliver.mjs checks it), so latin1 reads
  // the same text, without the UTF-8 decoder's pass over its 0.9 MB (≈ 1 ms of every delivery)
  const source = fs.readFileSync(file, 'latin1');
  const id = BUILD_LINE.exec(source.slice(0, 64))?.[1];
  let cachedData: Buffer | undefined;
  if (useCache && id !== undefined) {
    try {
      cachedData = fs.readFileSync(cacheFile(file, id));
    } catch {
      cachedData = undefined; // none: compiled from source
    }
  }
  const script = new vm.Script(`(function (exports, require, module, __filename, __dirname, __pigeonImport) { ${source}\n});`, {
    filename: file,
    ...(cachedData !== undefined ? { cachedData } : {}),
  });
  const wrapper = script.runInThisContext() as (exports: object, require: NodeJS.Require, module: { exports: object }, filename: string, dirname: string, load: BundleDeps['import']) => void;
  const module = { exports: {} };
  wrapper.call(module.exports, module.exports, deps.require, module, file, file.slice(0, file.lastIndexOf('/')), deps.import);
  return { exports: module.exports as T, script, cached: cachedData !== undefined && !script.cachedDataRejected };
}
