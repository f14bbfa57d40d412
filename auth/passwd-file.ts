/**
 * NAME        auth/passwd-file — auth source: passwords from a Dovecot passwd-file
 * SYNOPSIS    pigeon.yaml:  auth: { chain: [database, passwd-file], passwd_file: /etc/dovecot/users }
 * DESCRIPTION Reads `user:{SCHEME}hash:uid:gid:gecos:home:shell:extra` lines (Dovecot's format; `#`
 *             comments), re-read when the file changes. Keys are full addresses (a bare name gets
 *             no domain and never matches). A user that this file authenticates and that the
 *             database does not hold yet is added to the database (without a password) when its
 *             domain exists there, so settings and the mailbox allocation work as for any user.
 *             The file is read as bytes; a line that is not valid UTF-8 is skipped (its user is
 *             unknown here), never decoded with replacement characters.
 * CONFIG      auth.passwd_file: the file (relative to the instance directory); required when
 *             passwd-file is in auth.chain.
 * DIAGNOSTICS An unreadable file makes the source answer tempfail, never "unknown"; an unusable
 *             hash in it is a tempfail too.
 * SECURITY    Hashes stay in memory only; nothing from the file is logged.
 */
import { readFile, stat } from 'node:fs/promises';
import { isAbsolute, join } from 'node:path';
import type { AuthSource } from './types.js';
import { AppError, isAppError } from '../src/errors.js';
import { verifySecret } from './verify.js';

const STRICT_UTF8 = new TextDecoder('utf-8', { fatal: true });

function lines(data: Buffer): string[] {
  const out: string[] = [];
  let start = 0;
  while (start < data.length) {
    let end = data.indexOf(0x0a, start);
    if (end < 0) end = data.length;
    try {
      out.push(STRICT_UTF8.decode(data.subarray(start, end)));
    } catch {
      /* not UTF-8: no user of this line can be named, skip it */
    }
    start = end + 1;
  }
  return out;
}

/** The file's users and hashes, re-read when its mtime or size changes. */
function passwdFile(path: string): () => Promise<Map<string, string>> {
  let cache: { mtimeMs: number; size: number; map: Map<string, string> } | null = null;
  return async () => {
    const st = await stat(path);
    if (cache && cache.mtimeMs === st.mtimeMs && cache.size === st.size) return cache.map;
    const map = new Map<string, string>();
    for (const raw of lines(await readFile(path))) {
      const line = raw.replace(/\r$/, '');
      if (line.trim() === '' || line.trimStart().startsWith('#')) continue;
      const f = line.split(':');
      const user = (f[0] ?? '').toLowerCase();
      if (user.includes('@') && f[1]) map.set(user, f[1]);
    }
    cache = { mtimeMs: st.mtimeMs, size: st.size, map };
    return map;
  };
}

const passwdFileSource: AuthSource<{ file: string | null }> = {
  kind: 'auth',
  name: 'passwd-file',
  summary: 'a Dovecot passwd-file (user@domain:{SCHEME}hash:…); users it authenticates are added to the database',
  configKeys: ['passwd_file'],
  parseConfig(auth, used) {
    const v = auth['passwd_file'] ?? null;
    if (v !== null && (typeof v !== 'string' || v === '' || /[\0\n]/.test(v))) throw new AppError('CONFIG_INVALID', 'passwd_file: expected a file path or null');
    if (used && v === null) throw new AppError('CONFIG_INVALID', 'passwd_file: chain has passwd-file but auth.passwd_file is not set');
    return { file: v };
  },
  create(config, ctx) {
    const path = config.file === null ? '' : isAbsolute(config.file) ? config.file : join(ctx.dir, config.file);
    const load = passwdFile(path);
    return {
      provisions: true,
      async authenticate(address, password) {
        let stored: string | undefined;
        try {
          stored = (await load()).get(address);
        } catch (e) {
          return { kind: 'tempfail', detail: `password source unavailable: ${path}: ${(e as NodeJS.ErrnoException).code ?? 'unreadable'}` };
        }
        if (stored === undefined) return { kind: 'unknown' };
        try {
          return (await verifySecret(stored, password)) ? { kind: 'ok' } : { kind: 'bad' };
        } catch (e) {
          return { kind: 'tempfail', detail: isAppError(e) ? `password of ${address} in ${path}: ${e.message}` : 'password verification failed' };
        }
      },
    };
  },
};

export default passwdFileSource;
