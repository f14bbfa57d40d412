/**
 * NAME        backends/courier — start Courier-IMAP's imapd / courierpop3d for an authenticated user
 * SYNOPSIS    imap.backend = courier, pop3.backend = courier (any scope: `pigeon config set`);
 *             binaries: this module's section of pigeon.yaml, `courier: { imapd: PATH, pop3d:
 *             PATH }` (Debian: /usr/bin/imapd, /usr/lib/courier/courier/courierpop3d; `pigeon
 *             init` writes this clone's .cache/courier instead when only that has them)
 * DESCRIPTION Does what Courier's own imaplogin/pop3login do after authlib said yes: as the mail
 *             user, in the Maildir, exec `imapd MAILDIR` / `courierpop3d MAILDIR` with the
 *             environment couriertcpd + /etc/courier/imapd + authlib would give (AUTHENTICATED,
 *             IMAPLOGINTAG, TCPREMOTEIP/PORT, TCPLOCALIP/PORT, MAILDIR, MAILDIRQUOTA, Debian's
 *             IMAP_CAPABILITY …). No authdaemond, no authlib module, no /etc/courier file is used.
 *             IMAP: Courier answers the login tag with a bare `<tag> OK LOGIN Ok.`; the proxy then
 *             sends it an internal CAPABILITY and gives the client `<tag> OK [CAPABILITY …] Logged
 *             in` with Courier's real post-login list. Courier has no CLIENT_INPUT, and the
 *             capability exchange needs the pipes, so IMAP is always relayed. POP3: courierpop3d
 *             greets `+OK logged in.` itself; on plain TCP with nothing pipelined after PASS the
 *             client socket is handed to it, else relayed.
 *             FAM: imapd opens it at start; libgamin starts /usr/libexec/gam_server (Debian
 *             package gamin) for the mail uid, which needs a passwd entry. Without it Courier
 *             prints an ALERT and waits ~1.2 s; the proxy logs a warning with the fix and keeps
 *             the ALERT from the client. IDLE: plain mode rescanning every 5 s (IMAP_IDLE_TIMEOUT;
 *             Debian: 60 s) — Courier's FAM-driven ENHANCED idle lost events under load.
 * CONFIG      courier.imapd, courier.pop3d (node-local paths); per user: mailstore.quota becomes
 *             MAILDIRQUOTA (Maildir++ `maildirsize`, the same file the delivery agent keeps).
 * DIAGNOSTICS backendError start-failed (missing/unloadable binary, exit before greeting — the
 *             message names the path), protocol (unexpected line, `* BYE` from Courier; mbox
 *             mailboxes: Courier serves Maildir only), timeout.
 * SECURITY    Never runs Courier as root (spawned with the mail user's uid/gid); the environment
 *             is built from scratch; client data reaches Courier only as env values checked for
 *             CR/LF/NUL, and the login tag only if it is an IMAP atom.
 * SEE ALSO    backends/dovecot.ts, ../shared/backends.md §2
 */
import type { ChildProcess } from 'node:child_process';
import { childProcess } from '../src/builtins.js';
import type { Socket } from 'node:net';
import { accessSync, constants } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { join, resolve } from 'node:path';
import { z } from 'zod';
import type { Backend, BackendRequest, BackendSession } from './types.js';
import { backendError, safeParam as safe, localMailbox, pipeStderr, prepareHandoff, checkExecutable, childSession, pathSetting, sectionParser } from './types.js';
import type { MailUser } from '../src/mailuser.js';
import { BACKEND_START_MS, BACKEND_MAX_LINE } from '../src/limits.js';
import { StreamLines } from '../src/lines.js';

/** Debian's /etc/courier/imapd IMAP_CAPABILITY (Courier adds ENABLE UTF8=ACCEPT, and ACL with IMAP_ACL=1). */
export const DEBIAN_IMAP_CAPABILITY = 'IMAP4rev1 UIDPLUS CHILDREN NAMESPACE THREAD=ORDEREDSUBJECT THREAD=REFERENCES SORT QUOTA IDLE';

