/**
 * NAME        src/delivery/handoff-client — `pigeon deliver` hands its message to a running `pigeon serve`
 * SYNOPSIS    const o = await handOff(request, input);  // null: deliver in this process
 * DESCRIPTION Before pigeon deliver loads its configuration (the YAML parser, the schemas, the
 *             database driver), it looks for DIR/deliver-handoff.json (src/delivery/handoff-file.ts).
 *             When the serve it names accepts the connection, the request and then the message
 *             go there (protocol: src/delivery/handoff-server.ts) and serve's one result becomes
 *             the exit status and the one status line, mapped exactly as in-process
 *             (src/delivery/outcome.ts). Node built-ins only, plus those two small modules.
 *             No file, a file that fails its checks, a refused or failed connection, or a serve
 *             that goes away before it said "go" (nothing can have been delivered: it has not had
 *             the message) → null, and the caller delivers in its own process; stdin is still
 *             untouched then. Once serve said "go", any failure before its result is 75
 *             (`4.3.0`): serve may have delivered to some recipient, and Postfix must retry
 *             rather than this process deliver a second copy.
 *             PIGEON_DELIVER_HANDOFF=0 in the environment turns the hand-off off (benchmarks,
 *             debugging).
 * SECURITY    Sends only what the command line and stdin hold; trusts only a runtime file and
 *             socket owned by root or this user (handoff-file.ts).
 */
import net from 'node:net';
import { EX, type ExitCode } from '../errors.js';
import { exitCodeOf, statusLine } from './outcome.js';
import { configOf, readHandoff } from './handoff-file.js';
import { drained } from '../drain.js';

export interface HandoffRequest {
  readonly config: string | undefined;
  readonly sender: string | undefined;
  readonly original: string | undefined;
  readonly mailbox: string | undefined;
  readonly recipients: readonly string[];
}

export interface HandoffOutcome {
  readonly code: ExitCode;
  readonly line: string | null;
}

/** deliver sends the message in frames of at most this many bytes */
const FRAME = 64 * 1024;
const DSN = /^[245]\.\d{1,3}\.\d{1,3}$/;

const temp = (text: string): HandoffOutcome => ({ code: EX.TEMPFAIL, line: statusLine({ dsn: '4.3.0', text }) });

/** serve's {"result":…} as pipe(8)'s answer; a result that is not one is a temporary failure. */
function outcomeOf(r: unknown): HandoffOutcome {
  const { dsn, text } = (typeof r === 'object' && r !== null ? r : {}) as { dsn?: unknown; text?: unknown };
  if (typeof dsn !== 'string' || !DSN.test(dsn) || typeof text !== 'string') return temp('malformed answer from pigeon serve (delivery hand-off)');
  const res = { dsn, text };
  return dsn.startsWith('2') ? { code: EX.OK, line: null } : { code: exitCodeOf(res), line: statusLine(res) };
}

function connect(path: string): Promise<net.Socket | null> {
  return new Promise((resolve) => {
    const s = net.connect(path);
    s.once('connect', () => resolve(s));
    s.once('error', () => resolve(null));
  });
}

/** Hand the request and `input` to the instance's running serve; null: deliver in this process. */
export async function handOff(r: HandoffRequest, input: AsyncIterable<Buffer>): Promise<HandoffOutcome | null> {
  if (process.env['PIGEON_DELIVER_HANDOFF'] === '0') return null;
  const path = readHandoff(configOf(r.config));
  if (path === null) return null;
  const sock = await connect(path);
  if (sock === null) return null;
  return new Promise<HandoffOutcome | null>((resolve) => {
    let went = false;
    let done = false;
    const finish = (o: HandoffOutcome | null): void => {
      if (done) return;
      done = true;
      sock.destroy();
      resolve(o);
    };
    const lost = (): void => finish(went ? temp('pigeon serve went away during the delivery hand-off; try again') : null);

    const pump = async (): Promise<void> => {
      try {
        for await (const chunk of input) {
          for (let off = 0; off < chunk.length; off += FRAME) {
            if (done) return;
            const part = chunk.subarray(off, off + FRAME);
            const h = Buffer.alloc(4);
            h.writeUInt32BE(part.length, 0);
            sock.write(h);
            if (!sock.write(part)) await drained(sock);
          }
        }
        if (!done) sock.write(Buffer.alloc(4)); // the end frame: only now may serve deliver
      } catch (e) {
        // the message could not be read: no end frame, so serve delivers nothing (the in-process answer)
        finish(temp(`Temporary delivery failure (spool: ${(e as NodeJS.ErrnoException | null)?.code ?? 'error'})`));
      }
    };

    sock.setEncoding('utf8');
    let buf = '';
    sock.on('data', (d: string) => {
      buf += d;
      let i: number;
      while (!done && (i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        let m: { go?: unknown; result?: unknown } | null = null;
        try {
          m = JSON.parse(line) as { go?: unknown; result?: unknown };
        } catch {
          /* below */
        }
        if (m !== null && typeof m === 'object' && m.result !== undefined) finish(outcomeOf(m.result));
        else if (m !== null && typeof m === 'object' && m.go === true && !went) {
          went = true;
          void pump();
        } else if (went) finish(temp('malformed answer from pigeon serve (delivery hand-off)'));
        else finish(null);
      }
    });
    sock.on('error', lost);
    sock.on('close', lost);
    sock.write(`${JSON.stringify({ v: 1, pid: process.pid, sender: r.sender ?? null, original: r.original ?? null, mailbox: r.mailbox ?? null, recipients: r.recipients })}\n`);
  });
}
