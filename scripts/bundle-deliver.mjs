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
import { chmodSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const SRC = join(ROOT, 'dist', 'src');
const ENTRY = join(SRC, 'cli.js');
const LAUNCHER = join(SRC, 'launcher.js');
const LAUNCHER_OUT = join(SRC, 'cli.cjs');

/** What may be inlined into cli.js (paths under dist/src/); errors.js for its EX constants only. */
const INLINE = new Set(['delivery/deliver-cli.js', 'delivery/outcome.js', 'delivery/handoff-client.js', 'delivery/handoff-file.js', 'errors.js', 'instance-path.js', 'drain.js']);

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
