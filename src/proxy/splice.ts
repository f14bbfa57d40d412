/**
 * NAME        src/proxy/splice — join a logged-in client with its backend, both ways
 * SYNOPSIS    splice({ client: { input, output }, backend: { input, output } }, { clientEnded, backendEnded })
 * DESCRIPTION Client → backend and backend → client, each by a pump (below) with backpressure both
 *             ways (a slow reader pauses the other side's socket or child), and one watcher per
 *             stream for the end of each direction. The relays of src/proxy/router.ts (local
 *             Dovecot/Courier child), backends/peer.ts and src/proxy/received.ts (the two ends of
 *             a peer link) use it.
 *             The pump: what a source gives within one turn of the event loop goes out in one
 *             write (cork → writes → uncork: one writev(2)), not one write per chunk. A TLS socket
 *             gives one chunk per TLS record (16 KiB) and a read of 64 KiB holds four: piped
 *             chunk by chunk, the relay from a peer link to a plain client made four write(2)
 *             calls where one does (strace of a 20 MiB POP3 RETR through the link). Nothing waits
 *             for more data: the batch is written in the same turn (setImmediate), and at the
 *             source's end or close before its end is passed on; a short chunk that finds no
 *             batch (a command, a reply: less than one TLS record) is written at once, and a
 *             batch that reaches BATCH_MAX (256 KiB) is written without waiting for the turn's end. When the destination keeps
 *             more than its high-water mark queued (a slow reader), the source is paused until
 *             'drain'.
 *             A source made by src/proxy/own-reads.ts (the dialing node's end of a peer link,
 *             the home node's end of the socket pair to its backend) reads into buffers of its
 *             own and batches them itself; the pump tells it when the destination is done with a
 *             chunk.
 *             Why not two stream.pipeline() calls: the client is one duplex socket, source of one
 *             pipeline and destination of the other, and each pipeline puts its own end-of-stream
 *             watchers on it (close, end, finish, error, three times over). With node:tls' own two
 *             that made 11 'close' listeners on every relayed TLS socket and a
 *             MaxListenersExceededWarning per session. Here a relayed socket carries at most five.
 *             Errors: every stream gets one error listener (a reset client or a dead link never
 *             throws); the direction it breaks ends like EOF, and the caller's clientEnded /
 *             backendEnded decides what to tear down.
 * SECURITY    Bytes are passed as they are; nothing is parsed or logged.
 */
import type { Readable, Writable } from 'node:stream';
import { TLSSocket } from 'node:tls';
import { ownReader } from './own-reads.js';

export interface SpliceEnds {
  /** the client: what it sends (input) and where its replies go (output; may be the same socket) */
  readonly client: { readonly input: Readable; readonly output: Writable };
  /** the backend: where client bytes go (a child's stdin, a link) and what it answers */
  readonly backend: { readonly input: Writable; readonly output: Readable };
}

export interface SpliceEvents {
  /** the client stopped sending (EOF, reset, closed); called once */
  clientEnded(): void;
  /** the backend stopped answering and everything it said reached the client's socket; called once */
  backendEnded(): void;
}

export interface Splice {
  /** bytes from the client to the backend so far */
  readonly bytesIn: number;
  /** bytes from the backend to the client so far */
  readonly bytesOut: number;
}

const ignore = (): void => undefined;

/** Call `fn` once, on the first of `events`; the other listeners are removed then. */
function onFirst(e: NodeJS.EventEmitter, events: readonly string[], fn: () => void): void {
  const h = (): void => {
    for (const ev of events) e.off(ev, h);
    fn();
  };
  for (const ev of events) e.on(ev, h);
}

function isClosed(s: Readable | Writable): boolean {
  return s.destroyed || ('closed' in s && s.closed === true);
}

/** a chunk this long (a full TLS record, a full read) starts a batch; a shorter one goes out at once */
const BATCH_FROM = 16 * 1024;
/** a batch this large is written at once: what a slow client's session can hold queued stays near this */
const BATCH_MAX = 256 * 1024;

/**
 * Copy `src` to `dst` as Readable.pipe() does (dst is ended at src's end; a close or an error of
 * either side stops the copy, the caller's watchers decide the rest), batching the chunks of one
 * event-loop turn into one write. `counted(n)` sees every chunk's length as it arrives.
 */
