/**
 * A private Postfix instance for the delivery tests (backends.md §3): its own config, queue and
 * data directories, every listener on 127.0.0.1, log in a file. Started with `postfix -c DIR
 * start`, stopped in teardown. The master.cf lines for pigeon are exactly the ones docs/delivery.md
 * documents.
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, writeFileSync, readFileSync, existsSync, chownSync, mkdtempSync, rmSync, copyFileSync, chmodSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { need } from './delivery-env.js';
import { hold, release } from './reaper.js';

// the one free-port helper (below the ephemeral range, checked on its host)
export { freePort } from './instance.js';

export interface PostfixOptions {
  /** where the log is copied at stop */
  readonly dir: string;
  readonly smtpPort: number;
  /** extra main.cf lines */
  readonly main: string;
  /** extra master.cf lines (pigeon services) */
  readonly master: string;
}

export interface Postfix {
  readonly conf: string;
  readonly log: () => string;
  stop(): void;
  flush(): void;
}

function postfix(conf: string, ...args: string[]): { status: number | null; out: string } {
  // postfix prints nothing when stderr is not a tty (backends.md §3.1): run it under script(1)
  const r = spawnSync('script', ['-qec', ['postfix', '-c', conf, ...args].join(' '), '/dev/null'], { encoding: 'utf8', timeout: 60_000 });
  return { status: r.status, out: `${r.stdout}${r.stderr}` };
}

export function startPostfix(o: PostfixOptions): Postfix {
  need('/usr/sbin/postfix', 'postfix');
  // unix socket paths are limited to 108 bytes: the instance lives in a short temp dir
  const base = mkdtempSync('/tmp/pf-');
  chmodSync(base, 0o755); // postfix and the mail user traverse it
  hold('dir', base);
  const conf = join(base, 'conf');
  const queue = join(base, 'queue');
  const data = join(base, 'data');
  mkdirSync(conf, { recursive: true });
  mkdirSync(queue, { recursive: true });
  mkdirSync(data, { recursive: true });
  const pfUid = Number(spawnSync('id', ['-u', 'postfix'], { encoding: 'utf8' }).stdout.trim());
  const pfGid = Number(spawnSync('id', ['-g', 'postfix'], { encoding: 'utf8' }).stdout.trim());
  chownSync(data, pfUid, pfGid);
  const logFile = join(base, 'maillog');
  writeFileSync(
    join(conf, 'main.cf'),
    `compatibility_level = 3.6
queue_directory = ${queue}
data_directory = ${data}
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.pigeon.test
mydomain = pigeon.test
myorigin = pigeon.test
mydestination =
local_transport = error:5.1.1 no local delivery here
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions = permit_mynetworks, reject
maillog_file = ${logFile}
maillog_file_prefixes = ${base}
smtp_host_lookup = native
disable_dns_lookups = yes
relayhost = [127.0.0.1]:9
default_transport = error:5.4.4 no outgoing mail in tests
biff = no
queue_run_delay = 2s
minimal_backoff_time = 2s
maximal_backoff_time = 4s
lmtp_connection_cache_on_demand = no
${o.main}
`,
  );
  writeFileSync(
    join(conf, 'master.cf'),
    `127.0.0.1:${o.smtpPort} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
${o.master}
`,
  );
  const check = postfix(conf, 'check');
  hold('postfix', conf);
  const start = postfix(conf, 'start');
  if (start.status !== 0) throw new Error(`postfix -c ${conf} start failed: ${check.out} ${start.out}`);
  return {
    conf,
    log: () => (existsSync(logFile) ? readFileSync(logFile, 'utf8') : ''),
    stop: () => {
      if (!existsSync(base)) return;
      postfix(conf, 'stop');
      try {
        copyFileSync(logFile, join(o.dir, 'maillog'));
      } catch {
        /* no log */
      }
      rmSync(base, { recursive: true, force: true });
      release('postfix', conf);
      release('dir', base);
    },
    flush: () => {
      postfix(conf, 'flush');
    },
  };
}

/** A raw SMTP submission over net (no client library). Returns the server's replies. */
export async function smtpSubmit(port: number, from: string, rcpts: readonly string[], message: string): Promise<string[]> {
  const { Dialog, dataOf } = await import('./delivery-lmtp.js');
  const sock = await new Promise<net.Socket>((res, rej) => {
    const s = net.connect({ host: '127.0.0.1', port }, () => res(s));
    s.once('error', rej);
  });
  try {
    const d = Dialog.of(sock);
    const out: string[] = [await d.line()];
    out.push(await d.cmd('EHLO client.pigeon.test'));
    out.push(await d.cmd(`MAIL FROM:<${from}>`));
    for (const r of rcpts) out.push(await d.cmd(`RCPT TO:<${r}>`));
    out.push(await d.cmd('DATA'));
    d.send(dataOf(message));
    out.push(await d.line());
    out.push(await d.cmd('QUIT'));
    return out;
  } finally {
    sock.destroy();
  }
}