/** The rest of Debian's /etc/courier/imapd that imapd itself reads (the couriertcpd knobs are ours). */
const IMAP_ENV: Readonly<Record<string, string>> = {
  IMAP_CAPABILITY: DEBIAN_IMAP_CAPABILITY,
  IMAP_KEYWORDS: '1',
  IMAP_ACL: '1',
  // Debian ships 60: how often plain IDLE rescans the folder (see IMAP_ENHANCEDIDLE below)
  IMAP_IDLE_TIMEOUT: '5',
  IMAP_MAILBOX_SANITY_CHECK: '1',
  IMAP_DISABLETHREADSORT: '0',
  IMAP_CHECK_ALL_FOLDERS: '0',
  IMAP_OBSOLETE_CLIENT: '0',
  IMAP_USELOCKS: '1',
  // Debian's 0. ENHANCED idle waits for FAM events only and never rescans on its timeout: under
  // load gamin events got lost and IDLE stayed silent for minutes (seen in this suite), so plain
  // IDLE, which rescans every IMAP_IDLE_TIMEOUT seconds, is the reliable choice
  IMAP_ENHANCEDIDLE: '0',
  IMAP_TRASHFOLDERNAME: 'Trash',
  IMAP_EMPTYTRASH: 'Trash:7',
  IMAP_MOVE_EXPUNGE_TO_TRASH: '0',
  HEADERFROM: 'X-IMAP-Sender',
};

const FAM_ALERT = /^\* OK \[ALERT\] Filesystem notification initialization error/;
const INTERNAL_TAG = 'pigeon0';

function maildirOf(req: BackendRequest): string {
  const a = localMailbox(req);
  if (a.format !== 'maildir') {
    throw backendError('start-failed', `courier serves Maildir only, and the mailbox of ${req.address} is ${a.format} (${a.path}): set ${req.protocol}.backend dovecot for this user`);
  }
  return a.path;
}

function environment(req: BackendRequest, maildir: string): Record<string, string> {
  const env: Record<string, string> = {
    AUTHENTICATED: safe(req.address),
    AUTHADDR: safe(req.address),
    // imapd silently exits 0 when TCPREMOTEIP/PORT are empty (stdio forker: no peer address)
    TCPREMOTEIP: safe(req.client.peer.rip || '127.0.0.1'),
    TCPREMOTEPORT: String(req.client.peer.rport),
    TCPLOCALIP: safe(req.client.peer.lip || '127.0.0.1'),
    TCPLOCALPORT: String(req.client.peer.lport),
    MAILDIR: safe(maildir),
    HOME: safe(maildir),
    PATH: '/usr/bin:/bin',
    SENDMAIL: '/usr/sbin/sendmail',
  };
  if (req.quota > 0) env['MAILDIRQUOTA'] = `${req.quota}S`;
  if (req.protocol === 'imap') Object.assign(env, IMAP_ENV);
  return env;
}


/** The child's first lines, one at a time; what follows the last line read stays unread (close()). */
function lineReader(child: ChildProcess, what: string): StreamLines {
  const r = new StreamLines(child.stdout as NonNullable<ChildProcess['stdout']>, {
    max: BACKEND_MAX_LINE,
    timeoutMs: BACKEND_START_MS,
    fail: {
      tooLong: () => backendError('protocol', `overlong line from ${what}`),
      timeout: (ms) => {
        child.kill('SIGKILL');
        return backendError('timeout', `${what} did not answer within ${ms / 1000}s`);
      },
      closed: () => backendError('start-failed', `${what} closed its output before greeting`),
    },
    endFails: false, // its exit says why
  });
  child.once('exit', (code, sig) => r.fail(backendError('start-failed', `${what} exited with ${code ?? sig} before greeting`)));
  child.once('error', (e) => r.fail(backendError('start-failed', `cannot start ${what}: ${e.message}`)));
  return r;
}

function text(l: Buffer): string {
  return l.toString('latin1').replace(/\r?\n$/, '');
}

function famWarning(req: BackendRequest, mailUser: MailUser): void {
  req.logLine(
    `Warning: courier imapd could not reach gam_server (FAM): every login waits ~1.2 s; install Debian's gamin (/usr/libexec/gam_server) and give uid ${mailUser.uid} a passwd entry`,
  );
}

