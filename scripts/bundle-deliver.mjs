#!/usr/bin/env node
// NAME        scripts/bundle-deliver.mjs — `pigeon deliver`'s path in one file: dist/src/cli.js, dist/src/cli.cjs
// SYNOPSIS    npm run build   (tsc, then this script: it rewrites dist/src/cli.js in place and
//             writes dist/src/cli.cjs, the `pigeon` command, from dist/src/launcher.js)
// DESCRIPTION Postfix pipe(8) starts one `pigeon deliver` process per message, and when the
//             instance's `pigeon serve` runs, that process only hands the message over
//             (src/delivery/handoff-client.ts). On Node 20 much of its cost beyond a bare
//             `node -e 0` is Node's ES module loader, per module file: resolve, read (thread-pool
//             round trips), link. This script inlines into tsc's dist/src/cli.js the modules it
//             imports statically — the delivery entry point src/delivery/deliver-cli.ts and the
//             small modules of the hand-off — with esbuild, so a hand-off loads one file of
//             pigeon's. Every dynamic import (the command tree, the in-process delivery code,
//             the peer link, ...) stays an import of the other files of dist/, its path rewritten
//             to be relative to dist/src/cli.js; node built-ins stay imports. The source map is
//             chained through tsc's, so stack traces still name src/*.ts.
//             A module inlined here is a second copy of it in any process that also loads the
//             original (commander's `deliver` path loads dist/src/delivery/deliver-cli.js, the
//             in-process delivery code loads errors.js): only modules whose two copies cannot
//             disagree may be inlined, so the list below is closed (constants, pure functions,
//             no class another module tests with instanceof; deliver-cli's `answered` is set by
//             the copy that delivers only). A static import of anything else, or of a package,
//             fails the build, naming it.
// SEE ALSO    src/cli.ts, src/delivery/deliver-cli.ts, test/deliver-handoff.test.ts (what a hand-off loads)
import { build } from 'esbuild';
import { dirname, join, relative, sep } from 'node:path';
import { chmodSync, mkdtempSync, readFileSync, readdirSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { createHash } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import { tmpdir } from 'node:os';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
// tsc has run: the in-process bundle's loader names its build line and cache file
const { BUILD_LINE, cacheFile } = await import(pathToFileURL(join(ROOT, 'dist', 'src', 'delivery', 'inproc-bundle.js')).href);
const SRC = join(ROOT, 'dist', 'src');
const ENTRY = join(SRC, 'cli.js');
const LAUNCHER = join(SRC, 'launcher.js');
const LAUNCHER_OUT = join(SRC, 'cli.cjs');

/** What may be inlined into cli.js (paths under dist/src/); errors.js for its EX constants only. */
const INLINE = new Set(['delivery/inproc-bundle.js', 'delivery/deliver-cli.js', 'delivery/outcome.js', 'delivery/handoff-client.js', 'delivery/handoff-file.js', 'errors.js', 'instance-path.js', 'drain.js']);

/** A path relative to the output file's directory, as an import specifier. */
const fromOut = (file) => {
  const r = relative(dirname(ENTRY), file).split(sep).join('/');
  return r.startsWith('.') ? r : `./${r}`;
};

const closedList = {
  name: 'closed-list',
  setup(b) {
    b.onResolve({ filter: /.*/ }, (args) => {
      if (args.kind === 'entry-point') return undefined;
      if (args.path.startsWith('node:')) return { path: args.path, external: true };
      const relativePath = args.path.startsWith('.');
      if (args.kind === 'dynamic-import') return { path: relativePath ? fromOut(join(args.resolveDir, args.path)) : args.path, external: true };
      if (!relativePath) return { errors: [{ text: `${args.path}: a package imported statically on the pigeon deliver path (import it dynamically where it is needed)` }] };
      const file = join(args.resolveDir, args.path);
      const rel = relative(SRC, file).split(sep).join('/');
      if (!INLINE.has(rel)) return { errors: [{ text: `${rel}: imported statically on the pigeon deliver path but not on the list of modules that may be inlined into dist/src/cli.js (scripts/bundle-deliver.mjs INLINE): import it dynamically, or add it if a second copy of it is harmless` }] };
      return { path: file };
    });
  },
};

const common = {
  bundle: true,
  platform: 'node',
  target: 'node20',
  sourcemap: true, // chained through tsc's maps (the //# sourceMappingURL comments of the inputs)
  legalComments: 'none',
  logLevel: 'warning',
  plugins: [closedList],
};
// dist/src/cli.js: `node dist/src/cli.js`, and the module dist/src/cli.cjs loads for every
// command but a plain deliver
await build({ ...common, entryPoints: [ENTRY], outfile: ENTRY, allowOverwrite: true, format: 'esm' });
// dist/src/cli.cjs: the `pigeon` command (package.json bin, scripts/link-pigeon.sh), CommonJS,
// because on Node 20 an ES module entry alone costs each `pigeon deliver` ≈ 7 ms of CPU
// (src/launcher.ts); the same closed list is inlined, dynamic imports stay imports
await build({ ...common, entryPoints: [LAUNCHER], outfile: LAUNCHER_OUT, format: 'cjs' });
if (/\bimport_meta\b/.test(readFileSync(LAUNCHER_OUT, 'utf8'))) {
  console.error(`${LAUNCHER_OUT}: import.meta would be empty in CommonJS; keep it off the deliver path`);
  process.exit(1);
}
chmodSync(LAUNCHER_OUT, 0o755);

// dist/src/deliver-inproc.cjs: the in-process delivery code (src/delivery/deliver.ts and the peer
// link's remote store, with everything they import, statically or through a literal dynamic
// import, packages included), which the `pigeon` command requires when no running serve takes
// the message (src/launcher.ts). On Node 20 the ES module loader costs that process ≈ 100 ms of
// CPU for its ≈ 150 module files; one CommonJS file costs a fraction. This file is loaded only by
// dist/src/cli.cjs's in-process delivery, so every module in it has one copy in that process:
// packages with a native part stay require()s of node_modules (but better-sqlite3, whose
// JavaScript is bundled and whose addon src/store/sqlite.ts loads by its path), and so do the
// CommonJS packages src/ loads with createRequire (ipaddr.js and better-sqlite3 excepted: the
// import-meta-url plugin below makes those two plain require()s, which esbuild bundles, so they
// are compiled under the bundle's code cache, not from source in every delivery); a dynamic import this bundle
// cannot follow (a path in a variable) would load a second copy of dist/'s modules, so the
// build fails on one (module files named in the configuration excepted: not pigeon's).
// import.meta.url (paths next to a module: the writer's and spawner's main files, the native
// module, createRequire) becomes that module's own file URL, computed from the bundle's place
// at run time.
const INPROC_OUT = join(SRC, 'deliver-inproc.cjs');
const metaUrl = {
  name: 'import-meta-url',
  setup(b) {
    b.onLoad({ filter: /[\\/]dist[\\/].*\.js$/ }, (args) => {
      // the CommonJS packages on the delivery path that src/ loads with createRequire (node 20's
      // ES module import of each costs ≈ 8-35 ms) are bundled like the others here
      const text = readFileSync(args.path, 'utf8')
        .replaceAll("createRequire(import.meta.url)('ipaddr.js')", "require('ipaddr.js')")
        .replaceAll("createRequire(import.meta.url)('better-sqlite3')", "require('better-sqlite3')")
        // the yaml package (src/instance.ts loads it on first use): bundled, under the code cache
        .replaceAll("createRequire(import.meta.url)('yaml')", "require('yaml')");
      if (!text.includes('import.meta')) return /require\('(ipaddr\.js|better-sqlite3|yaml)'\)/.test(text) ? { contents: text, loader: 'js' } : undefined;
      const rel = relative(dirname(INPROC_OUT), args.path).split(sep).join('/');
      const out = text.replaceAll('import.meta.url', `__pigeonFileUrl(${JSON.stringify(rel)})`);
      if (out.includes('import.meta')) return { errors: [{ text: `${rel}: import.meta other than import.meta.url on the in-process delivery path` }] };
      return { contents: out, loader: 'js' };
    });
  },
};
// zod's classic API re-exports its catalogue of error messages in ≈ 40 languages (`z.locales`,
// ≈ 310 KB) and `z.fromJSONSchema` (≈ 20 KB): a quarter of the bundle, which every in-process
// delivery would read and hand V8 although pigeon uses neither (its messages are zod's English
// ones, from locales/en.js, which zod imports directly and stays). In this bundle `z.locales` is
// an empty namespace and `z.fromJSONSchema` throws; dist/'s modules (serve, the admin commands)
// keep the whole package.
const zodUnused = {
  name: 'zod-unused',
  setup(b) {
    b.onResolve({ filter: /^\.\.\/locales\/index\.js$|^\.\/from-json-schema\.js$/ }, (args) =>
      /[\\/]node_modules[\\/]zod[\\/]/.test(args.importer) ? { path: args.path, namespace: 'zod-unused' } : undefined,
    );
    b.onLoad({ filter: /.*/, namespace: 'zod-unused' }, (args) => ({
      contents: args.path.includes('from-json-schema')
        ? "export function fromJSONSchema() { throw new Error('z.fromJSONSchema is not in pigeon\\'s in-process delivery bundle'); }\n"
        : 'export {};\n',
      loader: 'js',
    }));
  },
};
const inproc = await build({
  write: false,
  stdin: {
    contents: "export { runDeliver } from './delivery/deliver.js';\nexport { remoteStore } from './peer/remote-store.js';\n",
    resolveDir: SRC,
    sourcefile: 'deliver-inproc-entry.js',
  },
  bundle: true,
  platform: 'node',
  target: 'node20',
  format: 'cjs',
  outfile: INPROC_OUT,
  legalComments: 'none',
  // no comments, no indentation: a third smaller and all ASCII, which every in-process delivery
  // reads and hands V8 as source (a file with one non-ASCII comment is decoded to a two-byte string)
  minifyWhitespace: true,
  logLevel: 'warning',
  banner: { js: "const __pigeonFileUrl = (rel) => require('node:url').pathToFileURL(require('node:path').join(__dirname, rel)).href;" },
  // packages with a native part (.node files found at run time, next to their own files);
  // better-sqlite3's JavaScript is bundled (src/store/sqlite.ts names its addon by path)
  external: ['@node-rs/*', 'fs-native-extensions', 'unix-dgram'],
  plugins: [metaUrl, zodUnused],
});
{
  const built = inproc.outputFiles.find((f) => f.path === INPROC_OUT);
  if (built === undefined) throw new Error(`esbuild wrote no ${INPROC_OUT}`);
  const allowed = [/^import\("@node-rs\/[a-z0-9-]+"\)/, /^import\(\(0, ?import_node_url\d*\.pathToFileURL\)\(path\d*\)\.href\)/];
  const bad = [...built.text.matchAll(/\bimport\((?!\))[^\n]{0,60}/g)].map((m) => m[0]).filter((m) => !allowed.some((re) => re.test(m)));
  if (bad.length > 0) {
    console.error(`${INPROC_OUT}: a dynamic import the bundle cannot follow would load a second copy of pigeon's modules: ${bad.join(' | ')}`);
    process.exit(1);
  }
  // each import() becomes a call of the function the loader passes in (src/delivery/inproc-bundle.ts:
  // on Node 20 an import() inside a script compiled with a code cache has no loader)
  const code = built.text.replace(/\bimport\((?!\))/g, '__pigeonImport(');
  // the first line names the build (src/delivery/inproc-bundle.ts: which code cache is its own)
  const text = `/* pigeon-build ${createHash('sha256').update(code).digest('hex').slice(0, 16)} */\n${code}`;
  // src/delivery/inproc-bundle.ts reads it as latin1: ASCII only (esbuild's default charset escapes
  // everything else; this holds it to that)
  const nonAscii = /[^\x00-\x7f]/.exec(text);
  if (nonAscii !== null) {
    console.error(`${INPROC_OUT}: a non-ASCII character at offset ${nonAscii.index}: the in-process loader reads the bundle as latin1`);
    process.exit(1);
  }
  writeFileSync(INPROC_OUT, text);
}
try {
  await trainCodeCache();
} catch (e) {
  // the cache only saves time: without it every in-process delivery compiles the bundle from
  // source (test/deliver-bundle.test.ts fails, naming it); e.g. a tree that the unprivileged
  // training user may not read (a clone in root's 0700 home)
  console.error(`bundle-deliver: warning: no code cache for ${INPROC_OUT} (in-process deliveries compile it from source, ≈ 50 ms more each): ${e instanceof Error ? e.message : String(e)}`);
}

/**
 * V8's code cache for dist/src/deliver-inproc.cjs, taken after one real in-process delivery into
 * a scratch instance (so the functions a delivery runs are in it, not only the bundle's top
 * level), written next to the bundle under its build ID (src/delivery/inproc-bundle.ts). The
 * delivery runs as an ordinary user (nobody, when the build runs as root), so that it writes the
 * mailbox itself as a pipe(8) `pigeon deliver` does, with pipe(8)'s environment (no NODE_OPTIONS:
 * V8 takes a cache only under the flags it was made with). Throws when that delivery fails.
 */
async function trainCodeCache() {
  for (const f of readdirSync(SRC)) if (/^deliver-inproc\.cjs\..*\.v8cache$/.test(f)) unlinkSync(join(SRC, f));
  const id = BUILD_LINE.exec(readFileSync(INPROC_OUT, 'utf8').slice(0, 64))?.[1];
  if (id === undefined) throw new Error(`${INPROC_OUT}: no build line`);
  const scratch = mkdtempSync(join(tmpdir(), 'pigeon-build-'));
  try {
    const inst = join(scratch, 'inst');
    const pigeon = (args, input = '') => {
      const r = spawnSync(process.execPath, [ENTRY, '-c', inst, ...args], { input, encoding: 'utf8' });
      if (r.status !== 0) throw new Error(`code cache: pigeon ${args.join(' ')}: exit ${r.status}: ${r.stdout}${r.stderr}`);
    };
    pigeon(['init', inst]);
    pigeon(['domain', 'add', 'build.test']);
    pigeon(['user', 'add', 'train@build.test', '--password-stdin'], 'x\n');
    const out = join(scratch, 'cache');
    const asUser = process.getuid?.() === 0 ? { uid: 65534, gid: 65534 } : {};
    if (asUser.uid !== undefined) {
      const r = spawnSync('chown', ['-R', '65534:65534', scratch]);
      if (r.status !== 0) throw new Error(`code cache: chown ${scratch}: ${r.stderr}`);
    }
    const trainer = `
      const fs = require('node:fs');
      const vm = require('node:vm');
      const req = require('node:module').createRequire(${JSON.stringify(INPROC_OUT)});
      import(${JSON.stringify(pathToFileURL(join(SRC, 'delivery', 'inproc-bundle.js')).href)}).then(async ({ loadInprocBundle }) => {
        const b = loadInprocBundle(${JSON.stringify(INPROC_OUT)}, { fs, vm, require: req, import: (s) => import(s) }, false);
        const { runDeliver, remoteStore } = b.exports;
        const r = await runDeliver({ config: ${JSON.stringify(inst)}, sender: 'build@build.test', original: undefined, mailbox: undefined, recipients: ['train@build.test'], input: process.stdin, remote: remoteStore });
        if (r.code !== 0) throw new Error('delivery: exit ' + r.code + ': ' + r.line);
        fs.writeFileSync(${JSON.stringify(out)}, b.script.createCachedData());
      }).catch((e) => { process.stderr.write(String(e && e.stack || e) + '\\n'); process.exitCode = 1; });`;
    const message = 'From: build@build.test\nTo: train@build.test\nSubject: code cache\n\nThe build trains the code cache with this message.\n';
    const r = spawnSync(process.execPath, ['-e', trainer], { input: message, encoding: 'utf8', env: { PATH: process.env.PATH ?? '/usr/bin:/bin' }, cwd: scratch, ...asUser });
    if (r.status !== 0) throw new Error(`code cache: the training delivery failed: exit ${r.status}: ${r.stdout}${r.stderr}`);
    const cache = readFileSync(out);
    if (cache.length < 1024) throw new Error(`code cache: only ${cache.length} bytes`);
    writeFileSync(cacheFile(INPROC_OUT, id), cache);
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }
}
