// A second, independent Dovecot for the upstream backend's tests: its own master process
// (`dovecot -F -c`), its own passdb (a passwd-file) and master-user passdb, its own Maildirs, its
// own TLS certificate from its own CA, on its own loopback ports (IMAP with STARTTLS, IMAPS,
// POP3 with STLS, POP3S), listening on 127.0.0.1 and 127.0.0.2 (the certificate names only
// 127.0.0.1: a client that connects to 127.0.0.2 must refuse it). Readiness is Dovecot's own
// "starting up" log line (its listeners are bound by then), not a poll.
import { spawn } from 'node:child_process';
import { mkdirSync, writeFileSync, chownSync, chmodSync, mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import type { Test } from 'tap';
import { owned, hold, release, stopGroup } from './reaper.js';
import { freePort, SERVE_START_MS } from './instance.js';
import { requireProgram } from './programs.js';
import { createCa, issueHostCert } from '../../certs/ca.js';

/** Dovecot's mail uid/gid in these tests (Debian's `mail`, as the proxy tests use). */
const MAIL_ID = 8;

export interface UpstreamDovecot {
  readonly ports: { readonly imap: number; readonly imaps: number; readonly pop3: number; readonly pop3s: number };
  /** the CA that signed its certificate (PEM file) */
  readonly caFile: string;
  /** a CA that did not (PEM file) */
  readonly otherCaFile: string;
  /** the Maildir Dovecot serves for `address` (created, owned by the mail uid) */
  maildir(address: string): string;
  /** what Dovecot logged so far */
  log(): string;
  /** the extra capability this Dovecot advertises after login (none other does) */
  readonly marker: string;
}

/**
 * Start it. `users`: address → password in its passdb; `master`: its master user and password
 * (Dovecot's `user*master` form). Returns null (after a failed assertion) when Dovecot is missing.
 */
export async function upstreamDovecot(t: Test, users: Record<string, string>, master: { user: string; password: string }): Promise<UpstreamDovecot | null> {
  if (!requireProgram(t, '/usr/sbin/dovecot', 'dovecot-core')) return null;
  if (!requireProgram(t, '/usr/lib/dovecot/imap-login', 'dovecot-imapd')) return null;
  if (!requireProgram(t, '/usr/lib/dovecot/pop3-login', 'dovecot-pop3d')) return null;
  // a short temp dir of its own: unix socket paths are limited to 108 bytes (base_dir), and the
  // test's own t.testdir() belongs to the proxy instance
  const dir = mkdtempSync('/tmp/pgup-');
  hold('dir', dir);
  chmodSync(dir, 0o755); // Dovecot's auth process (user dovecot) reads the passwd-files
  const run = join(dir, 'run');
  for (const d of ['run', 'state', 'mail']) mkdirSync(join(dir, d), { recursive: true });
  chownSync(join(dir, 'mail'), MAIL_ID, MAIL_ID);
  const ca = await createCa('upstream-test');
  const other = await createCa('someone-else');
  const cert = await issueHostCert(ca, 'upstream.test', ['127.0.0.1']);
  writeFileSync(join(dir, 'ca.crt'), ca.certPem);
  writeFileSync(join(dir, 'other-ca.crt'), other.certPem);
  writeFileSync(join(dir, 'server.crt'), cert.certPem);
  writeFileSync(join(dir, 'server.key'), cert.keyPem, { mode: 0o600 });
  writeFileSync(join(dir, 'passwd'), Object.entries(users).map(([u, p]) => `${u}:{PLAIN}${p}\n`).join(''), { mode: 0o644 });
  writeFileSync(join(dir, 'masters'), `${master.user}:{PLAIN}${master.password}\n`, { mode: 0o644 });
  const ports = { imap: await freePort(), imaps: await freePort(), pop3: await freePort(), pop3s: await freePort() };
  const marker = 'XUPSTREAM-TEST';
  writeFileSync(
    join(dir, 'dovecot.conf'),
    `base_dir = ${run}
state_dir = ${dir}/state
log_path = /dev/stderr
info_log_path = /dev/stderr
protocols = imap pop3
listen = 127.0.0.1, 127.0.0.2
ssl = yes
ssl_cert = <${dir}/server.crt
ssl_key = <${dir}/server.key
auth_mechanisms = plain login
auth_master_user_separator = *
auth_failure_delay = 0
first_valid_uid = ${MAIL_ID}
mail_location = maildir:~/Maildir
imap_capability = +${marker}
passdb {
  driver = passwd-file
  args = ${dir}/masters
  master = yes
}
passdb {
  driver = passwd-file
  args = ${dir}/passwd
}
userdb {
  driver = static
  args = uid=${MAIL_ID} gid=${MAIL_ID} home=${dir}/mail/%u
}
service imap-login {
  inet_listener imap {
    port = ${ports.imap}
  }
  inet_listener imaps {
    port = ${ports.imaps}
    ssl = yes
  }
  chroot =
}
service pop3-login {
  inet_listener pop3 {
    port = ${ports.pop3}
  }
  inet_listener pop3s {
    port = ${ports.pop3s}
    ssl = yes
  }
  chroot =
}
service anvil {
  chroot =
}
`,
  );
  const child = owned(spawn('/usr/sbin/dovecot', ['-F', '-c', join(dir, 'dovecot.conf')], { stdio: ['ignore', 'ignore', 'pipe'], detached: true }));
  let log = '';
  t.teardown(async () => {
    await stopGroup(child);
    rmSync(dir, { recursive: true, force: true });
    release('dir', dir);
  });
  child.stderr?.setEncoding('utf8');
  await new Promise<void>((res, rej) => {
    // a bound only for the message: under two suites at once a start can take many seconds
    const timer = setTimeout(() => rej(new Error(`the upstream Dovecot did not start: ${log}`)), SERVE_START_MS);
    child.stderr?.on('data', (s: string) => {
      log += s;
      if (/starting up/.test(log)) {
        clearTimeout(timer);
        res();
      }
    });
    child.once('exit', (c) => {
      clearTimeout(timer);
      rej(new Error(`the upstream Dovecot exited ${c}: ${log}`));
    });
  });
  return {
    ports,
    caFile: join(dir, 'ca.crt'),
    otherCaFile: join(dir, 'other-ca.crt'),
    marker,
    log: () => log,
    maildir(address) {
      const md = join(dir, 'mail', address, 'Maildir');
      for (const d of [join(dir, 'mail', address), md, join(md, 'cur'), join(md, 'new'), join(md, 'tmp')]) {
        mkdirSync(d, { recursive: true });
        chownSync(d, MAIL_ID, MAIL_ID);
      }
      return md;
    },
  };
}