function pump(src: Readable, dst: Writable, counted: (n: number) => void): void {
  let batch: Buffer[] = [];
  let batched = 0; // bytes in batch
  let scheduled = false; // a flush at the end of this turn is pending
  let waiting = false; // paused until dst drains
  const gone = (): boolean => dst.destroyed || dst.writableEnded;
  const resume = (): void => {
    waiting = false;
    if (!src.destroyed) src.resume();
  };
  // the writes normally go out at once; what the kernel did not take waits in dst: a slow reader
  const pauseIfFull = (): void => {
    if (!waiting && dst.writableNeedDrain && dst.writableLength >= dst.writableHighWaterMark) {
      waiting = true;
      src.pause();
      dst.once('drain', resume);
    }
  };
  const flush = (): void => {
    const out = batch;
    batch = [];
    batched = 0;
    if (out.length === 0 || gone()) return;
    if (out.length === 1) dst.write(out[0]);
    else {
      dst.cork();
      for (const c of out) dst.write(c);
      dst.uncork();
    }
    pauseIfFull();
  };
  const onChunk = (c: Buffer): void => {
    counted(c.length);
    if (!scheduled && c.length < BATCH_FROM) {
      // a short chunk with nothing batched before it (a command, a reply): out at once
      if (!gone()) dst.write(c);
      pauseIfFull();
      return;
    }
    batch.push(c);
    batched += c.length;
    if (batched >= BATCH_MAX) flush(); // a fast source: a full batch goes now, and backpressure is checked
    else if (!scheduled) {
      scheduled = true;
      setImmediate(() => {
        scheduled = false;
        flush();
      });
    }
  };
  const reader = ownReader(src);
  if (reader === undefined) src.on('data', onChunk);
  else {
    // a socket that reads into buffers of its own (src/proxy/own-reads.ts): the reader batches a
    // turn's reads itself and must know when dst is done with a chunk, whose bytes it reuses;
    // node:tls encrypts a chunk into its own buffer during write() when nothing is queued before it
    const encrypts = dst instanceof TLSSocket;
    reader.relayTo({
      write: (c) => {
        counted(c.length);
        if (gone()) return true;
        const idle = dst.writableLength === 0 && dst.writableCorked === 0;
        dst.write(c);
        pauseIfFull();
        return dst.writableLength === 0 || (encrypts && idle);
      },
      // a chunk still queued in dst may be a view of the reader's buffer
      holds: () => dst.writableLength > 0,
    });
  }
  src.once('end', () => {
    reader?.flush();
    flush();
    if (!gone()) dst.end();
  });
  // a source closed without an end (reset, error): what it gave before still goes out
  src.once('close', () => {
    reader?.flush();
    flush();
  });
  // a 'data' listener does not start a stream that was paused (the client socket before the login)
  src.resume();
  dst.once('close', () => {
    batch = [];
    batched = 0;
    if (waiting) dst.off('drain', resume);
  });
}

export function splice(ends: SpliceEnds, on: SpliceEvents): Splice {
  const { client, backend } = ends;
  const counts = { bytesIn: 0, bytesOut: 0 };
  for (const s of new Set<Readable | Writable>([client.input, client.output, backend.input, backend.output])) s.on('error', ignore);
  pump(client.input, backend.input, (n) => {
    counts.bytesIn += n;
  });
  pump(backend.output, client.output, (n) => {
    counts.bytesOut += n;
  });

  if (isClosed(client.input) || client.input.readableEnded) queueMicrotask(on.clientEnded);
  else onFirst(client.input, ['end', 'close'], on.clientEnded);

  const outputDone = (): void => {
    // the pump ends the client's output at the backend's EOF; after an error or a close it does not
    if (!client.output.writableEnded && !isClosed(client.output)) client.output.end();
    if (client.output.writableFinished || isClosed(client.output)) on.backendEnded();
    else onFirst(client.output, ['finish', 'close'], on.backendEnded);
  };
  if (isClosed(backend.output) || backend.output.readableEnded) queueMicrotask(outputDone);
  else onFirst(backend.output, ['end', 'close'], outputDone);
  return counts;
}
