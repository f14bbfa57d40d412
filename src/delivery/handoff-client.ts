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
 *             Two ways to talk to serve, with the same protocol and answers:
 *             - the `pigeon` command (dist/src/cli.cjs, src/launcher.ts) passes the native
 *               module's connectUnix (native/pigeon_spawn.c): a blocking socket, spoken to with
 *               fs.writeSync/readSync. A message that fits in one frame (FRAME) leaves in one
 *               write with its end frame, and node:net is never loaded (≈ 3-4 ms of a deliver's
 *               CPU, `perf stat`). A larger message, or a stdin in non-blocking mode, goes on
 *               through a net.Socket made on that same descriptor, from where it stopped: a
 *               blocking write could wait for ever on a serve that answered early and reads no
 *               more.
 *             - without it (node dist/src/cli.js, no native module, PIGEON_DELIVER_NATIVE=0 for
 *               the `pigeon` command): node:net from the start.
 * SECURITY    Sends only what the command line and stdin hold; trusts only a runtime file and
 *             socket owned by root or this user (handoff-file.ts).
 */
import { closeSync, readSync, writeSync } from 'node:fs';
import type { Socket } from 'node:net';
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

/** The native module's blocking AF_UNIX connect (native/pigeon_spawn.c), given by src/launcher.ts. */
export interface HandoffNative {
  /** a connected, blocking, close-on-exec descriptor; throws (Error with an errno `code`) when it cannot connect */
  connectUnix(path: string): number;
}

/** deliver sends the message in frames of at most this many bytes */
const FRAME = 64 * 1024;
/** serve's answer lines are short; a longer one is not serve's */
const MAX_ANSWER = 64 * 1024;
const DSN = /^[245]\.\d{1,3}\.\d{1,3}$/;

const temp = (text: string): HandoffOutcome => ({ code: EX.TEMPFAIL, line: statusLine({ dsn: '4.3.0', text }) });
const wentAway = (): HandoffOutcome => temp('pigeon serve went away during the delivery hand-off; try again');
const malformed = (): HandoffOutcome => temp('malformed answer from pigeon serve (delivery hand-off)');
const spoolError = (e: unknown): HandoffOutcome => temp(`Temporary delivery failure (spool: ${(e as NodeJS.ErrnoException | null)?.code ?? 'error'})`);

/** serve's {"result":…} as pipe(8)'s answer; a result that is not one is a temporary failure. */
function outcomeOf(r: unknown): HandoffOutcome {
  const { dsn, text } = (typeof r === 'object' && r !== null ? r : {}) as { dsn?: unknown; text?: unknown };
  if (typeof dsn !== 'string' || !DSN.test(dsn) || typeof text !== 'string') return malformed();
  const res = { dsn, text };
  return dsn.startsWith('2') ? { code: EX.OK, line: null } : { code: exitCodeOf(res), line: statusLine(res) };
}

/** One line of serve's, parsed; null when it is not JSON. */
function answerOf(line: string): { go?: unknown; result?: unknown } | null {
  try {
    const m = JSON.parse(line) as unknown;
    return typeof m === 'object' && m !== null ? (m as { go?: unknown; result?: unknown }) : null;
  } catch {
    return null;
  }
}

const requestLine = (r: HandoffRequest): string =>
  `${JSON.stringify({ v: 1, pid: process.pid, sender: r.sender ?? null, original: r.original ?? null, mailbox: r.mailbox ?? null, recipients: r.recipients })}\n`;

/** one frame's header: its length */
function frameHeader(n: number): Buffer {
  const h = Buffer.alloc(4);
  h.writeUInt32BE(n, 0);
  return h;
}

/**
 * The message: a descriptor read synchronously (stdin), and the stream to read it on with when
 * the descriptor is in non-blocking mode (made only then: process.stdin costs a start ≈ 1 ms).
 */
export interface MessageInput {
  readonly fd: number;
  readonly stream: () => AsyncIterable<Buffer>;
}

