/**
 * NAME        auth/passwd-file — passwords from a Dovecot passwd-file
 * SYNOPSIS    pigeon.yaml:  auth: { chain: [database, passwd-file], passwd_file: /etc/dovecot/users }
 * DESCRIPTION Reads `user:{SCHEME}hash:uid:gid:gecos:home:shell:extra` lines (Dovecot's format; `#`
 *             comments), re-read when the file changes. Keys are full addresses (a bare name gets
 *             no domain and never matches). A user that this file authenticates and that the
 *             database does not hold yet is added to the database (without a password) when its
 *             domain exists there, so settings and the mailbox allocation work as for any user.
 *             The file is read as bytes; a line that is not valid UTF-8 is skipped (its user is
 *             unknown here), never decoded with replacement characters.
 * DIAGNOSTICS An unreadable file makes the source answer "unavailable" (tempfail), never "unknown".
 * SECURITY    Hashes stay in memory only; nothing from the file is logged.
 */
import { readFileSync, statSync } from 'node:fs';
import type { PasswordSource } from './database.js';

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

export function passwdFileSource(path: string): PasswordSource {
  let cache: { mtimeMs: number; size: number; map: Map<string, string> } | null = null;
  const load = (): Map<string, string> => {
    const st = statSync(path);
    if (cache && cache.mtimeMs === st.mtimeMs && cache.size === st.size) return cache.map;
    const map = new Map<string, string>();
    for (const raw of lines(readFileSync(path))) {
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
