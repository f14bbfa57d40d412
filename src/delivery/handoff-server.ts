/**
 * NAME        src/delivery/handoff-server — `pigeon serve`'s socket for `pigeon deliver` hand-offs
 * SYNOPSIS    RUN_DIR/deliver.sock (unix socket; its path is in DIR/deliver-handoff.json)
 * DESCRIPTION `pigeon deliver` under pipe(8) starts one Node process per message; when the
 *             instance's `pigeon serve` runs, deliver only passes its request and the message
 *             here (src/delivery/handoff-client.ts) and serve delivers it with the code and the
 *             open database it already has: src/delivery/deliver.ts deliverRequest, the very
 *             function the in-process path runs, so the answer is the same.
 *             The protocol (version 1), bytes on a unix stream socket:
 *               deliver → serve  one line of JSON: {"v":1,"pid":N,"sender":S|null,
 *                                "original":S|null,"mailbox":S|null,"recipients":[S,…]}
 *                                (deliver's -f, -a, -m and recipients as given; null: not given)
 *               serve → deliver  {"go":true} when a recipient was accepted (otherwise straight
 *                                to the result: the message is not read, as in-process)
 *               deliver → serve  the message as frames: a 4-byte big-endian length, then that
 *                                many bytes; a frame of length 0 ends the message
 *               serve → deliver  one line {"result":{"dsn":"D.D.D","text":"…"}}, then close
 *             Nothing is delivered before the end frame: a deliver that dies mid-message leaves
 *             a spool that fails, and no recipient gets a copy.
 * DIAGNOSTICS A malformed request: the result 4.3.0 (deliver then exits 75), logged. A bug:
 *             4.3.0 internal error, as the in-process path answers one.
 * SECURITY    Anyone who can connect can deliver mail as any sender to any local user: the
 *             socket is mode 0660, group of mail_user (0600 when serve does not run as root),
 *             inside run_dir, whose own permissions decide who may reach it at all (README,
 *             pipe(8)). The header is capped at DELIVER_HANDOFF_MAX_HEADER bytes, each frame at
 *             DELIVER_HANDOFF_MAX_FRAME; an idle connection is closed after LMTP_IDLE_MS.
 */
import net from 'node:net';
import type { Store } from '../store.js';
import type { DeliveryEnv, DeliveryResult } from './types.js';
import { checkRequest, deliverRequest, type DeliverRequest } from './deliver.js';
import { DELIVER_HANDOFF_MAX_FRAME, DELIVER_HANDOFF_MAX_HEADER, LMTP_IDLE_MS } from '../limits.js';

/** What a hand-off needs from the daemon, looked up at each connection (a reload swaps the logger). */
export interface HandoffDaemon {
  readonly store: Store;
  readonly env: DeliveryEnv;
}

class Cut extends Error {
  readonly code = 'ECONNRESET';
}

/** The bytes of a socket, read as lines and counted blocks. */
class Bytes {
  private bufs: Buffer[] = [];
  private len = 0;
  private readonly it: AsyncIterator<Buffer>;
  constructor(it: AsyncIterator<Buffer>) {
    this.it = it;
  }

  private async more(): Promise<boolean> {
    const r = await this.it.next();
    if (r.done === true) return false;
    this.bufs.push(r.value);
    this.len += r.value.length;
    return true;
  }

  private take(n: number): Buffer {
    const all = this.bufs.length === 1 ? (this.bufs[0] as Buffer) : Buffer.concat(this.bufs, this.len);
    this.bufs = all.length > n ? [all.subarray(n)] : [];
    this.len = all.length - n;
    return all.subarray(0, n);
  }

  /** The next line without its LF; null at the end; throws past `max` bytes. */
  async line(max: number): Promise<string | null> {
    for (;;) {
      let seen = 0;
      for (const b of this.bufs) {
        const i = b.indexOf(10);
        if (i >= 0) return this.take(seen + i + 1).subarray(0, seen + i).toString('utf8');
        seen += b.length;
      }
      if (this.len > max) throw new Error(`request line longer than ${max} bytes`);
      if (!(await this.more())) return null;
    }
  }

