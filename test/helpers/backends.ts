// The proxy test matrix: every proxy test file runs its cases once per local backend.
// Dovecot comes from Debian's packages; Courier's imapd/pop3d conflict with Dovecot in apt, so
// scripts/install-deps.sh unpacks their .debs into .cache/courier (Debian's paths win when Courier
// is installed for real). A missing binary fails loudly, naming the package.
import { existsSync, writeFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import type { Test } from 'tap';
import { ROOT, type Inst } from './instance.js';
import { requireProgram } from './programs.js';

export const BACKENDS = ['dovecot', 'courier'] as const;
export type BackendName = (typeof BACKENDS)[number];

const DEBIAN_COURIER = { imapd: '/usr/bin/imapd', pop3d: '/usr/lib/courier/courier/courierpop3d' } as const;
const CACHE_COURIER = {
  imapd: join(ROOT, '.cache', 'courier', 'usr', 'bin', 'imapd'),
  pop3d: join(ROOT, '.cache', 'courier', 'usr', 'lib', 'courier', 'courier', 'courierpop3d'),
} as const;

/** Courier's binaries on this machine: Debian's install, else the unpacked .debs. */
export function courierBinaries(): { imapd: string; pop3d: string } {
  return existsSync(DEBIAN_COURIER.imapd) && existsSync(DEBIAN_COURIER.pop3d) ? { ...DEBIAN_COURIER } : { ...CACHE_COURIER };
}

/**
 * Make `backend` the IMAP and POP3 backend of everyone in `inst`: one `pigeon config set --global`
 * per protocol, as an admin would. Every instance gets a conf.d drop-in with Courier's binary
 * paths, so a test may also switch single users to the other backend.
 * Returns false (after a failed assertion) when the backend's programs are missing.
 */
export function useBackend(t: Test, inst: Inst, backend: BackendName): boolean {
  const bin = courierBinaries();
  mkdirSync(join(inst.dir, 'conf.d'), { recursive: true });
  writeFileSync(join(inst.dir, 'conf.d', '40-courier.yaml'), `courier:\n  imapd: ${bin.imapd}\n  pop3d: ${bin.pop3d}\n`);
  if (backend === 'dovecot') {
    return requireProgram(t, '/usr/lib/dovecot/imap', 'dovecot-imapd') && requireProgram(t, '/usr/lib/dovecot/pop3', 'dovecot-pop3d');
  }
  if (!requireProgram(t, bin.imapd, 'courier-imap (.deb unpacked by scripts/install-deps.sh)')) return false;
  if (!requireProgram(t, bin.pop3d, 'courier-pop (.deb unpacked by scripts/install-deps.sh)')) return false;
  if (!requireProgram(t, '/usr/libexec/gam_server', 'gamin')) return false;
  for (const key of ['imap.backend', 'pop3.backend']) {
    const r = inst.run(['config', 'set', '--global', key, backend]);
    if (r.status !== 0) throw new Error(`config set ${key} ${backend}: ${r.stderr}`);
  }
  return true;
}

/** conf.d text pointing `backend`'s IMAP (or POP3) binary at `path` (merged over useBackend's drop-in). */
export function binaryConf(backend: BackendName, protocol: 'imap' | 'pop3', path: string): string {
  const key = backend === 'dovecot' ? protocol : protocol === 'imap' ? 'imapd' : 'pop3d';
  return `${backend}:\n  ${key}: ${path}\n`;
}
