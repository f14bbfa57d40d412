/**
 * NAME        src/proxy/own-reads — relayed sockets that read into buffers the relay reuses
 * SYNOPSIS    const r = ownReads(); const s = new Socket({ fd, onread: r.onread }); r.attach(s);
 *             ... later, src/proxy/splice.ts: ownReader(s)?.relayTo(write)
 * DESCRIPTION Node gives every read of a socket a new buffer: 64 KiB allocated outside the JS heap
 *             (then shrunk to what was read), one for each TLS record. A relay moving a large
 *             FETCH or RETR through the peer link makes thousands of them per second, and V8 runs
 *             a full mark of the worker's heap about every 64 MB of such memory: in CPU profiles
 *             of both nodes during a RETR through the link, garbage collection was the largest
 *             single item after the writes themselves. A socket created with net.Socket's
 *             `onread` option reads into a buffer its owner gives it instead; this module gives it
 *             one, for the two sockets whose reads carry a session's bulk: the dialing node's end
 *             of a peer link (node:tls reads into it too) and the home node's end of the socket
 *             pair to the backend (src/peer/pair.ts).
 *             Until the relay takes the socket, every read lands in one scratch buffer shared by
 *             the process and is copied out at once and pushed as Node would (the protocol on the
 *             link, the pool's watchers: 'data', pause(), resume() behave exactly as before; a
 *             small copy comes from Node's buffer pool). Once src/proxy/splice.ts relays it
 *             (`relayTo`), each chunk goes straight to the other side's write: a read of at least
 *             BULK bytes moves the socket to a buffer of its own (OWN bytes), reused read after
 *             read as long as the destination took the chunk at once (nothing left queued in it,
 *             the usual case) and the reads stay large; a destination that keeps the chunk queued
 *             (a slow reader) keeps that buffer too, and the next read gets a new one; a short
 *             read (a reply, the end of a message) gives the buffer back to the garbage collector,
 *             so an idle relayed session holds none. What lands in the shared scratch is always
 *             copied before the callback returns: nothing keeps a reference to it.
 * SECURITY    Bytes are passed as they are; a buffer is reused only once no write refers to it
 *             (the destination's queue is empty after the write), so no session's bytes can
 *             reach another session or be overwritten before they are sent.
 * SEE ALSO    src/proxy/splice.ts, src/peer/pair.ts, src/peer/link.ts
 */
import type { Socket } from 'node:net';
import type { Readable } from 'node:stream';

/** net.Socket's `onread` option (node:tls passes it on; @types/node does not type it on every constructor) */
export interface OnRead {
  readonly buffer: () => Uint8Array;
  readonly callback: (n: number, buf: Uint8Array) => boolean;
}

/** a read at least this long is bulk: the next reads go to a buffer of the socket's own */
export const BULK = 4 * 1024;
/** the size of that buffer, and of the shared scratch: a plain socket's largest read (Node's own read size) */
export const OWN = 64 * 1024;

/** every read of a socket without a buffer of its own lands here, and is copied out before the callback returns */
const scratch = Buffer.allocUnsafe(OWN);

/** The relay's side of a socket: `write` sends a chunk on and says whether the destination kept it queued. */
export type RelayWrite = (chunk: Buffer) => boolean;

const readers = new WeakMap<Readable, OwnReader>();

export class OwnReader {
  private socket: Socket | null = null;
  /** the socket's own buffer while its reads are bulk, else null (reads land in the scratch) */
  private own: Buffer | null = null;
  private write: RelayWrite | null = null;
  /** some bytes went to `write` already */
  private relayed = false;
  /** called once, at the first bytes relayed */
  private onRelayed: (() => void) | null = null;
  /** buffers of its own this socket has had (tests: reused, not one per read) */
  buffers = 0;
  readonly onread: OnRead = {
    buffer: () => this.own ?? scratch,
    callback: (n, buf) => this.got(n, buf),
  };

  /** The socket created with `onread`: its reads are pushed as Node would until the relay takes it. */
  attach(socket: Socket): void {
    this.socket = socket;
    readers.set(socket, this);
  }

  /**
   * From now on each read goes to `write`, not to the stream's buffer. What the stream holds
   * already (read before, or unshifted) is passed first, in order.
   */
  relayTo(write: RelayWrite): void {
    const s = this.socket;
    if (s === null) throw new Error('own-reads: relayTo before attach');
    for (let c = s.read() as Buffer | null; c !== null; c = s.read() as Buffer | null) this.relay(write, c);
    this.write = write;
  }

  /**
   * `fn` once the relay has passed some bytes (at once if it has): what a 'data' listener would
   * have seen first (src/peer/link.ts tops up its pool then). null: no longer.
   */
  whenRelayed(fn: (() => void) | null): void {
    if (fn !== null && this.relayed) fn();
    else this.onRelayed = fn;
  }

  private relay(write: RelayWrite, chunk: Buffer): boolean {
    const kept = write(chunk);
    if (!this.relayed) {
      this.relayed = true;
      const fn = this.onRelayed;
      this.onRelayed = null;
      fn?.();
    }
    return kept;
  }

  private got(n: number, buf: Uint8Array): boolean {
    const s = this.socket;
    if (s === null) return true; // cannot happen: reads start after attach
    const b = buf as Buffer;
    if (this.write === null) {
      // before the relay: as Node would (a copy of its own, pushed; false pauses the socket)
      return s.push(Buffer.from(b.subarray(0, n)));
    }
    if (b !== this.own) {
      // landed in the shared scratch: copied out
      this.relay(this.write, Buffer.from(b.subarray(0, n)));
      if (n >= BULK) this.own = this.fresh();
      return true;
    }
    const kept = this.relay(this.write, b.subarray(0, n));
    // a queued chunk still refers to this buffer: never read into it again; a short read ends the bulk
    if (n < BULK) this.own = null;
    else if (kept) this.own = this.fresh();
    return true;
  }

  private fresh(): Buffer {
    this.buffers++;
    return Buffer.allocUnsafe(OWN);
  }
}

/** A reader for one socket: pass `onread` to its constructor, then `attach` the socket. */
export function ownReads(): OwnReader {
  return new OwnReader();
}

/** The reader of a socket made with ownReads(), if it is one. */
export function ownReader(s: Readable): OwnReader | undefined {
  return readers.get(s);
}
