/**
 * NAME        src/delivery/vacation — delivery module: RFC 3834 absence notice
 * DESCRIPTION Runs in the notify phase, after the message is safely stored (its failures are
 *             logged and never change the recipient's outcome). Never answers (RFC 3834 §2,
 *             vacation(1) conventions): the null sender; MAILER-DAEMON, postmaster-like and list
 *             robot senders (owner-*, *-request, listserv, majordomo, *-bounces); Auto-Submitted
 *             other than "no"; Precedence bulk/list/junk; any List-* field;
 *             X-Auto-Response-Suppress OOF/All; a message that does not name the recipient in
 *             To/Cc/Bcc. At most once per sender per `vacation.days`: a state file per
 *             (recipient, sender hash) under MAIL_ROOT/.pigeon-vacation, created with O_EXCL and
 *             re-armed by its mtime, written by the mail writer as the mail user
 *             (src/delivery/vacation-state.ts). The reply goes through the MTA's sendmail with the null
 *             envelope sender, `Auto-Submitted: auto-replied`, In-Reply-To/References.
 * CONFIG      vacation.enabled, subject, body, days
 */
import { cryptoModule } from '../builtins.js';
import { sendmail } from './sendmail.js';
import { headerText, type Spooled } from './message.js';
import { mailWriter } from '../writer/mail-writer.js';
import type { DeliveryModule, RecipientRequest, StepResult } from './types.js';

const ROBOT = /^(mailer-daemon|postmaster|listserv|majordomo|mailman|owner-.*|.*-request|.*-bounces?|.*-owner|no-?reply|bounce.*|root)$/i;

/** Why no reply is due, or null when one is. */
export function whyNoReply(req: Pick<RecipientRequest, 'sender' | 'rcpt' | 'user' | 'original'>, m: Spooled): string | null {
  if (req.sender === '') return 'null sender';
  const local = req.sender.slice(0, req.sender.lastIndexOf('@'));
  if (ROBOT.test(local)) return 'automated sender';
  const as = m.get('auto-submitted');
  if (as.some((v) => !/^no\b/i.test(v))) return 'Auto-Submitted';
  if (m.get('precedence').some((v) => /^(bulk|list|junk)\b/i.test(v))) return 'Precedence';
  if (m.fields.some((f) => f.name.startsWith('list-'))) return 'mailing list';
  if (m.get('x-auto-response-suppress').some((v) => /\b(oof|all)\b/i.test(v))) return 'X-Auto-Response-Suppress';
  if (m.get('x-loop').length > 0 && m.get('x-loop').some((v) => v.toLowerCase().includes(req.user.address))) return 'X-Loop';
  const mine = [req.rcpt, req.user.address, ...(req.original ? [req.original.toLowerCase()] : [])];
  const named = [...m.get('to'), ...m.get('cc'), ...m.get('bcc'), ...m.get('resent-to'), ...m.get('resent-cc')].join(',').toLowerCase();
  if (!mine.some((a) => named.includes(a))) return 'recipient not in To/Cc';
  return null;
}

function encodeWord(s: string): string {
  return /^[\x20-\x7e]*$/.test(s) ? s : `=?UTF-8?B?${Buffer.from(s, 'utf8').toString('base64')}?=`;
}

const clean = (s: string): string => s.replace(/[\r\n\0]/g, ' ');

const vacation: DeliveryModule = {
  kind: 'delivery',
  name: 'vacation',
  phase: 'notify',
  summary: 'answers mail with an absence notice (RFC 3834)',
  settings: {
    enabled: { type: 'boolean', default: false, doc: 'send an auto-reply' },
    subject: { type: 'string', default: 'Out of office', doc: 'subject of the reply' },
    body: { type: 'string', default: 'I am away and will read your message when I return.', doc: 'text of the reply' },
    days: { type: 'integer', min: 1, max: 365, default: 7, doc: 'reply at most once per sender in this many days' },
  },
  async run(req, settings, env): Promise<StepResult> {
    const m = req.message;
    const why = whyNoReply(req, m);
    if (why !== null) {
      env.log('debug', 'vacation: no reply', { user: req.user.address, reason: why });
      return { kind: 'continue' };
    }
    const days = typeof settings['days'] === 'number' ? settings['days'] : 7;
    const at = req.user.address.lastIndexOf('@');
    const rel = ['.pigeon-vacation', req.user.address.slice(at + 1), req.user.address.slice(0, at)];
    if (!(await mailWriter(env.alloc.mailUser).vacationDue(env.alloc.mailRoot, rel, req.sender, days))) {
      env.log('debug', 'vacation: already answered', { user: req.user.address, to: req.sender });
      return { kind: 'continue' };
    }
    const subject = typeof settings['subject'] === 'string' ? settings['subject'] : 'Out of office';
    const body = typeof settings['body'] === 'string' ? settings['body'] : '';
    // the Message-ID's bytes as they came (a value that is not UTF-8 is left out)
    const orig = headerText(m.get('message-id')[0] ?? '') || undefined;
    const lines = [
      `From: <${req.user.address}>`,
      `To: <${clean(req.sender)}>`,
      `Subject: ${encodeWord(clean(subject))}`,
      `Date: ${new Date().toUTCString().replace('GMT', '+0000')}`,
      `Message-ID: <${cryptoModule().randomBytes(12).toString('hex')}.vacation@${clean(env.hostname)}>`,
      ...(orig ? [`In-Reply-To: ${clean(orig)}`, `References: ${clean(orig)}`] : []),
      'Auto-Submitted: auto-replied',
      'Precedence: bulk',
      `X-Loop: ${req.user.address}`,
      'MIME-Version: 1.0',
      'Content-Type: text/plain; charset=utf-8',
      'Content-Transfer-Encoding: 8bit',
      '',
      body,
      '',
    ];
    const text = Buffer.from(lines.join('\n'), 'utf8');
    const r = await sendmail({
      command: env.sendmail,
      sender: '',
      recipients: [req.sender],
      data: async function* () {
        yield text;
      },
    });
    if (r) env.log('warn', 'vacation: reply not sent', { user: req.user.address, to: req.sender, error: r.text });
    else env.log('info', 'vacation: replied', { user: req.user.address, to: req.sender });
    return { kind: 'continue' };
  },
};

export default vacation;
