/**
 * NAME        src/delivery/mailstore — delivery module: store the message in the user's mailbox
 * DESCRIPTION Finds (or lazily allocates, through the creator module chosen in
 *             `mailstore.creator`) the user's mailbox with src/allocation.ts `placeUser` — the same
 *             function the proxy uses, so Dovecot is started on exactly this path — then hands the
 *             message to the MDA module of the mailbox's format (src/delivery/maildir.ts, mbox.ts),
 *             which runs in the mail writer (src/writer/mail-writer.ts): as the mail user, in a
 *             child process when pigeon runs as root. When the pipeline says nothing can fail
 *             between prepare and commit (RecipientRequest.commitAtOnce: the usual case, the
 *             mailstore alone), the message is written and renamed into new/ in one request.
 *             Skipped when an earlier module (forward with keep=false) took the message.
 *             With `mailstore.mda` naming an MDA program (src/delivery/dovecot-lda.ts) instead of
 *             `builtin`, that program delivers into the placed and created mailbox, as the
 *             prepared step's commit (after a forward's, as the built-in rename into new/).
 * CONFIG      mailstore.enabled, format, mda, creator, quota, quota_full, max_size, detail
 * DIAGNOSTICS 5.3.4 too big; 5.2.2 / 4.2.2 over quota; 4.3.x file system; 4.2.1 creator none and
 *             no mailbox; 4.2.0 mailbox being moved, locked, or unsafe (a symbolic or hard link
 *             where the mailbox, tmp/, new/ or a lock file should be: logged as an error, the
 *             link is never followed); 4.4.x home node unreachable. A mailbox on
 *             another node is stored there by the environment's RemoteStore (the peer link).
 */
import type { Json } from '../settings.js';
import { placeUser } from '../allocation.js';
import { isAppError, mailError } from '../errors.js';
import { MDA_MODULES, MDA_PROGRAMS, BUILTIN_MDA } from './registry-mda.js';
import { findFolder } from './maildir.js';
import { traceHeaders, deliveredParts, hasPipeDeliveredTo } from './message.js';
import { fsFailure, type StoreRequest } from './mda.js';
import { MAX_MESSAGE_SIZE } from '../limits.js';
import { mailWriter } from '../writer/mail-writer.js';
import type { DeliveryModule, DeliveryResult, StepResult } from './types.js';

const num = (v: Json | undefined, d: number): number => (typeof v === 'number' ? v : d);

/** The largest spool any of these recipients' mailstore settings allows (0 = unlimited). */
export function spoolLimit(maxSizes: readonly (Json | undefined)[]): number {
  let m = 0;
  for (const v of maxSizes) {
    const n = num(v, MAX_MESSAGE_SIZE);
    if (n === 0) return 0;
    m = Math.max(m, n);
  }
  return m === 0 ? 0 : m + 1;
}

