/**
 * NAME        src/delivery/antivirus — delivery module: scan with ClamAV's clamd, then reject, quarantine or tag
 * DESCRIPTION Runs in the scan phase, before forward and mailstore. The message (its header
 *             section and body as received) is streamed to clamd (src/delivery/clamd.ts) ONCE per
 *             message: the result is kept with the spooled message, so every further recipient of
 *             the same LMTP transaction or pipe(8) call gets its own answer, by its own settings,
 *             from that one scan. Per recipient, by `antivirus.action` when a signature matched:
 *             `reject` — 554 5.7.1 naming the signature; `quarantine` — the mailstore delivers into
 *             `antivirus.quarantine_folder` (a Maildir++ folder `.NAME`, created as the mail user
 *             if missing; an mbox mailbox has no folders: INBOX), with the tag header; `tag` —
 *             `X-Virus-Status: Infected (NAME)` and delivered as usual. A clean message gets
 *             `X-Virus-Status: Clean`. With `antivirus.notify` the recipient is sent a short
 *             notice through the MTA's sendmail (null sender), once per message and recipient:
 *             for a rejected message at once, else only after it was delivered (afterDelivery).
 *             A message larger than `antivirus.max_size` is not sent to clamd: `oversize`
 *             accept delivers it with `X-Virus-Status: Unscanned (...)`, reject answers 552 5.3.4
 *             (permanent: never retried forever).
 * CONFIG      antivirus.enabled, action, quarantine_folder, notify, on_error, max_size, oversize;
 *             node-local in pigeon.yaml: clamd.address, clamd.timeout_s
 * DIAGNOSTICS clamd down, slow (clamd.timeout_s), closing mid-stream or answering garbage: one
 *             warn line per message naming clamd's address and what happened; then `on_error`
 *             decides per recipient: defer — 451 4.7.0 (the MTA retries), accept — delivered with
 *             `X-Virus-Status: Unscanned (scanner error)`. Never a silent pass.
 * SECURITY    clamd's answer is reduced to printable ASCII before it reaches a header, a status
 *             line or the log. The quarantine folder is created by the mail writer, as the mail
 *             user (src/writer/local-writer.ts), never by root.
 * SEE ALSO    src/delivery/clamd.ts, src/delivery/mailstore.ts, README "Antivirus (antivirus.*)"
 */
import { cryptoModule } from '../builtins.js';
import type { Json } from '../settings.js';
import { clamdScan, type ScanResult } from './clamd.js';
import { sendmail } from './sendmail.js';
import { headerText, type Spooled } from './message.js';
import type { DeliveryEnv, DeliveryModule, RecipientRequest, StepResult } from './types.js';

/** antivirus.max_size default: clamd's own StreamMaxLength default (25 MB). */
export const AV_MAX_SIZE = 25 * 1024 * 1024;
export const STATUS_HEADER = 'X-Virus-Status';

// one scan per spooled message, shared by all its recipients
const scans = new WeakMap<Spooled, Promise<ScanResult>>();

async function* messageBytes(m: Spooled): AsyncIterable<Buffer> {
  yield Buffer.concat([m.head, Buffer.from('\n')]);
  yield* m.body();
}

/** The scan of `m`, started by its first recipient; the warn line is logged once, with it. */
function scanOnce(m: Spooled, env: DeliveryEnv): Promise<ScanResult> {
  let p = scans.get(m);
  if (p === undefined) {
    p = clamdScan(env.clamd, messageBytes(m)).then((r) => {
      if (r.kind === 'error') env.log('warn', 'antivirus: clamd failed', { clamd: env.clamd.address, error: r.reason, msgid: m.get('message-id')[0] ?? null });
      else if (r.kind === 'infected') env.log('info', 'antivirus: virus found', { clamd: env.clamd.address, virus: r.name, msgid: m.get('message-id')[0] ?? null });
      return r;
    });
    scans.set(m, p);
  }
  return p;
}

const clean = (s: string): string => s.replace(/[\r\n\0]/g, ' ');