  /** Exactly n bytes; null when the stream ends first. */
  async exactly(n: number): Promise<Buffer | null> {
    while (this.len < n) if (!(await this.more())) return null;
    return this.take(n);
  }
}

/** The message frames up to the end frame; throws (so that nothing is delivered) when the connection ends first. */
async function* messageOf(b: Bytes, ended: () => void): AsyncGenerator<Buffer> {
  for (;;) {
    const h = await b.exactly(4);
    if (h === null) throw new Cut('the delivering process went away before the end of the message');
    const n = h.readUInt32BE(0);
    if (n === 0) {
      ended();
      return;
    }
    if (n > DELIVER_HANDOFF_MAX_FRAME) throw new Error(`hand-off frame of ${n} bytes (at most ${DELIVER_HANDOFF_MAX_FRAME})`);
    const d = await b.exactly(n);
    if (d === null) throw new Cut('the delivering process went away before the end of the message');
    yield d;
  }
}

type Request = DeliverRequest & { readonly pid: number | null };

/** The request line, or null when it is not one of ours. */
function parseRequest(line: string): Request | null {
  let v: unknown;
  try {
    v = JSON.parse(line);
  } catch {
    return null;
  }
  if (typeof v !== 'object' || v === null) return null;
  const o = v as Record<string, unknown>;
  const opt = (x: unknown): string | undefined | false => (x === null || x === undefined ? undefined : typeof x === 'string' ? x : false);
  const sender = opt(o['sender']);
  const original = opt(o['original']);
  const mailbox = opt(o['mailbox']);
  const rcpts = o['recipients'];
  if (o['v'] !== 1 || sender === false || original === false || mailbox === false) return null;
  if (!Array.isArray(rcpts) || !rcpts.every((r): r is string => typeof r === 'string')) return null;
  const pid = typeof o['pid'] === 'number' && Number.isInteger(o['pid']) ? o['pid'] : null;
  return { pid, sender, original, mailbox, recipients: rcpts };
}

async function handOne(sock: net.Socket, daemon: () => HandoffDaemon): Promise<void> {
  const b = new Bytes(sock[Symbol.asyncIterator]() as AsyncIterator<Buffer>);
  const reply = (o: object): void => {
    if (!sock.destroyed) sock.write(`${JSON.stringify(o)}\n`);
  };
  const line = await b.line(DELIVER_HANDOFF_MAX_HEADER);
  if (line === null) return;
  const { store, env } = daemon();
  const req = parseRequest(line);
  let result: DeliveryResult;
  if (req === null) {
    env.log('warn', 'hand-off: malformed request; answered 4.3.0');
    result = { dsn: '4.3.0', text: 'malformed delivery hand-off request (pigeon deliver and pigeon serve of different versions?)' };
  } else {
    env.log('debug', 'hand-off from pigeon deliver', { pid: req.pid ?? undefined, recipients: req.recipients.length });
    result =
      checkRequest(req) ??
      (await deliverRequest(env, store, req, () => {
        reply({ go: true });
        // the whole message is here: no idle limit while serve delivers it (deliver waits)
        return messageOf(b, () => sock.setTimeout(0));
      }).catch((e: unknown): DeliveryResult => ({ dsn: '4.3.0', text: `internal error (${e instanceof Error ? e.message : String(e)})` })));
  }
  reply({ result: { dsn: result.dsn, text: result.text } });
  sock.end();
}

/** The hand-off server; the caller listens on the socket path and sets its mode (SECURITY). */
export function handoffServer(daemon: () => HandoffDaemon): net.Server {
  return net.createServer((sock) => {
    sock.on('error', () => undefined);
    sock.setTimeout(LMTP_IDLE_MS, () => sock.destroy());
    handOne(sock, daemon).catch((e: unknown) => {
      sock.destroy(); // deliver: 75, or in-process before "go"; nothing was delivered from a cut message
      try {
        daemon().env.log('warn', `hand-off: ${e instanceof Error ? e.message : String(e)}`);
      } catch {
        /* no delivery environment (the very failure): the connection is closed, deliver says it */
      }
    });
  });
}
