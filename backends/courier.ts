/**
 * NAME        backends/courier — start Courier-IMAP's imapd / courierpop3d for an authenticated user
 * SYNOPSIS    imap.backend = courier, pop3.backend = courier (any scope: `pigeon config set`);
 *             binaries: courier.imapd / courier.pop3d in pigeon.yaml (Debian: /usr/bin/imapd,
 *             /usr/lib/courier/courier/courierpop3d)
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
 * DIAGNOSTICS BackendError start-failed (missing/unloadable binary, exit before greeting — the
 *             message names the path), protocol (unexpected line, `* BYE` from Courier; mbox
 *             mailboxes: Courier serves Maildir only), timeout.
 * SECURITY    Never runs Courier as root (spawned with the mail user's uid/gid); the environment
 *             is built from scratch; client data reaches Courier only as env values checked for
 *             CR/LF/NUL, and the login tag only if it is an IMAP atom.
 * SEE ALSO    backends/dovecot.ts, ../shared/backends.md §2
 */
import { spawn, type ChildProcess } from 'node:child_process';
import type { Socket } from 'node:net';
import type { Backend, BackendRequest, BackendSession } from './types.js';
import { BackendError, pipeStderr, prepareHandoff, checkExecutable } from './types.js';
import { BACKEND_START_MS } from '../src/limits.js';

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

function safe(v: string): string {
  if (/[\r\n\0]/.test(v)) throw new BackendError({ kind: 'protocol', detail: 'refusing CR/LF/NUL in backend parameters' });
  return v;
}

function maildirOf(req: BackendRequest): string {
  const a = req.allocation;
  if (a.format !== 'maildir') {
    throw new BackendError({ kind: 'start-failed', detail: `courier serves Maildir only, and the mailbox of ${req.address} is ${a.format} (${a.path}): set ${req.protocol}.backend dovecot for this user` });
  }
  return a.path;
}

function environment(req: BackendRequest, maildir: string): Record<string, string> {
  const env: Record<string, string> = {
    AUTHENTICATED: safe(req.address),
    AUTHADDR: safe(req.address),
    // imapd silently exits 0 when TCPREMOTEIP/PORT are empty (stdio forker: no peer address)
    TCPREMOTEIP: safe(req.peer.rip || '127.0.0.1'),
    TCPREMOTEPORT: String(req.peer.rport),
    TCPLOCALIP: safe(req.peer.lip || '127.0.0.1'),
    TCPLOCALPORT: String(req.peer.lport),
    MAILDIR: safe(maildir),
    HOME: safe(maildir),
    PATH: '/usr/bin:/bin',
    SENDMAIL: '/usr/sbin/sendmail',
  };
  if (req.quota > 0) env['MAILDIRQUOTA'] = `${req.quota}S`;
  if (req.protocol === 'imap') Object.assign(env, IMAP_ENV);
  return env;
}


/** Reads the child's first lines one at a time; what follows the last line read stays unread. */
class LineReader {
  private buf = Buffer.alloc(0);
  private waiter: (() => void) | null = null;
  private failure: BackendError | null = null;
  private readonly child: ChildProcess;
  private readonly what: string;
  private readonly timer: NodeJS.Timeout;
  private readonly onData = (c: Buffer): void => {
    this.buf = Buffer.concat([this.buf, c]);
    if (this.buf.length > 65536) this.fail(new BackendError({ kind: 'protocol', detail: `overlong line from ${this.what}` }));
    this.wake();
  };
  private readonly onExit = (code: number | null, sig: string | null): void =>
    this.fail(new BackendError({ kind: 'start-failed', detail: `${this.what} exited with ${code ?? sig} before greeting` }));
  private readonly onError = (e: Error): void => this.fail(new BackendError({ kind: 'start-failed', detail: `cannot start ${this.what}: ${e.message}` }));

  constructor(child: ChildProcess, what: string) {
    this.child = child;
    this.what = what;
    child.stdout?.on('data', this.onData);
    child.once('exit', this.onExit);
    child.once('error', this.onError);
    this.timer = setTimeout(() => {
      child.kill('SIGKILL');
      this.fail(new BackendError({ kind: 'timeout', detail: `${what} did not answer within ${BACKEND_START_MS / 1000}s` }));
    }, BACKEND_START_MS);
  }

  private fail(e: BackendError): void {
    this.failure ??= e;
    this.wake();
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }

  /** The next line, CRLF included. */
  async line(): Promise<Buffer> {
    for (;;) {
      const nl = this.buf.indexOf(0x0a);
      if (nl >= 0) {
        const l = this.buf.subarray(0, nl + 1);
        this.buf = this.buf.subarray(nl + 1);
        return l;
      }
      if (this.failure) throw this.failure;
      await new Promise<void>((r) => {
        this.waiter = r;
      });
    }
  }

  /** Stop reading: unread bytes go back in front of the child's stdout for the relay. */
  close(): void {
    clearTimeout(this.timer);
    this.child.stdout?.off('data', this.onData);
    this.child.off('exit', this.onExit);
    this.child.off('error', this.onError);
    this.child.stdout?.pause();
    if (this.buf.length > 0) this.child.stdout?.unshift(this.buf);
  }
}

function text(l: Buffer): string {
  return l.toString('latin1').replace(/\r?\n$/, '');
}

function famWarning(req: BackendRequest): void {
  req.logLine(
    `Warning: courier imapd could not reach gam_server (FAM): every login waits ~1.2 s; install Debian's gamin (/usr/libexec/gam_server) and give uid ${req.mailUser.uid} a passwd entry`,
  );
}

