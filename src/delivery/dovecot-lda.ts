/**
 * NAME        src/delivery/dovecot-lda — MDA program: Dovecot's own dovecot-lda, with Sieve
 * SYNOPSIS    pigeon config set --user U mailstore.mda dovecot-lda
 *             pigeon config set --user U sieve.script /path/to/active.sieve   (or --domain D … --override)
 * DESCRIPTION For a Maildir the mailstore already placed and created, runs Dovecot's delivery
 *             program (`dovecot.lda` in pigeon.yaml, Debian's /usr/lib/dovecot/dovecot-lda)
 *             the way the proxy starts Dovecot's imap: standalone (`-O`: no dovecot.conf, no
 *             passdb, no userdb), as the mail user, with USER and HOME in its environment and
 *             `mail_location=maildir:PATH`; the message on stdin, `-f SENDER -a RCPT`, `-m
 *             FOLDER` for an existing +detail folder, `-e`. Dovecot writes the message and
 *             updates its indexes at delivery time; its default `mail_fsync=optimized` is kept.
 *             With `sieve.script` set, Pigeonhole's `sieve` plugin runs that script (`sieve =
 *             file:SCRIPT`; relative to the mailbox directory unless absolute); `fileinto` creates
 *             a missing folder (lda_mailbox_autocreate, subscribed). No script: plain delivery
 *             into INBOX. mailstore.quota is Dovecot's `quota = maildir` (the same maildirsize
 *             file the built-in MDA keeps), quota_full decides quota_full_tempfail.
 *             Sieve `reject`: dovecot-lda would mail the rejection itself (also with -e, which only
 *             covers failed saves); instead its sendmail_path is src/delivery/lda-sendmail.ts,
 *             which hands a rejection back to us on stderr (`5.7.1 reason`: pipe(8) exits 77,
 *             LMTP answers 554 5.7.1 for that recipient, and the MTA bounces) and passes every other
 *             message (redirect, vacation) to the node's sendmail.
 * CONFIG      sieve.script (per user; domain default, forcible with --override); mailstore.quota,
 *             quota_full; pigeon.yaml dovecot.lda, dovecot.lda_timeout_s.
 * DIAGNOSTICS exit 0 delivered (2.0.0), or rejected by the script (5.7.1 its reason); 75 → 4.3.0
 *             (4.2.2 over quota with quota_full defer); 77 → 5.2.2 over quota, else 4.3.0 (any
 *             doubt defers); 67 → 5.1.1; 64, 78, 89 (configuration, fatal start) → 4.3.5; a signal
 *             or the time limit → 4.3.0. A script that does not compile or fails at run time
 *             still delivers into INBOX (Pigeonhole's implicit keep) and logs one warning line
 *             `sieve: script failed, delivered to INBOX`; Pigeonhole's details go to the script's
 *             own log (SCRIPT.log beside it).
 * SECURITY    Never runs as root: spawned with the mail user's uid/gid when pigeon is root; fresh
 *             environment. Addresses and paths go in argv, never through a shell; CR, LF and NUL
 *             are refused, and `;` in a script path (Dovecot's location options).
 * SEE ALSO    backends/dovecot.ts, src/delivery/mailstore.ts, src/delivery/lda-sendmail.ts
 */
import { childProcess } from '../builtins.js';
import { fileURLToPath } from 'node:url';
import { isAbsolute, join } from 'node:path';
import { slice } from '../modules.js';
import { LineBuffer } from '../lines.js';
import type { SettingsDecl } from '../settings.js';
import type { DeliveryEnv, DeliveryResult } from './types.js';
import type { MdaProgram, ProgramRequest } from './mda.js';
import { REJECT_MARK, sendmailArg } from './lda-sendmail-wire.js';

// the sendmail stand-in beside this module (compiled; when running from source, the one in dist/)
const SENDMAIL_SHIM = fileURLToPath(new URL(import.meta.url.endsWith('.ts') ? '../../dist/src/delivery/lda-sendmail.js' : './lda-sendmail.js', import.meta.url));

/** The longest stderr line of dovecot-lda we read (a rejection reason is at most 8 KiB, base64). */
const MAX_LINE = 16 * 1024;

export const sieveSettings = {
  module: 'sieve',
  summary: 'Sieve filtering through dovecot-lda (mailstore.mda dovecot-lda)',
  keys: {
    script: {
      type: 'string',
      pattern: /^[^;\0\r\n]*$/,
      default: '',
      doc: "the user's active Sieve script: an absolute path, or relative to the mailbox directory; empty = no Sieve (needs mailstore.mda dovecot-lda)",
    },
  },
} as const satisfies SettingsDecl;

