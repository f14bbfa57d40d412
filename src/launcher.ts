#!/usr/bin/env node
/**
 * NAME        src/launcher — the file the `pigeon` command runs: dist/src/cli.cjs
 * SYNOPSIS    pigeon [-c DIR|FILE] COMMAND ...   (the same command line as node dist/src/cli.js)
 * DESCRIPTION Postfix pipe(8) starts one `pigeon deliver` per message, and when the instance's
 *             `pigeon serve` runs, that process only hands the message over. On Node 20 an ES
 *             module entry costs that process ≈ 7 ms of CPU more than a CommonJS one (the ES
 *             module loader, and the module wrappers of the node built-ins it imports): a third
 *             of what a hand-off costs beyond a bare `node -e 0`. So `npm run build` bundles this
 *             file, with the delivery entry point and the small modules of the hand-off inlined
 *             (scripts/bundle-deliver.mjs, the same closed list as dist/src/cli.js), as CommonJS
 *             into dist/src/cli.cjs, and package.json's bin and scripts/link-pigeon.sh make that
 *             file the `pigeon` command. A plain `deliver` command line is served here; any
 *             other command line loads dist/src/cli.js (an ES module, dynamic import) and runs
 *             its main(): the same commands, texts and exit codes as `node dist/src/cli.js`.
 * SEE ALSO    src/cli.ts, src/delivery/deliver-cli.ts, scripts/bundle-deliver.mjs,
 *             test/deliver-handoff.test.ts (what a hand-off through this file loads)
 */
import { deliverCommand, loadDeliveryCode, parseDeliverArgv, type DeliveryCode } from './delivery/deliver-cli.js';
import type { HandoffNative } from './delivery/handoff-client.js';
import { loadInprocBundle } from './delivery/inproc-bundle.js';

/** sysexits(3) values answered before src/errors.ts is loaded */
const EX_OK = 0;
const EX_SOFTWARE = 70;

/**
 * The native module's blocking AF_UNIX connect (native/pigeon_spawn.c, build/Release next to
 * dist/), so that a hand-off never loads node:net (src/delivery/handoff-client.ts); undefined
 * when it is not built, is older than connectUnix, when this file does not run as the CommonJS
 * bundle (no require), or with PIGEON_DELIVER_NATIVE=0 (the node:net way, for tests).
 */
function handoffNative(): HandoffNative | undefined {
  if (process.env['PIGEON_DELIVER_NATIVE'] === '0' || typeof require !== 'function' || typeof __dirname !== 'string') return undefined;
  try {
    // process.dlopen, not require(): no module resolution (require reads package.json to resolve
    // even an absolute path, ≈ 0.6 ms of a deliver); loading it again later (src/native.ts) is fine
    const mod = { exports: {} as Partial<HandoffNative> };
    process.dlopen(mod, `${__dirname}/../../build/Release/pigeon_spawn.node`);
    const m = mod.exports;
    return typeof m.connectUnix === 'function' ? { connectUnix: m.connectUnix } : undefined;
  } catch {
    return undefined;
  }
}

/**
 * The in-process delivery code (when no running serve takes the message) as one CommonJS file,
 * dist/src/deliver-inproc.cjs (`npm run build`, scripts/bundle-deliver.mjs), compiled with the
 * V8 code cache the build wrote for it (src/delivery/inproc-bundle.ts): on Node 20 the ES module
 * loader's cost is per module file, and that code is ≈ 150 files of dist/ and of the packages it
 * uses. Without the bundle (tsc alone), or when this file does not run as the CommonJS bundle:
 * dist/'s module files, through node's loader.
 */
async function deliveryCode(): Promise<DeliveryCode> {
  if (typeof require !== 'function' || typeof __dirname !== 'string') return loadDeliveryCode();
  const file = `${__dirname}/deliver-inproc.cjs`;
  const fs = require('node:fs') as typeof import('node:fs');
  if (!fs.existsSync(file)) return loadDeliveryCode();
  return loadInprocBundle<DeliveryCode>(file, { fs, vm: require('node:vm') as typeof import('node:vm'), require, import: (specifier) => import(specifier) }).exports;
}

async function run(argv: readonly string[]): Promise<number> {
  // Node's compile cache (module.enableCompileCache, 22.1 and later) as in src/cli.ts; told by
  // the version, because on Node 20 even loading node:module costs a deliver ≈ 1 ms (it brings
  // the ES module loader and the source-map support with it)
  const [major = 0, minor = 0] = process.versions.node.split('.').map(Number);
  if (major > 22 || (major === 22 && minor >= 1)) (await import('./compile-cache.js')).enableCompileCache();
  const o = parseDeliverArgv(argv);
  if (o !== null) {
    // never throws: a delivery code that does not load is its 75 and one line
    const handedOff = await deliverCommand(o, handoffNative(), deliveryCode);
    const code = typeof process.exitCode === 'number' ? process.exitCode : EX_OK;
    // serve has answered and the status line is out (stdout is a pipe or a file: written
    // synchronously): exit now rather than wind the event loop down (≈ 1 ms)
    if (handedOff) process.exit(code);
    return code;
  }
  const { main } = await import('./cli.js');
  return main(argv);
}

run(process.argv).then(
  (code) => {
    process.exitCode = code;
  },
  (e: unknown) => {
    process.stderr.write(`pigeon: internal error: ${String(e)}\n`);
    process.exitCode = EX_SOFTWARE;
  },
);
