/**
 * NAME        src/mailuser — the system user that owns mailboxes and runs per-user work
 * DESCRIPTION `mail_user` from pigeon.yaml (Debian's `mail`, uid 8, by default). When pigeon runs
 *             as root, backends and deliveries are spawned with this uid/gid and mailboxes are
 *             chowned to it; when pigeon runs as an ordinary user, everything runs as that user.
 * SECURITY    Never hands a mailbox or a backend to root.
 */
import { readFileSync } from 'node:fs';
import { AppError } from './errors.js';

export interface MailUser {
  readonly name: string;
  readonly uid: number;
  readonly gid: number;
  /** true when the current process must switch to uid/gid for per-user work */
  readonly switchTo: boolean;
}

export function resolveMailUser(name: string): MailUser {
  const myUid = process.getuid?.() ?? 0;
  const myGid = process.getgid?.() ?? 0;
  if (myUid !== 0) return { name: process.env['USER'] ?? String(myUid), uid: myUid, gid: myGid, switchTo: false };
  let uid: number | undefined;
  let gid: number | undefined;
  if (/^\d+$/.test(name)) {
    uid = Number(name);
    gid = uid;
  } else {
    for (const line of readFileSync('/etc/passwd', 'utf8').split('\n')) {
      const f = line.split(':');
      if (f[0] === name) {
        uid = Number(f[2]);
        gid = Number(f[3]);
        break;
      }
    }
  }
  if (uid === undefined || gid === undefined || !Number.isInteger(uid) || !Number.isInteger(gid)) {
    throw new AppError('CONFIG_INVALID', `mail_user: no system user ${JSON.stringify(name)} (create it, e.g. "useradd --system vmail", or set mail_user)`);
  }
  if (uid === 0) throw new AppError('CONFIG_INVALID', 'mail_user: mailboxes and backends never run as root; choose another user');
  return { name, uid, gid, switchTo: true };
}
