/**
 * NAME        src/native — the project's native module, build/Release/pigeon_spawn.node
 * SYNOPSIS    const n = nativeModule();   // the module, or why it is not there (a string)
 * DESCRIPTION native/pigeon_spawn.c, built by `npm install` / `npm run build` (scripts/build-native.mjs).
 *             Loaded once per process, from the project's build/ whether this file runs from
 *             dist/src/ (the build) or src/ (the sources, as the tests run them). Its users: the
 *             spawner (src/proxy/spawner-main.ts: vfork, reaping) and the socket pair of a
 *             TLS or received session (src/peer/pair.ts: socketpair), serve's workers' listeners
 *             (src/exclusive-accept.ts: EPOLLEXCLUSIVE). Each has a
 *             fallback for a process without the module. The `pigeon` command (dist/src/cli.cjs)
 *             loads it itself with process.dlopen for connectUnix (src/launcher.ts): this file needs node:module.
 */
import { createRequire } from 'node:module';

/** native/pigeon_spawn.c */
export interface PigeonNative {
  /** the child's pid; throws an Error whose `code` is the errno name */
  spawn(paths: string[], argv: string[], env: string[], cwd: string, uid: number, gid: number, fd: number): number;
  /** every exited child: pid, exit code (-1: killed), signal number (0: exited), … */
  reap(): number[];
  /** a close-on-exec duplicate */
  dup(fd: number): number;
  /** send `text` without blocking, shut the socket down, close it */
  lastWords(fd: number, text: Buffer): void;
  close(fd: number): void;
  /** a connected AF_UNIX stream pair, both ends close-on-exec; `sndbuf` > 0: each end's SO_SNDBUF (Linux doubles it, within net.core.wmem_max) */
  socketPair(sndbuf: number): [number, number];
  /** SO_SNDBUF of a socket, as the kernel keeps it */
  sendBufferSize(fd: number): number;
  /** a blocking, close-on-exec AF_UNIX stream connected to `path` (the `pigeon` command's hand-off loads the module itself: src/launcher.ts) */
  connectUnix(path: string): number;
  /** this process's wait on listening socket `fd` becomes EPOLLEXCLUSIVE (src/exclusive-accept.ts); false: libuv has not registered it yet */
  exclusiveAccept(fd: number): boolean;
}

let loaded: PigeonNative | string | undefined;

/** The module, or the one-line reason it cannot be loaded (not built, or built from an older source). */
export function nativeModule(): PigeonNative | string {
  if (loaded !== undefined) return loaded;
  const up = /\/dist\/src\/[^/]*$/.test(import.meta.url) ? '../../' : '../';
  try {
    const m = createRequire(import.meta.url)(`${up}build/Release/pigeon_spawn.node`) as Partial<PigeonNative>;
    loaded = typeof m.spawn === 'function' && typeof m.socketPair === 'function' && typeof m.sendBufferSize === 'function' && typeof m.exclusiveAccept === 'function' ? (m as PigeonNative) : 'the native module is older than its source; run `npm run build:native`';
  } catch (e) {
    loaded = `the native spawn module is not built (${(e instanceof Error ? e.message : String(e)).split('\n')[0]}); run \`npm run build:native\` (needs g++, make, python3)`;
  }
  return loaded;
}
