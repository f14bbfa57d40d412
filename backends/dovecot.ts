/**
 * NAME        backends/dovecot — start Dovecot's imap/pop3 for an authenticated user
 * SYNOPSIS    imap.backend = dovecot (default); pigeon.yaml section (this module's):
 *               dovecot: { imap: /usr/lib/dovecot/imap, pop3: /usr/lib/dovecot/pop3,
 *                          lda: /usr/lib/dovecot/dovecot-lda, lda_timeout_s: 300 }
 *             (`lda`, `lda_timeout_s`: the delivery program of `mailstore.mda dovecot-lda`,
 *             src/delivery/dovecot-lda.ts, node-local like the other two)
 * DESCRIPTION Runs `/usr/lib/dovecot/imap -O -o mail_location=…` standalone (no master, no passdb,
 *             no userdb) as the mail user with env USER, HOME, IP, LOCAL_IP and IMAPLOGINTAG, so
 *             Dovecot itself answers the client's login tag with its real post-login
 *             `OK [CAPABILITY …] Logged in`. POP3: Dovecot sends no greeting standalone; we send
 *             NOOP, wait for +OK, and greet the client with `+OK Logged in.`.
 *             Our session id and the client address go into Dovecot's log prefix.
 *             DOVECOT_HOSTDOMAIN carries the host's canonical name, as Dovecot's own master passes
 *             it to the processes it starts: without it every imap/pop3 resolves the host name at
 *             start (nsswitch, /etc/hosts: ≈ 0.3 ms of each login here).
 *             On plain TCP the client socket itself becomes Dovecot's stdin/stdout (no copy; the
 *             bytes already read are replayed with CLIENT_INPUT); behind TLS or on pipes the
 *             proxy relays. Under `pigeon serve` a hand-off is started by the worker's spawner
 *             process (src/proxy/spawner.ts: the worker does not fork; Dovecot logs to the
 *             spawner's stderr, which the worker reads); one-shot processes spawn it themselves.
 * DIAGNOSTICS start-failed (exit before greeting, e.g. 89 on init failure), timeout, protocol
 *             (unexpected first line): backendError (backends/types.ts). A handed-off imap that
 *             exits 89 said nothing to the client: the proxy sends it `* BYE [UNAVAILABLE]`.
 * SECURITY    Never runs Dovecot as root (backends.md §1.7); the environment is built from
 *             scratch; client data reaches Dovecot only as env values checked for CR/LF/NUL.
 */
import type { ChildProcess } from 'node:child_process';
import { hostname } from 'node:os';
import { childProcess, netModule } from '../src/builtins.js';
import { existsSync } from 'node:fs';
import { dirname, basename, join } from 'node:path';
import { z } from 'zod';
import type { Backend, BackendRequest, BackendSession } from './types.js';
import { backendError, safeParam as safe, localMailbox, pipeStderr, prepareHandoff, checkExecutable, childSession, spawnHandedOff, pathSetting, sectionParser } from './types.js';
import type { Spawner } from '../src/proxy/spawner.js';
import type { MailUser } from '../src/mailuser.js';
import { BACKEND_START_MS, BACKEND_MAX_LINE, HANDOFF_MAX_REPLAY } from '../src/limits.js';
import { StreamLines } from '../src/lines.js';
import { mailWriter } from '../src/writer/mail-writer.js';

const DEFAULTS = { imap: '/usr/lib/dovecot/imap', pop3: '/usr/lib/dovecot/pop3', lda: '/usr/lib/dovecot/dovecot-lda', lda_timeout_s: 300 } as const;
const sectionSchema = z
  .strictObject({
    imap: pathSetting.default(DEFAULTS.imap),
    pop3: pathSetting.default(DEFAULTS.pop3),
    lda: pathSetting.default(DEFAULTS.lda),
    lda_timeout_s: z.number().int().min(1).max(3600).default(DEFAULTS.lda_timeout_s),
  })
  .prefault({});
export type Binaries = z.output<typeof sectionSchema>;
/** This instance's `dovecot:` section (pigeon.yaml), defaults applied. */
export const dovecotSection = sectionParser(sectionSchema);

export async function mailLocation(req: BackendRequest, mailUser: MailUser): Promise<{ location: string; home: string }> {
  const a = localMailbox(req);
  if (a.format === 'maildir') return { location: `maildir:${a.path}`, home: a.path };
  // mbox: INBOX is the allocated file; other folders live in a sibling directory, created by the
  // mail writer (as the mail user, no link followed: a symlink there is refused, not followed)
  const folders = join(dirname(a.path), `${basename(a.path)}.folders`);
  if (!existsSync(folders)) {
    try {
      await mailWriter(mailUser).ensureDir(dirname(a.path), folders);
    } catch (e) {
      throw backendError('start-failed', `cannot create the mbox folder directory ${folders}: ${(e as Error).message}`);
    }
  }
  return { location: `mbox:${folders}:INBOX=${a.path}`, home: folders };
}