/** The notice to the recipient: what arrived, what was found, what was done with it. */
async function notify(req: RecipientRequest, env: DeliveryEnv, virus: string, done: string): Promise<void> {
  const m = req.message;
  const subject = headerText(m.get('subject')[0] ?? '') ?? '(not UTF-8)';
  const lines = [
    `From: Mail Delivery System <MAILER-DAEMON@${clean(env.hostname)}>`,
    `To: <${req.user.address}>`,
    'Subject: Virus found in a message to you',
    `Date: ${new Date().toUTCString().replace('GMT', '+0000')}`,
    `Message-ID: <${cryptoModule().randomBytes(12).toString('hex')}.antivirus@${clean(env.hostname)}>`,
    'Auto-Submitted: auto-generated',
    'MIME-Version: 1.0',
    'Content-Type: text/plain; charset=utf-8',
    'Content-Transfer-Encoding: 8bit',
    '',
    'A message to you contained a virus.',
    '',
    `  From (envelope): <${clean(req.sender)}>`,
    `  Subject: ${clean(subject).slice(0, 200)}`,
    `  Virus: ${virus}`,
    `  What happened: ${done}`,
    '',
  ];
  const text = Buffer.from(lines.join('\n'), 'utf8');
  const r = await sendmail({
    command: env.sendmail,
    sender: '',
    recipients: [req.user.address],
    data: async function* () {
      yield text;
    },
  });
  if (r) env.log('warn', 'antivirus: notice not sent', { user: req.user.address, error: r.text });
  else env.log('info', 'antivirus: notice sent', { user: req.user.address, virus });
}

const str = (v: Json | undefined, d: string): string => (typeof v === 'string' ? v : d);

const antivirus: DeliveryModule = {
  kind: 'delivery',
  name: 'antivirus',
  phase: 'scan',
  summary: "scans mail with ClamAV's clamd: reject, quarantine or tag what it finds",
  settings: {
    enabled: { type: 'boolean', default: false, doc: 'scan incoming mail with clamd (pigeon.yaml clamd.address)' },
    action: { type: 'enum', values: ['reject', 'quarantine', 'tag'], default: 'reject', doc: 'infected mail: reject (554 5.7.1), quarantine (into quarantine_folder), tag (header only)' },
    quarantine_folder: {
      type: 'string',
      pattern: /^[A-Za-z0-9][A-Za-z0-9_ -]{0,63}(\.[A-Za-z0-9][A-Za-z0-9_ -]{0,63}){0,7}$/,
      default: 'Quarantine',
      doc: 'folder for action=quarantine (Maildir++ .NAME, created if missing); letters, digits, _ - space, dots between levels',
    },
    notify: { type: 'boolean', default: false, doc: 'send the recipient a short notice for each infected message' },
    on_error: { type: 'enum', values: ['defer', 'accept'], default: 'defer', doc: 'clamd down, slow or broken: defer (451 4.7.0, retried) or accept with X-Virus-Status: Unscanned' },
    max_size: { type: 'integer', min: 1, default: AV_MAX_SIZE, doc: 'largest message sent to clamd, in bytes (clamd StreamMaxLength)' },
    oversize: { type: 'enum', values: ['accept', 'reject'], default: 'accept', doc: 'larger than max_size: accept unscanned with a header, or reject (552 5.3.4)' },
  },
  async run(req, settings, env): Promise<StepResult> {
    const m = req.message;
    const max = typeof settings['max_size'] === 'number' ? settings['max_size'] : AV_MAX_SIZE;
    if (m.oversized || m.size > max) {
      if (settings['oversize'] === 'reject') return { kind: 'fail', result: { dsn: '5.3.4', text: `Message too big for the virus scan (limit ${max} bytes)` } };
      req.addHeader(STATUS_HEADER, `Unscanned (larger than ${max} bytes)`);
      env.log('info', 'antivirus: not scanned (oversize)', { user: req.user.address, size: m.size, limit: max });
      return { kind: 'continue' };
    }
    const r = await scanOnce(m, env);
    if (r.kind === 'error') {
      if (settings['on_error'] === 'accept') {
        req.addHeader(STATUS_HEADER, 'Unscanned (scanner error)');
        return { kind: 'continue' };
      }
      return { kind: 'fail', result: { dsn: '4.7.0', text: 'Virus scanner unavailable; try again later' } };
    }
    if (r.kind === 'clean') {
      req.addHeader(STATUS_HEADER, 'Clean');
      return { kind: 'continue' };
    }
    const action = str(settings['action'], 'reject');
    const wantNotice = settings['notify'] === true;
    if (action === 'reject') {
      if (wantNotice) await notify(req, env, r.name, 'rejected, not delivered');
      return { kind: 'fail', result: { dsn: '5.7.1', text: `Message rejected: virus found (${r.name})` } };
    }
    req.addHeader(STATUS_HEADER, `Infected (${r.name})`);
    const folder = action === 'quarantine' ? str(settings['quarantine_folder'], 'Quarantine') : null;
    if (!wantNotice) return folder !== null ? { kind: 'continue', folder } : { kind: 'continue' };
    // the notice goes out only once the message is in the mailbox (a deferred one is retried)
    const afterDelivery = (): Promise<void> => notify(req, env, r.name, folder !== null ? `delivered into your folder ${folder}` : 'delivered, marked as infected');
    return folder !== null ? { kind: 'continue', folder, afterDelivery } : { kind: 'continue', afterDelivery };
  },
};

export default antivirus;
