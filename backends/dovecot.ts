/**
 * NAME        backends/dovecot — start Dovecot's imap/pop3 for an authenticated user
 * SYNOPSIS    imap.backend = dovecot (default); binaries: dovecot.imap / dovecot.pop3 in pigeon.yaml
 * DESCRIPTION Runs `/usr/lib/dovecot/imap -O -o mail_location=…` standalone (no master, no passdb,
 *             no userdb) as the mail user with env USER, HOME, IP, LOCAL_IP and IMAPLOGINTAG, so
 *             Dovecot itself answers the client's login tag with its real post-login
 *             `OK [CAPABILITY …] Logged in`. POP3: Dovecot sends no greeting standalone; we send
 *             NOOP, wait for +OK, and greet the client with `+OK Logged in.`.
 *             Our session id and the client address go into Dovecot's log prefix.
 *             On plain TCP the client socket itself becomes Dovecot's stdin/stdout (no copy; the
 *             bytes already read are replayed with CLIENT_INPUT); behind TLS or on pipes the
 *             proxy relays through pipes.
 * DIAGNOSTICS BackendError start-failed (exit before greeting, e.g. 89 on init failure), timeout,
 *             protocol (unexpected first line).
 * SECURITY    Never runs Dovecot as root (backends.md §1.7); the environment is built from
 *             scratch; client data reaches Dovecot only as env values checked for CR/LF/NUL.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, basename, join } from 'node:path';
import type { Backend, BackendRequest, BackendSession } from './types.js';
import { BackendError, pipeStderr, prepareHandoff, checkExecutable, HANDOFF_MAX_REPLAY } from './types.js';
import { BACKEND_START_MS } from '../src/limits.js';
import { mailWriter } from '../src/writer/mail-writer.js';

function safe(v: string): string {
  if (/[\r\n\0]/.test(v)) throw new BackendError({ kind: 'protocol', detail: 'refusing CR/LF/NUL in backend parameters' });
  return v;
}

export async function mailLocation(req: BackendRequest): Promise<{ location: string; home: string }> {
  const a = req.allocation;
  if (a.format === 'maildir') return { location: `maildir:${a.path}`, home: a.path };
  // mbox: INBOX is the allocated file; other folders live in a sibling directory, created by the
  // mail writer (as the mail user, no link followed: a symlink there is refused, not followed)
  const folders = join(dirname(a.path), `${basename(a.path)}.folders`);
  if (!existsSync(folders)) {
    try {
      await mailWriter(req.mailUser).ensureDir(dirname(a.path), folders);
    } catch (e) {
      throw new BackendError({ kind: 'start-failed', detail: `cannot create the mbox folder directory ${folders}: ${(e as Error).message}` });
    }
  }
  return { location: `mbox:${folders}:INBOX=${a.path}`, home: folders };
}

async function firstLine(req: BackendRequest, child: ReturnType<typeof spawn>): Promise<Buffer> {
  return new Promise<Buffer>((resolve, reject) => {
    let buf = Buffer.alloc(0);
    const done = (e: Error | null, v?: Buffer): void => {
      clearTimeout(t);
      child.stdout?.off('data', onData);
      child.off('exit', onExit);
      child.off('error', onError);
      if (e) reject(e);
      else resolve(v ?? Buffer.alloc(0));
    };
    const onData = (c: Buffer): void => {
      buf = Buffer.concat([buf, c]);
      const nl = buf.indexOf(0x0a);
      if (nl >= 0) {
        child.stdout?.pause();
        const rest = buf.subarray(nl + 1);
        if (rest.length > 0) child.stdout?.unshift(rest);
        done(null, buf.subarray(0, nl + 1));
      } else if (buf.length > 65536) done(new BackendError({ kind: 'protocol', detail: 'overlong first line from Dovecot' }));
    };
    const onExit = (code: number | null, sig: string | null): void =>
      done(new BackendError({ kind: 'start-failed', detail: `dovecot ${req.protocol} exited with ${code ?? sig} before greeting` }));
    const onError = (e: Error): void => done(new BackendError({ kind: 'start-failed', detail: `cannot start dovecot ${req.protocol}: ${e.message}` }));
    const t = setTimeout(() => {
      child.kill('SIGKILL');
      done(new BackendError({ kind: 'timeout', detail: `dovecot ${req.protocol} did not answer within ${BACKEND_START_MS / 1000}s` }));
    }, BACKEND_START_MS);
    child.stdout?.on('data', onData);
    child.once('exit', onExit);
    child.once('error', onError);
  });
}


async function start(req: BackendRequest): Promise<BackendSession> {
  const { location, home } = await mailLocation(req);
  const bin = req.protocol === 'imap' ? req.binaries.imap : req.binaries.pop3;
  const prefix = `%s(%u)<%{pid}><${req.sessionId.replace(/%/g, '%%')}>: `;
  const args = ['-O', '-o', `mail_location=${safe(location)}`, '-o', `mail_log_prefix=${prefix}`, '-o', 'log_path=/dev/stderr', '-o', 'ssl=no'];
  const env: Record<string, string> = {
    USER: safe(req.address),
    HOME: safe(home),
    IP: safe(req.peer.rip),
    LOCAL_IP: safe(req.peer.lip),
    PATH: '/usr/bin:/bin',
  };
  if (req.protocol === 'imap' && req.tag !== null) env['IMAPLOGINTAG'] = safe(req.tag);
  const opts = req.mailUser.switchTo ? { uid: req.mailUser.uid, gid: req.mailUser.gid } : {};
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
      if (input.length > HANDOFF_MAX_REPLAY) throw new BackendError({ kind: 'protocol', detail: `client sent ${input.length} bytes after the login before dovecot ${req.protocol} started` });
      if (req.protocol === 'imap') {
        delete env['IMAPLOGINTAG'];
        env['CLIENT_INPUT'] = Buffer.concat([Buffer.from(`0${req.tag ?? ''}\0`, 'latin1'), input]).toString('base64');
      } else if (input.length > 0) {
        env['CLIENT_INPUT'] = input.toString('base64');
      }
      const child = spawn(bin, args, { ...opts, env, cwd: home, stdio: [sock, sock, 'pipe'] });
      pipeStderr(req, child);
      await new Promise<void>((resolve, reject) => {
        child.once('spawn', () => resolve());
        child.once('error', (e) => reject(new BackendError({ kind: 'start-failed', detail: `cannot start dovecot ${req.protocol}: ${e.message}` })));
      });
      return { child, greeting: Buffer.alloc(0), handedOff: true };
    } catch (e) {
      // the router reads the client again: what it sent meanwhile goes back in front
      if (late.length > 0) sock.unshift(late);
      throw e;
    }
  }
  const child = spawn(bin, args, { ...opts, env, cwd: home, stdio: ['pipe', 'pipe', 'pipe'] });
  child.stdin.on('error', () => {});
  pipeStderr(req, child);
  try {
    if (req.protocol === 'imap') {
      const line = await firstLine(req, child);
      const tag = req.tag ?? '*';
      if (!line.toString('latin1').startsWith(tag === '*' ? '* PREAUTH' : `${tag} OK`)) {
        throw new BackendError({ kind: 'protocol', detail: `unexpected greeting from dovecot imap: ${line.toString('latin1').trim().slice(0, 100)}` });
      }
      return { child, greeting: line, handedOff: false };
    }
    child.stdin.write('NOOP\r\n');
    const line = await firstLine(req, child);
    if (!line.toString('latin1').startsWith('+OK')) {
      throw new BackendError({ kind: 'protocol', detail: `dovecot pop3 answered NOOP with: ${line.toString('latin1').trim().slice(0, 100)}` });
    }
    return { child, greeting: Buffer.from('+OK Logged in.\r\n'), handedOff: false };
  } catch (e) {
    child.kill('SIGKILL');
    throw e;
  }
}

export default {
  kind: 'backend',
  name: 'dovecot',
  summary: 'Dovecot imap/pop3 started standalone, pre-authenticated, as the mail user',
  binaries: (config) => ({ imap: config.dovecot.imap, pop3: config.dovecot.pop3 }),
  // CLIENT_INPUT replays whatever the proxy already read (the router caps its size)
  acceptsHandoff: () => true,
  start,
  // standalone without USER: "Fatal: USER environment missing", exit 89 (backends.md §1.1)
  probe: {
    imap: { setting: 'dovecot.imap', args: [], expect: /USER environment missing/, what: "Dovecot's imap (Debian dovecot-imapd)" },
    pop3: { setting: 'dovecot.pop3', args: [], expect: /USER environment missing/, what: "Dovecot's pop3 (Debian dovecot-pop3d)" },
  },
} satisfies Backend;
