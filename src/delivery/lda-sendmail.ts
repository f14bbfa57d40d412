/**
 * NAME        src/delivery/lda-sendmail — dovecot-lda's sendmail: rejections back to pigeon, the rest to the MTA
 * SYNOPSIS    (dovecot-lda's sendmail_path) node lda-sendmail.js ARG -i -f SENDER -- RCPT...
 * DESCRIPTION dovecot-lda mails a Sieve `reject` itself (a multipart/report from the null sender
 *             with `Auto-Submitted: auto-replied (rejected)`), also with -e. PigeonDeliver wants
 *             the MTA to answer for it instead (a 5.7.1 per recipient, the MTA's own bounce), so
 *             such a message is not sent: its human-readable part (the reason; rejection_reason
 *             is `%r`) goes to stderr as one line (src/delivery/lda-sendmail-wire.ts), which
 *             dovecot-lda passes to its own stderr, read by src/delivery/dovecot-lda.ts; exit 0
 *             so dovecot-lda counts the rejection as done (and stores nothing). Any other message
 *             (Sieve redirect, vacation, notify) is passed unchanged to the node's sendmail with
 *             the same arguments; its exit status is ours.
 * DIAGNOSTICS exit 75 when the argument is bad or sendmail cannot run (dovecot-lda then keeps
 *             the message in INBOX, or defers).
 * SECURITY    Runs as the mail user (dovecot-lda's child). No shell: sendmail gets argv as given.
 */
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { parseShimArg, REJECT_MARK, type ShimConfig } from './lda-sendmail-wire.js';

/** A header section this long without its end is not a rejection (those are small). */
const HEAD_MAX = 64 * 1024;
/** The largest rejection we read whole. */
const REJECT_MAX = 1024 * 1024;

function header(head: string, name: string): string | null {
  const m = new RegExp(`^${name}:[ \\t]*((?:.*)(?:\\r?\\n[ \\t].*)*)`, 'im').exec(head);
  return m?.[1]?.replace(/\r?\n[ \t]+/g, ' ').trim() ?? null;
}

/** The first text part of a rejection (its reason), or null when this is no rejection. */
export function rejectionReason(msg: string, sender: string): string | null {
  if (sender !== '<>' && sender !== '') return null;
  const sep = /\r?\n\r?\n/.exec(msg);
  if (!sep) return null;
  const head = msg.slice(0, sep.index);
  if (!/^auto-replied \(rejected\)/i.test(header(head, 'Auto-Submitted') ?? '')) return null;
  const ct = header(head, 'Content-Type') ?? '';
  const b = /boundary="?([^";]+)"?/i.exec(ct)?.[1];
  if (!/^multipart\/report/i.test(ct) || b === undefined) return null;
  const body = msg.slice(sep.index + sep[0].length);
  const start = body.indexOf(`--${b}`);
  if (start < 0) return null;
  const part = body.slice(start + b.length + 2);
  const ph = /\r?\n\r?\n/.exec(part);
  if (!ph) return null;
  const end = part.indexOf(`\n--${b}`, ph.index);
  return part.slice(ph.index + ph[0].length, end < 0 ? undefined : end).replace(/\r/g, '').trim();
}

function passOn(c: ShimConfig, args: readonly string[], first: Buffer, ended: boolean): void {
  const env: NodeJS.ProcessEnv = { PATH: '/usr/bin:/bin:/usr/sbin:/sbin' };
  if (c.mailConfig !== null) env['MAIL_CONFIG'] = c.mailConfig;
  const child = spawn(c.sendmail, args, { env, stdio: ['pipe', 'inherit', 'inherit'] });
  child.on('error', (e) => {
    process.stderr.write(`pigeon lda-sendmail: cannot run ${c.sendmail}: ${(e as NodeJS.ErrnoException).code ?? e.message}\n`);
    process.exit(75);
  });
  child.on('close', (code) => process.exit(code ?? 75));
  child.stdin.on('error', () => undefined);
  if (ended) {
    child.stdin.end(first);
    return;
  }
  child.stdin.write(first);
  process.stdin.pipe(child.stdin);
}

function main(): void {
  const [arg, ...args] = process.argv.slice(2);
  let c: ShimConfig;
  try {
    c = parseShimArg(arg ?? '');
  } catch {
    process.stderr.write('pigeon lda-sendmail: bad argument\n');
    process.exit(75);
  }
  const fi = args.indexOf('-f');
  const sender = fi >= 0 ? (args[fi + 1] ?? '') : '';
  const chunks: Buffer[] = [];
  let len = 0;
  let decided = false;
  const decide = (ended: boolean): void => {
    const all = Buffer.concat(chunks, len);
    const text = all.toString('utf8');
    const headEnd = /\r?\n\r?\n/.test(text);
    if (!ended && !headEnd && len < HEAD_MAX) return; // not yet known
    const head = headEnd ? text.slice(0, /\r?\n\r?\n/.exec(text)?.index) : text;
    const maybeReject = (sender === '<>' || sender === '') && /^auto-submitted:[ \t]*auto-replied \(rejected\)/im.test(head);
    if (maybeReject && !ended && len < REJECT_MAX) return; // read the whole rejection
    decided = true;
    const reason = maybeReject ? rejectionReason(text, sender) : null;
    if (reason !== null) {
      process.stdin.pause();
      process.stderr.write(`${REJECT_MARK}${Buffer.from(reason.slice(0, 8192), 'utf8').toString('base64')}\n`, () => process.exit(0));
      return;
    }
    process.stdin.removeListener('data', onData);
    process.stdin.removeListener('end', onEnd);
    passOn(c, args, all, ended);
  };
  const onData = (d: Buffer): void => {
    chunks.push(d);
    len += d.length;
    if (!decided) decide(false);
  };
  const onEnd = (): void => {
    if (!decided) decide(true);
  };
  process.stdin.on('data', onData);
  process.stdin.on('end', onEnd);
}

if (process.argv[1] === fileURLToPath(import.meta.url)) main();