/** Dovecot's first line on its stdout (the login answer, or the answer to our NOOP), with its CRLF. */
async function firstLine(req: BackendRequest, child: ChildProcess): Promise<Buffer> {
  const what = `dovecot ${req.protocol}`;
  const r = new StreamLines(child.stdout as NonNullable<ChildProcess['stdout']>, {
    max: BACKEND_MAX_LINE,
    timeoutMs: BACKEND_START_MS,
    fail: {
      tooLong: () => backendError('protocol', `overlong first line from ${what}`),
      timeout: (ms) => {
        child.kill('SIGKILL');
        return backendError('timeout', `${what} did not answer within ${ms / 1000}s`);
      },
      closed: () => backendError('start-failed', `${what} closed its output before greeting`),
    },
    endFails: false, // its exit says why
  });
  const onExit = (code: number | null, sig: string | null): void => r.fail(backendError('start-failed', `${what} exited with ${code ?? sig} before greeting`));
  const onError = (e: Error): void => r.fail(backendError('start-failed', `cannot start ${what}: ${e.message}`));
  child.once('exit', onExit);
  child.once('error', onError);
  try {
    return (await r.line()).raw;
  } finally {
    child.off('exit', onExit);
    child.off('error', onError);
    r.close();
  }
}

/** Dovecot exits 89 on a fatal init error without a word to the client (imap). */
const IMAP_INIT_FAILED = '* BYE [UNAVAILABLE] Internal error occurred. Refer to server log for more information.\r\n';
const imapLastWords = (code: number | null): string | undefined => (code === 89 ? IMAP_INIT_FAILED : undefined);

let hostDomain: string | null = null;
let lookingUp = false;

/**
 * The host's canonical name as Dovecot computes it (`my_hostdomain()`: gethostbyname of the host
 * name, else the host name), found once per process through the same resolver (`getent hosts`),
 * in the background: null until it is known (the first backends then resolve it themselves, as
 * they always did), so a slow resolver never holds up a login here.
 */
export function dovecotHostDomain(): string | null {
  if (hostDomain !== null || lookingUp) return hostDomain;
  lookingUp = true;
  const name = hostname();
  childProcess().execFile('getent', ['hosts', name], { encoding: 'utf8', timeout: 10_000, env: { PATH: '/usr/bin:/bin' } }, (err, stdout) => {
    const canonical = err ? undefined : stdout.split('\n')[0]?.trim().split(/\s+/)[1];
    // not found (exit 2) or no getent: the host name, as Dovecot falls back to
    hostDomain = canonical !== undefined && /^[A-Za-z0-9._-]{1,253}$/.test(canonical) ? canonical : name;
  });
  return null;
}