async function startImap(req: BackendRequest, bin: string, env: Record<string, string>, maildir: string, opts: { uid?: number; gid?: number }): Promise<BackendSession> {
  const tag = req.tag;
  if (tag !== null) {
    if (!/^[\x21-\x7e]+$/.test(tag) || /[(){%*"\\\]+]/.test(tag)) throw new BackendError({ kind: 'protocol', detail: 'login tag is not an IMAP atom' });
    env['IMAPLOGINTAG'] = tag;
  }
  const what = `courier imapd (${bin})`;
  const child = spawn(bin, [maildir], { ...opts, env, cwd: maildir, stdio: ['pipe', 'pipe', 'pipe'] });
  child.stdin.on('error', () => {});
  pipeStderr(req, child, `, session=<${req.sessionId}>`);
  const r = new LineReader(child, what);
  try {
    // 1. Courier's answer to the login: `<tag> OK LOGIN Ok.` (or `* PREAUTH Ready.` without a tag)
    for (;;) {
      const l = text(await r.line());
      if (FAM_ALERT.test(l)) {
        famWarning(req);
        continue;
      }
      if (tag === null ? l.startsWith('* PREAUTH') : l.startsWith(`${tag} OK`)) break;
      if (l.startsWith('* OK')) continue;
      throw new BackendError({ kind: 'protocol', detail: `unexpected greeting from ${what}: ${l.slice(0, 200)}` });
    }
    // 2. its real post-login capabilities
    child.stdin.write(`${INTERNAL_TAG} CAPABILITY\r\n`);
    let caps: string | null = null;
    for (;;) {
      const l = text(await r.line());
      const m = /^\* CAPABILITY (.+)$/i.exec(l);
      if (m?.[1] !== undefined) caps = m[1].trim();
      else if (l.startsWith(`${INTERNAL_TAG} OK`)) break;
      else if (l.startsWith(`${INTERNAL_TAG} `) || l.startsWith('* BYE')) throw new BackendError({ kind: 'protocol', detail: `${what} answered CAPABILITY with: ${l.slice(0, 200)}` });
    }
    if (caps === null) throw new BackendError({ kind: 'protocol', detail: `${what} listed no capabilities` });
    const greeting = tag === null ? `* PREAUTH [CAPABILITY ${caps}] Logged in as ${req.address}\r\n` : `${tag} OK [CAPABILITY ${caps}] Logged in\r\n`;
    return { child, greeting: Buffer.from(greeting, 'latin1'), handedOff: false };
  } catch (e) {
    child.kill('SIGKILL');
    throw e;
  } finally {
    r.close();
  }
}

async function startPop3(req: BackendRequest, bin: string, env: Record<string, string>, maildir: string, opts: { uid?: number; gid?: number }): Promise<BackendSession> {
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
      const child = spawn(bin, [maildir], { ...opts, env, cwd: maildir, stdio: [sock, sock, 'pipe'] });
      pipeStderr(req, child, `, session=<${req.sessionId}>`);
      await new Promise<void>((resolve, reject) => {
        child.once('spawn', () => resolve());
        child.once('error', (e) => reject(new BackendError({ kind: 'start-failed', detail: `cannot start ${what}: ${e.message}` })));
      });
      return { child, greeting: Buffer.alloc(0), handedOff: true };
    }
  }
  const child = spawn(bin, [maildir], { ...opts, env, cwd: maildir, stdio: ['pipe', 'pipe', 'pipe'] });
  child.stdin.on('error', () => {});
  pipeStderr(req, child, `, session=<${req.sessionId}>`);
  const r = new LineReader(child, what);
  try {
    const l = await r.line();
    if (!text(l).startsWith('+OK')) throw new BackendError({ kind: 'protocol', detail: `unexpected greeting from ${what}: ${text(l).slice(0, 200)}` });
    return { child, greeting: l, handedOff: false };
  } catch (e) {
    child.kill('SIGKILL');
    throw e;
  } finally {
    r.close();
  }
}

async function start(req: BackendRequest): Promise<BackendSession> {
  const maildir = maildirOf(req);
  const env = environment(req, maildir);
  const bin = req.protocol === 'imap' ? req.binaries.imap : req.binaries.pop3;
  const opts = req.mailUser.switchTo ? { uid: req.mailUser.uid, gid: req.mailUser.gid } : {};
  return req.protocol === 'imap' ? startImap(req, bin, env, maildir, opts) : startPop3(req, bin, env, maildir, opts);
}

export default {
  kind: 'backend',
  name: 'courier',
  summary: "Courier-IMAP imapd / courierpop3d started as Courier's login would, as the mail user",
  binaries: (config) => ({ imap: config.courier.imapd, pop3: config.courier.pop3d }),
  acceptsHandoff: (protocol, input) => protocol === 'pop3' && input.length === 0,
  start,
  // imapd prints its version; courierpop3d has none, but refuses a Maildir that is not there
  probe: {
    imap: { setting: 'courier.imapd', args: ['--version'], expect: /Courier-IMAP/, what: "Courier's imapd (Debian courier-imap)" },
    pop3: { setting: 'courier.pop3d', args: ['/nonexistent/pigeon-config-test'], expect: /^-ERR chdir \/nonexistent\/pigeon-config-test failed/m, what: "Courier's courierpop3d (Debian courier-pop)" },
  },
} satisfies Backend;
