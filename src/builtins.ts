/**
 * NAME        src/builtins — node:child_process, node:net, node:crypto and node:stream, loaded on first use
 * SYNOPSIS    import { childProcess, cryptoModule, netModule, streamModule } from './builtins.js';
 *             childProcess().spawn(…); netModule().connect(…); cryptoModule().createHash(…)
 * DESCRIPTION An in-process `pigeon deliver` (one process per message under pipe(8)) initialises
 *             every module on its import graph, the backends and the log among them, and a
 *             top-level import of node:child_process or node:net made each such process load both
 *             (child_process brings net, dgram and their streams): ≈ 4 ms of CPU, more than the
 *             delivery's own file writes, for modules it never calls. The modules that start
 *             processes or open sockets take them from here when they do; a delivery to a local
 *             mailbox as the mail user loads neither (test/deliver-bundle.test.ts). node:crypto
 *             likewise (≈ 4 ms of a process start: node compiles its JavaScript on first load):
 *             the password schemes, the peer link, SCRAM and the certificate checks are on the
 *             import graph of a delivery, and none of them runs in one to a local mailbox (whose
 *             Maildir names take their random part from Math.random: unique, not secret). And
 *             node:stream (≈ 2 ms: its JavaScript and about twenty internal stream modules), which
 *             on that path only the stdio forker's duplex needs, on its first session
 *             (forkers/stdio.ts). Types still come from `import type`, which costs nothing at run
 *             time.
 */
import { createRequire } from 'node:module';

type ChildProcessModule = typeof import('node:child_process');
type NetModule = typeof import('node:net');
type CryptoModule = typeof import('node:crypto');
type StreamModule = typeof import('node:stream');

let load: NodeJS.Require | undefined;
let cp: ChildProcessModule | undefined;
let net: NetModule | undefined;
let crypto: CryptoModule | undefined;
let stream: StreamModule | undefined;

/** node:child_process (loaded on the first call). */
export function childProcess(): ChildProcessModule {
  return (cp ??= (load ??= createRequire(import.meta.url))('node:child_process') as ChildProcessModule);
}

/** node:net (loaded on the first call). */
export function netModule(): NetModule {
  return (net ??= (load ??= createRequire(import.meta.url))('node:net') as NetModule);
}

/** node:crypto (loaded on the first call). */
export function cryptoModule(): CryptoModule {
  return (crypto ??= (load ??= createRequire(import.meta.url))('node:crypto') as CryptoModule);
}

/** node:stream (loaded on the first call). */
export function streamModule(): StreamModule {
  return (stream ??= (load ??= createRequire(import.meta.url))('node:stream') as StreamModule);
}