/** Where the script is for this mailbox, or null for none. */
export function scriptPath(value: unknown, home: string): string | null {
  if (typeof value !== 'string' || value === '') return null;
  return isAbsolute(value) ? value : join(home, value);
}

const safe = (what: string, v: string): string => {
  if (/[\r\n\0]/.test(v)) throw new Error(`${what}: CR, LF or NUL refused`);
  return v;
};

/** Dovecot's log line, without its date and `lda(user)<pid><session>: ` prefix. */
const logText = (line: string): string => line.replace(/^.*?lda\([^)]*\)(<[^>]*>)*: /, '').slice(0, 300);

interface Outcome {
  readonly code: number | null;
  readonly signal: string | null;
  readonly timedOut: boolean;
  readonly reject: string | null;
  readonly sieveFailed: string | null;
  readonly lines: readonly string[];
}

function run(bin: string, args: readonly string[], req: ProgramRequest, home: string, timeoutMs: number): Promise<Outcome> {
  const opts = req.mailUser.switchTo ? { uid: req.mailUser.uid, gid: req.mailUser.gid } : {};
  const child = childProcess().spawn(bin, args, {
    ...opts,
    cwd: home,
    env: { USER: req.user, HOME: home, PATH: '/usr/bin:/bin' }, // both checked by deliver()
    stdio: ['pipe', 'ignore', 'pipe'],
  });
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    child.kill('SIGKILL');
  }, timeoutMs);
  let reject: string | null = null;
  let sieveFailed: string | null = null;
  const lines: string[] = [];
  const buf = new LineBuffer();
  const take = (s: string): void => {
    if (s.startsWith(REJECT_MARK)) {
      reject = Buffer.from(s.slice(REJECT_MARK.length), 'base64').toString('utf8');
      return;
    }
    if (/sieve: .*(Failed to compile script|Execution of script .* failed|Failed to open script|script .* is broken)/i.test(s)) sieveFailed ??= logText(s);
    lines.push(s);
    if (lines.length > 50) lines.shift(); // the last ones say why it failed
  };
  const drain = (): void => {
    for (let l; (l = buf.line(MAX_LINE)); ) {
      if (l.kind === 'too-long') buf.rest(); // an overlong log line is dropped, never buffered without end
      else take(l.line.toString('utf8'));
    }
  };
  child.stderr.on('data', (c: Buffer) => {
    buf.push(c);
    drain();
  });
  const exited = new Promise<{ code: number | null; signal: string | null }>((resolve) => {
    child.once('error', (e) => {
      lines.push(`cannot run ${bin}: ${(e as NodeJS.ErrnoException).code ?? e.message}`);
      resolve({ code: null, signal: null });
    });
    child.once('close', (code, signal) => resolve({ code, signal }));
  });
  child.stdin.on('error', () => undefined); // EPIPE when it dies early: its exit status tells
  void (async () => {
    try {
      const write = async (b: Buffer): Promise<void> => {
        if (!child.stdin.write(b)) await new Promise<void>((r) => child.stdin.once('drain', () => r()).once('close', () => r()));
      };
      await write(req.prefix);
      for await (const chunk of req.body()) {
        if (child.stdin.destroyed) return;
        await write(chunk);
      }
      child.stdin.end();
    } catch {
      child.kill('SIGKILL');
    }
  })();
  return exited.then((r) => {
    clearTimeout(timer);
    // 'close' comes after the child's stdio closed: all of stderr has been read
    const tail = buf.rest();
    if (tail.length > 0) take(tail.toString('utf8'));
    return { ...r, timedOut, reject, sieveFailed, lines };
  });
}

