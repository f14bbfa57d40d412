/**
 * NAME        src/compile-cache — Node's on-disk compile cache for pigeon's own start-up
 * SYNOPSIS    enableCompileCache();   // first thing in src/cli.ts, before the dynamic imports
 * DESCRIPTION On a Node that has `module.enableCompileCache` (22.1 and later) the code pigeon
 *             loads is compiled once and reused by the next process from a cache directory of
 *             this user's own: `pigeon deliver` runs once per message under pipe(8). On Node 20
 *             (no such function) this does nothing at all, not even a stat. A cache directory
 *             that cannot be made safe is simply not used: start-up is slower, nothing else.
 * SECURITY    The directory is per uid (`$TMPDIR/pigeon-compile-cache-UID`), created 0700, and
 *             used only when it is a real directory owned by this uid that no one else can
 *             write: compiled code from a place another user controls would run as us.
 */
import module from 'node:module';
import { lstatSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

type WithCache = { enableCompileCache?: (dir?: string) => unknown };

export function enableCompileCache(): void {
  const enable = (module as unknown as WithCache).enableCompileCache;
  if (typeof enable !== 'function') return;
  const uid = process.getuid?.() ?? 0;
  const dir = join(tmpdir(), `pigeon-compile-cache-${uid}`);
  try {
    mkdirSync(dir, { mode: 0o700 });
  } catch {
    /* exists already: checked below */
  }
  try {
    const st = lstatSync(dir);
    if (!st.isDirectory() || st.uid !== uid || (st.mode & 0o077) !== 0) return;
    enable.call(module, dir);
  } catch {
    /* no cache: a slower start, nothing else */
  }
}