async function start(req: BackendRequest, bins: Binaries, mailUser: MailUser, spawner: Spawner | undefined): Promise<BackendSession> {
  const { location, home } = await mailLocation(req, mailUser);
  const bin = req.protocol === 'imap' ? bins.imap : bins.pop3;
  // the client's address as Dovecot got it (IP; behind a PROXY header, the one it named):
  // src/proxy/router.ts carries it into our log line as rip=
  const prefix = `%s(%u)<%{pid}><${req.sessionId.replace(/%/g, '%%')}><rip=%{rip}>: `;
  const args = ['-O', '-o', `mail_location=${safe(location)}`, '-o', `mail_log_prefix=${prefix}`, '-o', 'log_path=/dev/stderr', '-o', 'ssl=no'];
  const env: Record<string, string> = {
    USER: safe(req.address),
    HOME: safe(home),
    IP: safe(req.client.peer.rip),
    LOCAL_IP: safe(req.client.peer.lip),
    PATH: '/usr/bin:/bin',
  };
  const domain = dovecotHostDomain();
  if (domain !== null) env['DOVECOT_HOSTDOMAIN'] = domain;
  if (req.protocol === 'imap' && req.tag !== null) env['IMAPLOGINTAG'] = safe(req.tag);
  const opts = mailUser.switchTo ? { uid: mailUser.uid, gid: mailUser.gid } : {};
  if (req.handoff) {
    // hand the client socket itself to Dovecot; bytes already read are replayed via CLIENT_INPUT
    // (imap: flag '0', tag, NUL, pipelined bytes; pop3: the pipelined bytes). Standalone pop3 sends
    // no login answer: ours must be on the wire before Dovecot can answer what the client
    // pipelined after PASS. A missing binary is found before we say "+OK Logged in.".
    checkExecutable(bin, `dovecot ${req.protocol}`);
    const first = Buffer.from(req.protocol === 'pop3' ? '+OK Logged in.\r\n' : '');
    const sock = req.handoff.socket;
    const late = await prepareHandoff(sock, first, BACKEND_START_MS);
    const input = Buffer.concat([req.handoff.input, late]);
    try {
      if (input.length > HANDOFF_MAX_REPLAY) throw backendError('protocol', `client sent ${input.length} bytes after the login before dovecot ${req.protocol} started`);
      if (req.protocol === 'imap') {
        delete env['IMAPLOGINTAG'];
        env['CLIENT_INPUT'] = Buffer.concat([Buffer.from(`0${req.tag ?? ''}\0`, 'latin1'), input]).toString('base64');
      } else if (input.length > 0) {
        env['CLIENT_INPUT'] = input.toString('base64');
      }
      // `pigeon serve`: the spawner forks, not the worker (its stderr is the log of every backend)
      if (spawner && sock instanceof netModule().Socket) {
        return await spawnHandedOff(spawner, `dovecot ${req.protocol}`, {
          file: bin,
          args,
          env,
          cwd: home,
          ...opts,
          socket: sock,
          ...(req.protocol === 'imap' ? { lastWords: { code: 89, text: IMAP_INIT_FAILED } } : {}),
        });
      }
      const child = childProcess().spawn(bin, args, { ...opts, env, cwd: home, stdio: [sock, sock, 'pipe'] });
      pipeStderr(req, child);
      await new Promise<void>((resolve, reject) => {
        child.once('spawn', () => resolve());
        child.once('error', (e) => reject(backendError('start-failed', `cannot start dovecot ${req.protocol}: ${e.message}`)));
      });
      return childSession(child, Buffer.alloc(0), true, req.protocol === 'imap' ? imapLastWords : undefined);
    } catch (e) {
      // the router reads the client again: what it sent meanwhile goes back in front
      if (late.length > 0) sock.unshift(late);
      throw e;
    }
  }
  const child = childProcess().spawn(bin, args, { ...opts, env, cwd: home, stdio: ['pipe', 'pipe', 'pipe'] });
  child.stdin.on('error', () => {});
  pipeStderr(req, child);
  try {
    if (req.protocol === 'imap') {
      const line = await firstLine(req, child);
      const tag = req.tag ?? '*';
      if (!line.toString('latin1').startsWith(tag === '*' ? '* PREAUTH' : `${tag} OK`)) {
        throw backendError('protocol', `unexpected greeting from dovecot imap: ${line.toString('latin1').trim().slice(0, 100)}`);
      }
      return childSession(child, line, false);
    }
    child.stdin.write('NOOP\r\n');
    const line = await firstLine(req, child);
    if (!line.toString('latin1').startsWith('+OK')) {
      throw backendError('protocol', `dovecot pop3 answered NOOP with: ${line.toString('latin1').trim().slice(0, 100)}`);
    }
    return childSession(child, Buffer.from('+OK Logged in.\r\n'), false);
  } catch (e) {
    child.kill('SIGKILL');
    throw e;
  }
}

export default {
  kind: 'backend',
  name: 'dovecot',
  summary: 'Dovecot imap/pop3 started standalone, pre-authenticated, as the mail user',
  serves: 'local',
  section: {
    key: 'dovecot',
    parse: dovecotSection,
    template: () => `# Dovecot's imap and pop3 programs (Debian dovecot-imapd, dovecot-pop3d): imap.backend = dovecot.
dovecot:
  imap: ${DEFAULTS.imap}
  pop3: ${DEFAULTS.pop3}
  # dovecot-lda (Debian dovecot-core), for users with mailstore.mda dovecot-lda (Sieve: dovecot-sieve);
  # a delivery it has not finished after lda_timeout_s seconds is killed and deferred (4.3.0)
  lda: ${DEFAULTS.lda}
  lda_timeout_s: ${DEFAULTS.lda_timeout_s}
`,
  },
  create: (bins, ctx) => ({
    // CLIENT_INPUT replays whatever the proxy already read (the router caps its size)
    acceptsHandoff: () => true,
    start: (req) => start(req, bins, ctx.mailUser, ctx.spawner),
  }),
  // standalone without USER: "Fatal: USER environment missing", exit 89 (backends.md §1.1)
  probe: {
    imap: { setting: 'dovecot.imap', path: (b) => b.imap, args: [], expect: /USER environment missing/, what: "Dovecot's imap (Debian dovecot-imapd)" },
    pop3: { setting: 'dovecot.pop3', path: (b) => b.pop3, args: [], expect: /USER environment missing/, what: "Dovecot's pop3 (Debian dovecot-pop3d)" },
  },
} satisfies Backend<Binaries>;