/** dovecot-lda's exit status (and what it said) → the recipient's status. */
export function statusOf(o: Outcome, req: Pick<ProgramRequest, 'quota' | 'quotaFull' | 'user'>, bin: string): DeliveryResult {
  const said = o.lines.filter((l) => !/: Info: /.test(l));
  const last = (said.find((l) => /(Fatal|Error|Panic): /.test(l)) ?? said[said.length - 1] ?? '').trim();
  const why = last === '' ? '' : `: ${logText(last)}`;
  const quota = o.lines.some((l) => /Quota exceeded/i.test(l));
  if (o.timedOut) return { dsn: '4.3.0', text: `dovecot-lda did not finish in time (dovecot.lda_timeout_s); try again later` };
  if (o.code === 0) {
    if (o.reject !== null) return { dsn: '5.7.1', text: `<${req.user}>: rejected by the recipient's Sieve filter: ${o.reject.replace(/\s+/g, ' ').trim().slice(0, 300)}` };
    return { dsn: '2.0.0', text: 'delivered' };
  }
  if (o.code === null) return { dsn: '4.3.0', text: `dovecot-lda (${bin}) ${o.signal !== null ? `killed by ${o.signal}` : 'did not run'}${why}` };
  switch (o.code) {
    case 75:
      if (quota) return { dsn: '4.2.2', text: `Mailbox full (quota ${req.quota} bytes exceeded); try again later` };
      return { dsn: '4.3.0', text: `dovecot-lda: temporary failure${why}` };
    case 77:
      if (quota && req.quotaFull === 'bounce') return { dsn: '5.2.2', text: `Mailbox full (quota ${req.quota} bytes exceeded)` };
      return { dsn: '4.3.0', text: `dovecot-lda refused the message${why}` };
    case 67:
      return { dsn: '5.1.1', text: `<${req.user}>: user unknown to dovecot-lda${why}` };
    case 64:
    case 78:
    case 89:
      return { dsn: '4.3.5', text: `dovecot-lda configuration error (exit ${o.code})${why}` };
    default:
      return { dsn: '4.3.0', text: `dovecot-lda failed (exit ${o.code})${why}` };
  }
}

async function deliver(req: ProgramRequest, env: DeliveryEnv): Promise<DeliveryResult> {
  const bin = env.dovecotLda.path;
  const home = req.allocation.path;
  const script = scriptPath(slice(req.config, 'sieve')['script'], home);
  let args: string[];
  try {
    safe('user', req.user);
    if (script !== null && script.includes(';')) throw new Error('sieve.script: ";" refused in a script path');
    const plugins = [...(req.quota > 0 ? ['quota'] : []), ...(script !== null ? ['sieve'] : [])];
    args = [
      '-O',
      '-e',
      '-o', `mail_location=maildir:${safe('mailbox path', home)}`,
      '-o', 'log_path=/dev/stderr',
      '-o', `sendmail_path=${sendmailArg(process.execPath, SENDMAIL_SHIM, { sendmail: env.sendmail, mailConfig: process.env['MAIL_CONFIG'] ?? null })}`,
      '-o', 'rejection_reason=%r',
      '-o', 'lda_mailbox_autocreate=yes',
      '-o', 'lda_mailbox_autosubscribe=yes',
      '-o', `mail_plugins=${plugins.join(' ')}`,
    ];
    if (script !== null) args.push('-o', `plugin/sieve=file:${safe('sieve.script', script)}`);
    if (req.quota > 0) {
      args.push('-o', 'plugin/quota=maildir:User quota', '-o', `plugin/quota_rule=*:storage=${req.quota}B`, '-o', `quota_full_tempfail=${req.quotaFull === 'defer' ? 'yes' : 'no'}`);
    }
    args.push('-f', req.sender === '' ? '<>' : safe('sender', req.sender), '-a', safe('recipient', req.rcpt));
    if (req.folder !== null) args.push('-m', safe('folder', req.folder));
  } catch (e) {
    return { dsn: '4.3.5', text: `dovecot-lda: ${e instanceof Error ? e.message : String(e)}` };
  }
  const o = await run(bin, args, req, home, env.dovecotLda.timeoutMs);
  const r = statusOf(o, req, bin);
  for (const l of o.lines) env.log('debug', 'dovecot-lda said', { user: req.user, line: logText(l) });
  if (o.sieveFailed !== null && r.dsn.startsWith('2')) {
    env.log('warn', 'sieve: script failed, delivered to INBOX', { user: req.user, script, error: o.sieveFailed });
  }
  if (!r.dsn.startsWith('2') && r.dsn !== '5.7.1') env.log('warn', 'dovecot-lda: not delivered', { user: req.user, status: `${r.dsn} ${r.text}`, exit: o.code, signal: o.signal });
  return r;
}

const dovecotLda: MdaProgram = {
  kind: 'mda',
  name: 'dovecot-lda',
  summary: "Dovecot's dovecot-lda delivers (Sieve filters through Pigeonhole: sieve.script)",
  formats: ['maildir'],
  settings: sieveSettings,
  deliver,
};

export default dovecotLda;