async function startImap(req: BackendRequest, bin: string, env: Record<string, string>, maildir: string, mailUser: MailUser): Promise<BackendSession> {
  const opts = mailUser.switchTo ? { uid: mailUser.uid, gid: mailUser.gid } : {};
  const tag = req.tag;
  if (tag !== null) {
    if (!/^[\x21-\x7e]+$/.test(tag) || /[(){%*"\\\]+]/.test(tag)) throw backendError('protocol', 'login tag is not an IMAP atom');
    env['IMAPLOGINTAG'] = tag;
  }
  const what = `courier imapd (${bin})`;
  const child = childProcess().spawn(bin, [maildir], { ...opts, env, cwd: maildir, stdio: ['pipe', 'pipe', 'pipe'] });
  child.stdin.on('error', () => {});
  pipeStderr(req, child, `, session=<${req.sessionId}>`);
  const r = lineReader(child, what);
  try {
    // 1. Courier's answer to the login: `<tag> OK LOGIN Ok.` (or `* PREAUTH Ready.` without a tag)
    for (;;) {
      const l = text((await r.line()).raw);
      if (FAM_ALERT.test(l)) {
        famWarning(req, mailUser);
        continue;
      }
      if (tag === null ? l.startsWith('* PREAUTH') : l.startsWith(`${tag} OK`)) break;
      if (l.startsWith('* OK')) continue;
      throw backendError('protocol', `unexpected greeting from ${what}: ${l.slice(0, 200)}`);
    }
    // 2. its real post-login capabilities
    child.stdin.write(`${INTERNAL_TAG} CAPABILITY\r\n`);
    let caps: string | null = null;
    for (;;) {
      const l = text((await r.line()).raw);
      const m = /^\* CAPABILITY (.+)$/i.exec(l);
      if (m?.[1] !== undefined) caps = m[1].trim();
      else if (l.startsWith(`${INTERNAL_TAG} OK`)) break;
      else if (l.startsWith(`${INTERNAL_TAG} `) || l.startsWith('* BYE')) throw backendError('protocol', `${what} answered CAPABILITY with: ${l.slice(0, 200)}`);
    }
    if (caps === null) throw backendError('protocol', `${what} listed no capabilities`);
    const greeting = tag === null ? `* PREAUTH [CAPABILITY ${caps}] Logged in as ${req.address}\r\n` : `${tag} OK [CAPABILITY ${caps}] Logged in\r\n`;
    return childSession(child, Buffer.from(greeting, 'latin1'), false);
  } catch (e) {
    child.kill('SIGKILL');
    throw e;
  } finally {
    r.close();
  }
}

async function startPop3(req: BackendRequest, bin: string, env: Record<string, string>, maildir: string, mailUser: MailUser): Promise<BackendSession> {
  const opts = mailUser.switchTo ? { uid: mailUser.uid, gid: mailUser.gid } : {};
  const what = `courier pop3d (${bin})`;
  if (req.handoff) {
    // courierpop3d greets the client itself; the router hands off only when nothing was pipelined.
    // Our earlier replies must be on the wire before Courier writes to the socket; if the client
    // sent more while they were flushed, Courier (no CLIENT_INPUT) cannot be given those bytes:
    // they go back in front and the session is relayed through pipes instead.
    checkExecutable(bin, what);
    const sock = req.handoff.socket;
    const late = await prepareHandoff(sock, Buffer.alloc(0), BACKEND_START_MS);
    if (late.length > 0) sock.unshift(late);
    else {
      // Courier leaves Nagle on: its greeting would wait for the ACK of our last reply (~40 ms)
      (sock as Partial<Socket>).setNoDelay?.(true);
      const child = childProcess().spawn(bin, [maildir], { ...opts, env, cwd: maildir, stdio: [sock, sock, 'pipe'] });
      pipeStderr(req, child, `, session=<${req.sessionId}>`);
      await new Promise<void>((resolve, reject) => {
        child.once('spawn', () => resolve());
        child.once('error', (e) => reject(backendError('start-failed', `cannot start ${what}: ${e.message}`)));
      });
      return childSession(child, Buffer.alloc(0), true);
    }
  }
  const child = childProcess().spawn(bin, [maildir], { ...opts, env, cwd: maildir, stdio: ['pipe', 'pipe', 'pipe'] });
  child.stdin.on('error', () => {});
  pipeStderr(req, child, `, session=<${req.sessionId}>`);
  const r = lineReader(child, what);
  try {
    const l = (await r.line()).raw;
    if (!text(l).startsWith('+OK')) throw backendError('protocol', `unexpected greeting from ${what}: ${text(l).slice(0, 200)}`);
    return childSession(child, l, false);
  } catch (e) {
    child.kill('SIGKILL');
    throw e;
  } finally {
    r.close();
  }
}

async function start(req: BackendRequest, bins: Binaries, mailUser: MailUser): Promise<BackendSession> {
  const maildir = maildirOf(req);
  const env = environment(req, maildir);
  return req.protocol === 'imap' ? startImap(req, bins.imapd, env, maildir, mailUser) : startPop3(req, bins.pop3d, env, maildir, mailUser);
}

export const DEBIAN_COURIER = { imapd: '/usr/bin/imapd', pop3d: '/usr/lib/courier/courier/courierpop3d' } as const;

/**
 * Courier's programs on this machine, for `pigeon init`: Debian's packages when installed; else
 * the .debs that scripts/install-deps.sh unpacked into this clone's .cache/courier (they
 * conflict with Dovecot in apt); else Debian's paths (`pigeon config test` says when a user
 * needs them and they are missing). `note`: a comment line saying where they were found, or ''.
 */
export function findCourier(root = resolve(fileURLToPath(new URL('..', import.meta.url)), import.meta.url.includes('/dist/') ? '..' : '.')): { imapd: string; pop3d: string; note: string } {
  const ok = (p: string): boolean => {
    try {
      accessSync(p, constants.X_OK);
      return true;
    } catch {
      return false;
    }
  };
  if (ok(DEBIAN_COURIER.imapd) && ok(DEBIAN_COURIER.pop3d)) return { ...DEBIAN_COURIER, note: '' };
  const cache = { imapd: join(root, '.cache', 'courier', 'usr', 'bin', 'imapd'), pop3d: join(root, '.cache', 'courier', 'usr', 'lib', 'courier', 'courier', 'courierpop3d') };
  if (ok(cache.imapd) && ok(cache.pop3d)) {
    return { ...cache, note: `\n# Found unpacked by scripts/install-deps.sh in ${join(root, '.cache', 'courier')} (Debian's packages\n# install ${DEBIAN_COURIER.imapd} and ${DEBIAN_COURIER.pop3d}).` };
  }
  return { ...DEBIAN_COURIER, note: '' };
}

const sectionSchema = z.strictObject({ imapd: pathSetting.default(DEBIAN_COURIER.imapd), pop3d: pathSetting.default(DEBIAN_COURIER.pop3d) }).prefault({});
type Binaries = z.output<typeof sectionSchema>;

export default {
  kind: 'backend',
  name: 'courier',
  summary: "Courier-IMAP imapd / courierpop3d started as Courier's login would, as the mail user",
  serves: 'local',
  formats: ['maildir'],
  section: {
    key: 'courier',
    parse: sectionParser(sectionSchema),
    template: () => {
      const c = findCourier();
      return `# Courier-IMAP (Debian courier-imap / courier-pop): the imapd and courierpop3d programs themselves,
# not the couriertcpd start scripts in /usr/lib/courier: imap.backend / pop3.backend = courier.${c.note}
courier:
  imapd: ${c.imapd}
  pop3d: ${c.pop3d}
`;
    },
  },
  create: (bins, ctx) => ({
    acceptsHandoff: (protocol, input) => protocol === 'pop3' && input.length === 0,
    start: (req) => start(req, bins, ctx.mailUser),
  }),
  // imapd prints its version; courierpop3d has none, but refuses a Maildir that is not there
  probe: {
    imap: { setting: 'courier.imapd', path: (b) => b.imapd, args: ['--version'], expect: /Courier-IMAP/, what: "Courier's imapd (Debian courier-imap)" },
    pop3: { setting: 'courier.pop3d', path: (b) => b.pop3d, args: ['/nonexistent/pigeon-config-test'], expect: /^-ERR chdir \/nonexistent\/pigeon-config-test failed/m, what: "Courier's courierpop3d (Debian courier-pop)" },
  },
} satisfies Backend<Binaries>;