/** node:net, loaded only when needed: without module loaders where Node has getBuiltinModule (20.16) */
async function netModule(): Promise<typeof import('node:net')> {
  const p = process as NodeJS.Process & { getBuiltinModule?: (id: 'node:net') => typeof import('node:net') };
  return p.getBuiltinModule ? p.getBuiltinModule('node:net') : import('node:net');
}

/** Hand the request and `input` to the instance's running serve; null: deliver in this process. */
export async function handOff(r: HandoffRequest, input: MessageInput, native?: HandoffNative | null): Promise<HandoffOutcome | null> {
  if (process.env['PIGEON_DELIVER_HANDOFF'] === '0') return null;
  const path = readHandoff(configOf(r.config));
  if (path === null) return null;
  if (native) {
    let fd: number;
    try {
      fd = native.connectUnix(path);
    } catch {
      return null; // as a refused connection below: deliver in this process
    }
    return viaDescriptor(fd, r, input);
  }
  const net = await netModule();
  const sock = await new Promise<Socket | null>((resolve) => {
    const s = net.connect(path);
    s.once('connect', () => resolve(s));
    s.once('error', () => resolve(null));
  });
  if (sock === null) return null;
  return viaSocket(sock, input, { request: requestLine(r) });
}

/** serve's lines on a blocking descriptor */
class Lines {
  private held = '';
  private readonly buf = Buffer.allocUnsafe(4096);
  private readonly fd: number;
  constructor(fd: number) {
    this.fd = fd;
  }

  /** the next line without its LF; null at the end of the connection, on a read error, or past MAX_ANSWER */
  next(): string | null {
    for (;;) {
      const i = this.held.indexOf('\n');
      if (i >= 0) {
        const line = this.held.slice(0, i);
        this.held = this.held.slice(i + 1);
        return line;
      }
      if (this.held.length > MAX_ANSWER) return null;
      let n: number;
      try {
        n = readSync(this.fd, this.buf, 0, this.buf.length, null);
      } catch {
        return null;
      }
      if (n === 0) return null;
      this.held += this.buf.toString('utf8', 0, n);
    }
  }
}

function writeAll(fd: number, b: Buffer): void {
  for (let off = 0; off < b.length; ) off += writeSync(fd, b, off, b.length - off);
}

function closeQuietly(fd: number): void {
  try {
    closeSync(fd);
  } catch {
    /* closed */
  }
}

/**
 * The hand-off on a blocking descriptor: the request, serve's first answer, and a message of at
 * most one frame in one write with the end frame; anything longer (or a non-blocking stdin)
 * goes on through a net.Socket on the same descriptor.
 */
async function viaDescriptor(fd: number, r: HandoffRequest, input: MessageInput): Promise<HandoffOutcome | null> {
  const lines = new Lines(fd);
  const done = (o: HandoffOutcome | null): HandoffOutcome | null => {
    closeQuietly(fd);
    return o;
  };
  try {
    writeAll(fd, Buffer.from(requestLine(r)));
  } catch {
    return done(null); // serve went away before it had anything: deliver in this process
  }
  const first = lines.next();
  const m = first === null ? null : answerOf(first);
  if (m !== null && m.result !== undefined) return done(outcomeOf(m.result));
  if (m === null || m.go !== true) return done(null);
  // "go": from now on a failure is 75, never a delivery in this process
  const held: Buffer[] = [];
  let size = 0;
  let eof = false;
  let nonblocking = false;
  try {
    while (size <= FRAME) {
      const b = Buffer.allocUnsafe(FRAME);
      let n: number;
      try {
        n = readSync(input.fd, b, 0, FRAME, null);
      } catch (e) {
        if ((e as NodeJS.ErrnoException | null)?.code !== 'EAGAIN') throw e;
        nonblocking = true;
        break;
      }
      if (n === 0) {
        eof = true;
        break;
      }
      held.push(b.subarray(0, n));
      size += n;
    }
  } catch (e) {
    return done(spoolError(e)); // no end frame: serve delivers nothing
  }
  if (!eof || size > FRAME) {
    // more than one frame, or the rest of stdin comes later: on through node:net
    const net = await netModule();
    const sock = new net.Socket({ fd, readable: true, writable: true });
    return viaSocket(sock, input, { held, nonblocking });
  }
  const message = Buffer.concat(held, size);
  const parts = size > 0 ? [frameHeader(size), message, Buffer.alloc(4)] : [Buffer.alloc(4)];
  try {
    writeAll(fd, Buffer.concat(parts));
  } catch {
    // serve went away mid-message; an answer it wrote first is still there to read
  }
  const last = lines.next();
  if (last === null) return done(wentAway());
  const a = answerOf(last);
  return done(a !== null && a.result !== undefined ? outcomeOf(a.result) : malformed());
}

