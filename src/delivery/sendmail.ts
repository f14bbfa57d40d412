/**
 * NAME        src/delivery/sendmail — re-inject a message through the MTA's sendmail command
 * DESCRIPTION `sendmail -i -f SENDER -- RCPT...` (the interface Postfix, Exim and sendmail share),
 *             message on stdin, streamed. The path is node-local (pigeon.yaml `sendmail`). Exit 0
 *             is success; anything else, a signal, or SENDMAIL_TIMEOUT_MS is a temporary failure
 *             — a forward never bounces the original because the MTA hiccuped.
 *             Under Postfix pipe(8) the environment carries MAIL_CONFIG, so the same Postfix
 *             instance receives the re-injected mail.
 * SECURITY    Addresses go in argv after `--`, never through a shell; CR/LF/NUL are refused.
 */
import { childProcess } from '../builtins.js';
import type { DeliveryResult } from './types.js';

export const SENDMAIL_TIMEOUT_MS = 60_000;

export interface SendmailRequest {
  readonly command: string;
  /** envelope sender, '' for the null sender */
  readonly sender: string;
  readonly recipients: readonly string[];
  /** the message: chunks, streamed to stdin */
  readonly data: () => AsyncIterable<Buffer>;
}

export async function sendmail(req: SendmailRequest): Promise<DeliveryResult | null> {
  const bad = [req.sender, ...req.recipients].find((a) => /[\0\r\n]/.test(a) || a.startsWith('-'));
  if (bad !== undefined) return { dsn: '5.1.3', text: `refusing to pass ${JSON.stringify(bad)} to sendmail` };
  const args = ['-i', '-f', req.sender === '' ? '<>' : req.sender, '--', ...req.recipients];
  return new Promise((resolve) => {
    let settled = false;
    let stderr = '';
    const done = (r: DeliveryResult | null): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      resolve(r);
    };
    const child = childProcess().spawn(req.command, args, { stdio: ['pipe', 'ignore', 'pipe'], env: process.env });
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      done({ dsn: '4.3.0', text: `sendmail timed out after ${SENDMAIL_TIMEOUT_MS / 1000}s` });
    }, SENDMAIL_TIMEOUT_MS);
    child.on('error', (e) => done({ dsn: '4.3.0', text: `cannot run ${req.command}: ${(e as NodeJS.ErrnoException).code ?? e.message}` }));
    child.stderr.on('data', (d: Buffer) => {
      if (stderr.length < 400) stderr += d.toString('utf8');
    });
    child.stdin.on('error', () => undefined); // EPIPE when sendmail dies early: its exit code tells
    child.on('close', (code, signal) => {
      if (code === 0) done(null);
      else done({ dsn: '4.3.0', text: `${req.command} failed (${signal ?? `exit ${code}`})${stderr ? `: ${stderr.trim().split('\n')[0]}` : ''}` });
    });
    void (async () => {
      try {
        for await (const chunk of req.data()) {
          if (!child.stdin.write(chunk)) await new Promise<void>((r) => child.stdin.once('drain', () => r()).once('close', () => r()));
          if (settled || child.stdin.destroyed) return;
        }
        child.stdin.end();
      } catch {
        child.kill('SIGKILL');
        done({ dsn: '4.3.0', text: 'reading the spooled message failed' });
      }
    })();
  });
}
