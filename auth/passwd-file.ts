/**
 * NAME        auth/passwd-file — passwords from a Dovecot passwd-file
 * SYNOPSIS    pigeon.yaml:  auth: { chain: [database, passwd-file], passwd_file: /etc/dovecot/users }
 * DESCRIPTION Reads `user:{SCHEME}hash:uid:gid:gecos:home:shell:extra` lines (Dovecot's format; `#`
 *             comments), re-read when the file changes. Keys are full addresses (a bare name gets
 *             no domain and never matches). A user that this file authenticates and that the
 *             database does not hold yet is added to the database (without a password) when its
 *             domain exists there, so settings and the mailbox allocation work as for any user.
 * DIAGNOSTICS An unreadable file makes the source answer "unavailable" (tempfail), never "unknown".
 * SECURITY    Hashes stay in memory only; nothing from the file is logged.
 */
import { readFileSync, statSync } from 'node:fs';
import type { PasswordSource } from './database.js';

export function passwdFileSource(path: string): PasswordSource {
  let cache: { mtimeMs: number; size: number; map: Map<string, string> } | null = null;
  const load = (): Map<string, string> => {
    const st = statSync(path);
    if (cache && cache.mtimeMs === st.mtimeMs && cache.size === st.size) return cache.map;
    const map = new Map<string, string>();
    for (const raw of readFileSync(path, 'utf8').split('\n')) {
      const line = raw.replace(/\r$/, '');
      if (line.trim() === '' || line.trimStart().startsWith('#')) continue;
      const f = line.split(':');
      const user = (f[0] ?? '').toLowerCase();
      if (user.includes('@') && f[1]) map.set(user, f[1]);
    }
    cache = { mtimeMs: st.mtimeMs, size: st.size, map };
    return map;
  };
  return {
    name: 'passwd-file',
    provisions: true,
    hashOf(address) {
      return load().get(address) ?? null;
    },
  };
}
