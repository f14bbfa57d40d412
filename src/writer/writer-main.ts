/**
 * NAME        src/writer/writer-main — the mail writer child: runs as the mail user
 * SYNOPSIS    forked by src/writer/mail-writer.ts with {uid, gid} of mail_user; not a command
 * DESCRIPTION Serves the operations of src/writer/local-writer.ts over the IPC channel
 *             (src/writer/wire.ts), several at a time, each by its id. A body is pulled from the
 *             parent one chunk at a time, as the operation consumes it. While it holds a single
 *             operation that the parent sent as `solo` (src/writer/wire.ts), its fsyncs are made
 *             in place (src/writer/safe-fs.ts syncInPlaceWhen): its event loop has nothing else
 *             to do meanwhile. When the parent goes away
 *             (its channel closes) every message still held is aborted (a Maildir tmp file
 *             removed, an mbox truncated back and unlocked) and the child exits.
 * SECURITY    Refuses to run as root: it exists so that root never writes into a mailbox.
 */
import { LocalWriter } from './local-writer.js';
import { asBuffer, type ChildMessage, type ParentMessage } from './wire.js';
import { reportFaultsTo } from '../delivery/fault.js';
import { onNotice } from '../delivery/notice.js';
import { syncInPlaceWhen } from './safe-fs.js';

/** A body arriving from the parent, pulled one chunk at a time. */
class PulledBody implements AsyncIterable<Buffer> {
  private queued: Buffer | null;
  private ended: boolean;
  private error: string | null = null;
  private waiter: (() => void) | null = null;
  private readonly id: number;
  private readonly send: (m: ChildMessage) => void;

  constructor(id: number, first: Uint8Array | null, end: boolean, send: (m: ChildMessage) => void) {
    this.id = id;
    this.send = send;
    this.queued = first ? asBuffer(first) : null;
    this.ended = end;
  }

  push(m: Extract<ParentMessage, { t: 'data' }>): void {
    if (m.data) this.queued = asBuffer(m.data);
    if (m.end) this.ended = true;
    if (m.error !== undefined) this.error = m.error;
    this.wake();
  }

  fail(why: string): void {
    this.error = why;
    this.wake();
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<Buffer> {
    for (;;) {
      if (this.error !== null) throw Object.assign(new Error(`message body: ${this.error}`), { code: this.error });
      if (this.queued) {
        const b = this.queued;
        this.queued = null;
        yield b;
        continue;
      }
      if (this.ended) return;
      await new Promise<void>((r) => {
        this.waiter = r;
        this.send({ t: 'pull', id: this.id });
      });
    }
  }
}

if (process.getuid?.() === 0) {
  process.stderr.write('pigeon mail writer: refusing to run as root\n');
  process.exit(78);
}
if (!process.send) {
  process.stderr.write('pigeon mail writer: not started by pigeon (no IPC channel)\n');
  process.exit(64);
}

const send = (m: ChildMessage): void => {
  if (process.connected) process.send?.(m);
};
reportFaultsTo((step) => send({ t: 'fault', step }));
onNotice((msg, fields) => send({ t: 'notice', msg, fields }));

const writer = new LocalWriter();
const bodies = new Map<number, PulledBody>();
type Op = (...a: unknown[]) => Promise<unknown>;
const OPS = new Set(['createMailbox', 'discardEmpty', 'store', 'commit', 'storeAndCommit', 'abort', 'vacationDue', 'ensureDir', 'takeLock', 'removeFile', 'putFile', 'syncDir', 'purgeMailbox']);

// operations started and not yet answered: with one, sent as `solo` (the parent's requests have not
// overlapped lately), nothing else waits on this event loop, so its fsyncs are made in place
// instead of on the thread pool (two thread switches fewer each)
let inFlight = 0;
let notSolo = 0;
syncInPlaceWhen(() => inFlight === 1 && notSolo === 0);

process.on('message', (m: ParentMessage) => {
  if (m.t === 'data') {
    bodies.get(m.id)?.push(m);
    return;
  }
  const { id, op } = m;
  if (!OPS.has(op)) {
    send({ t: 'fail', id, error: { code: 'EINVAL', message: `unknown mail writer operation ${op}` } });
    return;
  }
  const args = [...m.args];
  if (m.data !== undefined) {
    const body = new PulledBody(id, m.data, m.end === true, send);
    bodies.set(id, body);
    args.push(body);
  }
  const fn = (writer as unknown as Record<string, Op>)[op] as Op;
  inFlight++;
  const solo = m.solo === true;
  if (!solo) notSolo++;
  const over = (): void => {
    inFlight--;
    if (!solo) notSolo--;
  };
  fn.apply(writer, args).then(
    (value) => {
      over();
      bodies.delete(id);
      send({ t: 'done', id, value: value === undefined ? null : value });
    },
    (e: unknown) => {
      over();
      bodies.delete(id);
      const err = e as NodeJS.ErrnoException;
      send({ t: 'fail', id, error: { code: typeof err?.code === 'string' ? err.code : 'EWRITER', message: e instanceof Error ? e.message : String(e) } });
    },
  );
});

process.on('disconnect', () => {
  for (const b of bodies.values()) b.fail('EPIPE');
  void writer.abortAll().finally(() => process.exit(0));
});