const mailstore: DeliveryModule = {
  kind: 'delivery',
  name: 'mailstore',
  phase: 'store',
  summary: "stores mail in the user's mailbox (maildir or mbox)",
  settings: {
    enabled: { type: 'boolean', default: true, doc: 'store incoming mail in the mailbox' },
    format: { type: 'module', kind: 'mda', default: 'maildir', doc: 'MDA module: mailbox format' },
    mda: {
      type: 'enum',
      values: [BUILTIN_MDA, ...MDA_PROGRAMS.names()],
      default: BUILTIN_MDA,
      doc: "who writes the message: builtin (pigeon's own MDA of the format) or dovecot-lda (Dovecot's delivery program, with Sieve: sieve.script; maildir only)",
    },
    creator: { type: 'module', kind: 'creator', default: 'lock', doc: 'creator module: how a new mailbox is allocated (lock, cas, or none = must exist)' },
    placement: {
      type: 'enum',
      values: ['local', 'fewest'],
      default: 'local',
      doc: 'where a new mailbox is allocated: on the node that first needs it (local), or on the running node with the fewest users (fewest)',
    },
    quota: { type: 'integer', min: 0, default: 0, doc: 'mailbox quota in bytes (Maildir++ maildirsize); 0 = unlimited' },
    quota_full: { type: 'enum', values: ['bounce', 'defer'], default: 'bounce', doc: 'over quota: bounce (552 5.2.2) or defer and retry later (452 4.2.2)' },
    max_size: { type: 'integer', min: 0, default: MAX_MESSAGE_SIZE, doc: 'largest message accepted in bytes (552 5.3.4 above it); 0 = unlimited' },
    detail: { type: 'boolean', default: true, doc: 'deliver user+folder@domain into folder when it exists' },
  },
  async run(req, settings, env): Promise<StepResult> {
    if (!req.keep) return { kind: 'continue' };
    const max = num(settings['max_size'], MAX_MESSAGE_SIZE);
    if (req.message.oversized || (max > 0 && req.message.size > max)) {
      return { kind: 'fail', result: { dsn: '5.3.4', text: `Message too big for mailbox (limit ${max} bytes)` } };
    }
    if (req.user.movingTo !== null) {
      return { kind: 'fail', result: { dsn: '4.2.0', text: `mailbox of ${req.user.address} is being moved to node ${req.user.movingTo}; try again later` } };
    }
    let placement;
    try {
      placement = await placeUser(env.alloc, req.user, req.config);
    } catch (e) {
      if (isAppError(e)) {
        if (e.code === 'NO_SUCH_USER') return { kind: 'fail', result: { dsn: '4.2.1', text: `mailbox of ${req.user.address} does not exist and mailstore.creator is none` } };
        if (e.code === 'INVALID_ADDRESS') return { kind: 'fail', result: { dsn: '5.1.3', text: e.message } };
        return { kind: 'fail', result: { dsn: '4.3.0', text: e.message } };
      }
      return { kind: 'fail', result: fsFailure(e, 'allocate mailbox') };
    }
    if (placement.kind === 'remote') {
      const remote = env.remote;
      const node = placement.node;
      if (remote === null) return { kind: 'fail', result: { dsn: '4.3.0', text: `mailbox of ${req.user.address} is on node ${node}, not on this node` } };
      // the home node stores it; acknowledged only once it answers (after its fsync)
      return {
        kind: 'continue',
        prepared: {
          what: `node ${node}`,
          commit: async () => {
            // the record as the allocation left it (a lost race or a placement changed the home)
            const r = await remote(node, { ...req, user: placement.user });
            if (!r.dsn.startsWith('2')) throw mailError(r);
          },
          abort: async () => undefined,
        },
      };
    }
    const a = placement.allocation;
    const mda = MDA_MODULES.get(a.format);
    if (!mda) return { kind: 'fail', result: { dsn: '4.3.5', text: `unknown mailbox format ${a.format}` } };
    const writer = mailWriter(env.alloc.mailUser);
    const refused = (r: DeliveryResult): StepResult => {
      if (r.text.startsWith('Mailbox unsafe')) env.log('error', 'mailstore: refused to write through a link or special file', { user: req.user.address, mailbox: a.path, status: `${r.dsn} ${r.text}` });
      return { kind: 'fail', result: r };
    };
    if (!mda.isAllocated(a)) {
      try {
        await writer.createMailbox(a, env.alloc.mailRoot);
      } catch (e) {
        return refused(fsFailure(e, 'create mailbox'));
      }
    }
    // a folder a scan module chose (quarantine) is created if missing; -m and +detail only select existing ones
    const folder = req.folder ?? req.mailbox ?? (settings['detail'] === false ? null : req.detail);
    const qf = settings['quota_full'] === 'defer' ? 'defer' : 'bounce';
    const parts = deliveredParts(req.message, Buffer.concat([traceHeaders(req.sender, req.rcpt, !hasPipeDeliveredTo(req.message, req.rcpt)), ...req.added]));
    const mdaName = typeof settings['mda'] === 'string' ? settings['mda'] : BUILTIN_MDA;
    if (mdaName !== BUILTIN_MDA) {
      const program = MDA_PROGRAMS.get(mdaName);
      if (!program) return { kind: 'fail', result: { dsn: '4.3.5', text: `mailstore.mda: unknown MDA ${mdaName}` } };
      if (!program.formats.includes(a.format)) {
        return { kind: 'fail', result: { dsn: '4.3.5', text: `mailstore.mda ${mdaName} cannot deliver into a mailbox of format ${a.format} (${program.formats.join(', ')} only)` } };
      }
      // an existing folder only, as the built-in MDA (incoming mail never creates one by +detail)
      const dir = folder === null || a.format !== 'maildir' ? null : findFolder(a.path, folder);
      const named = dir !== null && /^\.[\x21-\x7e]+$/.test(dir) && !dir.includes('&') ? dir.slice(1) : null;
      const request = {
        allocation: a,
        user: req.user.address,
        rcpt: req.rcpt,
        original: req.original,
        sender: req.sender,
        folder: named,
        quota: num(settings['quota'], 0),
        quotaFull: qf,
        config: req.config,
        mailUser: env.alloc.mailUser,
        prefix: parts.prefix,
        body: () => req.message.body(), // fresh chunks: a pipe write keeps a reference until flushed
      } as const;
      return {
        kind: 'continue',
        prepared: {
          what: `${mdaName} ${a.path}`,
          commit: async () => {
            const r = await program.deliver(request, env);
            if (!r.dsn.startsWith('2')) throw mailError(r);
          },
          abort: async () => undefined,
        },
      };
    }
    const storeReq: StoreRequest = {
      format: a.format,
      path: a.path,
      mailRoot: env.alloc.mailRoot,
      folder,
      createFolder: req.folder !== null,
      quota: num(settings['quota'], 0),
      quotaFull: qf,
      sender: req.sender,
      hostname: env.hostname,
      prefix: parts.prefix,
      size: parts.size,
      vsize: parts.size + parts.lines,
      lockWaitMs: env.lockWaitMs,
    };
    const writerFailed = (e: unknown): StepResult => ({ kind: 'fail', result: { dsn: '4.3.0', text: `Temporary delivery failure (${e instanceof Error ? e.message : String(e)})` } });
    if (req.commitAtOnce) {
      // nothing can fail between our prepare and our commit: both in one round trip to the writer
      let d;
      try {
        d = await writer.storeAndCommit(storeReq, req.message.body(true));
      } catch (e) {
        return writerFailed(e);
      }
      if ('dsn' in d) return refused(d);
      env.log('debug', 'mailstore: stored', { user: req.user.address, file: d.what });
      return { kind: 'continue', prepared: { what: d.what, commit: async () => undefined, abort: async () => undefined } };
    }
    let r;
    try {
      r = await writer.store(storeReq, req.message.body(true));
    } catch (e) {
      return writerFailed(e);
    }
    if ('dsn' in r) return refused(r);
    const stored = r;
    env.log('debug', 'mailstore: prepared', { user: req.user.address, file: stored.what });
    return {
      kind: 'continue',
      prepared: {
        what: stored.what,
        commit: async () => {
          const f = await writer.commit(stored.handle);
          if (f) throw mailError(f);
        },
        abort: () => writer.abort(stored.handle),
      },
    };
  },
};

export default mailstore;
