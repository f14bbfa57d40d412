/**
 * NAME        src/builtins — node:child_process and node:net, loaded on first use
 * SYNOPSIS    import { childProcess, netModule } from './builtins.js';
 *             childProcess().spawn(…); netModule().connect(…)
 * DESCRIPTION An in-process `pigeon deliver` (one process per message under pipe(8)) initialises
 *             every module on its import graph, the backends and the log among them, and a
 *             top-level import of node:child_process or node:net made each such process load both
 *             (child_process brings net, dgram and their streams): ≈ 4 ms of CPU, more than the
 *             delivery's own file writes, for modules it never calls. The modules that start
 *             processes or open sockets take them from here when they do; a delivery to a local
 *             mailbox as the mail user loads neither (test/deliver-bundle.test.ts). Types still
 *             come from `import type`, which costs nothing at run time.
 */
import { createRequire } from 'node:module';

type ChildProcessModule = typeof import('node:child_process');
type NetModule = typeof import('node:net');

let load: NodeJS.Require | undefined;
let cp: ChildProcessModule | undefined;
let net: NetModule | undefined;

/** node:child_process (loaded on the first call). */
export function childProcess(): ChildProcessModule {
  return (cp ??= (load ??= createRequire(import.meta.url))('node:child_process') as ChildProcessModule);
}

/** node:net (loaded on the first call). */
export function netModule(): NetModule {
  return (net ??= (load ??= createRequire(import.meta.url))('node:net') as NetModule);
}