/**
 * The hand-off on a net.Socket: from the request (`request`), or from after serve's "go" with
 * `held` (whole frames already read from stdin) and stdin's mode as viaDescriptor left them.
 */
function viaSocket(sock: Socket, input: MessageInput, from: { request: string } | { held: Buffer[]; nonblocking: boolean }): Promise<HandoffOutcome | null> {
  return new Promise<HandoffOutcome | null>((resolve) => {
    let went = !('request' in from);
    let done = false;
    const finish = (o: HandoffOutcome | null): void => {
      if (done) return;
      done = true;
      sock.destroy();
      resolve(o);
    };
    const lost = (): void => finish(went ? wentAway() : null);

    /** one frame: its length, then its bytes */
    const frame = (part: Buffer): void => {
      sock.write(frameHeader(part.length));
      sock.write(part);
    };
    const pump = async (held: readonly Buffer[], nonblocking: boolean): Promise<void> => {
      try {
        // Read synchronously while the descriptor lets us (pipe(8) gives a blocking pipe): no
        // stream over stdin, no thread-pool round trip per chunk, and a message that fits in one
        // frame leaves in one write with the end frame (corked). A descriptor in non-blocking
        // mode (EAGAIN) is read on as a stream from where this stopped.
        const buf = Buffer.allocUnsafe(FRAME);
        let rest: AsyncIterable<Buffer> | null = nonblocking ? input.stream() : null;
        sock.cork();
        for (const b of held) frame(b);
        while (rest === null) {
          let n: number;
          try {
            n = readSync(input.fd, buf, 0, FRAME, null);
          } catch (e) {
            if ((e as NodeJS.ErrnoException | null)?.code !== 'EAGAIN') throw e;
            rest = input.stream();
            break;
          }
          if (n === 0 || done) break;
          frame(Buffer.from(buf.subarray(0, n)));
          if (sock.writableNeedDrain) {
            sock.uncork();
            await drained(sock);
            if (done) return;
            sock.cork();
          }
        }
        if (rest !== null) {
          sock.uncork();
          for await (const chunk of rest) {
            for (let off = 0; off < chunk.length; off += FRAME) {
              if (done) return;
              frame(chunk.subarray(off, off + FRAME));
              if (sock.writableNeedDrain) await drained(sock);
            }
          }
        }
        if (!done) sock.write(Buffer.alloc(4)); // the end frame: only now may serve deliver
        if (rest === null) sock.uncork();
      } catch (e) {
        // the message could not be read: no end frame, so serve delivers nothing (the in-process answer)
        finish(spoolError(e));
      }
    };

    sock.setEncoding('utf8');
    let buf = '';
    sock.on('data', (d: string) => {
      buf += d;
      let i: number;
      while (!done && (i = buf.indexOf('\n')) >= 0) {
        const m = answerOf(buf.slice(0, i));
        buf = buf.slice(i + 1);
        if (m !== null && m.result !== undefined) finish(outcomeOf(m.result));
        else if (m !== null && m.go === true && !went) {
          went = true;
          void pump([], false);
        } else if (went) finish(malformed());
        else finish(null);
      }
      if (!done && buf.length > MAX_ANSWER) finish(went ? malformed() : null);
    });
    sock.on('error', lost);
    sock.on('close', lost);
    if ('request' in from) sock.write(from.request);
    else void pump(from.held, from.nonblocking);
  });
}
