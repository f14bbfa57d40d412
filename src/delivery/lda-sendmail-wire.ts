/**
 * NAME        src/delivery/lda-sendmail-wire — how dovecot-lda's sendmail stand-in is called and answers
 * DESCRIPTION dovecot-lda runs `sendmail_path` split at spaces, then appends `-i -f SENDER --
 *             RCPT…`, with an empty environment. So the stand-in (src/delivery/lda-sendmail.ts) is
 *             `NODE SHIM ARG`, ARG being base64url JSON (no space in it) with the node's sendmail
 *             and Postfix's MAIL_CONFIG; a rejection comes back on stderr as one line
 *             `REJECT_MARK` + base64 of the reason (UTF-8), which src/delivery/dovecot-lda.ts reads.
 */
export const REJECT_MARK = 'pigeon-lda-reject: ';

export interface ShimConfig {
  /** the node's sendmail (pigeon.yaml `sendmail`) for every message that is not a rejection */
  readonly sendmail: string;
  /** Postfix's MAIL_CONFIG under pipe(8), passed on to sendmail */
  readonly mailConfig: string | null;
}

/** The sendmail_path value; throws when node's or the shim's path has white space (dovecot-lda splits at spaces). */
export function sendmailArg(node: string, shim: string, c: ShimConfig): string {
  for (const p of [node, shim]) if (/[\s\0]/.test(p)) throw new Error(`cannot give dovecot-lda a sendmail_path with white space in it (${p})`);
  return `${node} ${shim} ${Buffer.from(JSON.stringify(c), 'utf8').toString('base64url')}`;
}

export function parseShimArg(arg: string): ShimConfig {
  const v: unknown = JSON.parse(Buffer.from(arg, 'base64url').toString('utf8'));
  if (v === null || typeof v !== 'object') throw new Error('bad argument');
  const o = v as Record<string, unknown>;
  if (typeof o['sendmail'] !== 'string' || (o['mailConfig'] !== null && typeof o['mailConfig'] !== 'string')) throw new Error('bad argument');
  return { sendmail: o['sendmail'], mailConfig: o['mailConfig'] };
}
