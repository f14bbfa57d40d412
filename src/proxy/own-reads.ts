/**
 * NAME        src/proxy/own-reads — relayed sockets that read into buffers the relay reuses
 * SYNOPSIS    const r = ownReads(); const s = new Socket({ fd, onread: r.onread }); r.attach(s);
 *             ... later, src/proxy/splice.ts: ownReader(s)?.relayTo({ write, holds })
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
 *             (`relayTo`), a read of at least BULK bytes moves the socket to a buffer of its own
 *             (OWN bytes): the reads of one turn of the event loop land in it one after the other
 *             and go out in one write at the end of the turn (Dovecot's pop3 writes 4 KiB at a
 *             time: written read by read, each became a TLS record of its own on the link). The
 *             buffer is used again from its start once the destination is done with all of it
 *             (a socket: nothing left queued; a TLS socket: nothing queued before the write, as
 *             node:tls encrypts a chunk into a buffer of its own while write() runs), else the next
 *             reads go on past what it holds, and a new buffer is taken when it is full. A short read (a reply, the end of a message) goes out
 *             at once with what is pending, and the buffer is given back to the garbage collector,
 *             so an idle relayed session holds none. What lands in the shared scratch is copied
 *             before the callback returns: nothing keeps a reference to it.
 * SECURITY    Bytes are passed as they are, in order; a part of a buffer is read into again only
 *             once the destination is done with it, so no bytes are overwritten before they
 *             are sent, and every buffer belongs to one socket (the shared scratch itself is never
 *             handed to a write, only copies of it), so no session's bytes reach another.
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
/** the size of that buffer */
export const OWN = 128 * 1024;
/** a read is given at least this much room (two TLS records; a plain socket reads up to what it is given) */
export const ROOM = 32 * 1024;

/** every read of a socket without a buffer of its own lands here, and is copied out before the callback returns */
const scratch = Buffer.allocUnsafe(ROOM);

/** The relay's side of a socket: where its chunks go. */
export interface RelayTo {
  /** send `chunk` on; true: the destination is done with its bytes and every chunk's before it */
  write(chunk: Buffer): boolean;
  /** the destination may still read bytes of a chunk it was given */
  holds(): boolean;
}

const readers = new WeakMap<Readable, OwnReader>();

export class OwnReader {
  private socket: Socket | null = null;
  /** the socket's own buffer while its reads are bulk, else null (reads land in the scratch) */
  private own: Buffer | null = null;
  /** the part of `own` given to the next read */
  private given: Buffer | null = null;
  /** own[base, used): read, not yet written (one write at the end of the event loop's turn) */
  private base = 0;
  private used = 0;
  private flushing = false;
  /** the last write left the destination done with every chunk */
  private done = true;
  private to: RelayTo | null = null;
  /** some bytes went to `write` already */
  private relayed = false;
  /** called once, at the first bytes relayed */
  private onRelayed: (() => void) | null = null;
  /** buffers of its own this socket has had (tests: reused, not one per read) */
  buffers = 0;
  readonly onread: OnRead = {
    buffer: () => this.next(),
    callback: (n, buf) => this.got(n, buf),
  };
  private readonly flushLater = (): void => {
    this.flushing = false;
    this.flush();
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
  relayTo(to: RelayTo): void {
    const s = this.socket;
    if (s === null) throw new Error('own-reads: relayTo before attach');
    for (let c = s.read() as Buffer | null; c !== null; c = s.read() as Buffer | null) this.relay(to, c);
    this.to = to;
  }

  /**
   * `fn` once the relay has passed some bytes (at once if it has): what a 'data' listener would
   * have seen first (src/peer/link.ts tops up its pool then). null: no longer.
   */
  whenRelayed(fn: (() => void) | null): void {
    if (fn !== null && this.relayed) fn();
    else this.onRelayed = fn;
  }

  /** Write what was read and not written yet (the relay calls it at the source's end). */
  flush(): void {
    if (this.own === null || this.to === null || this.used === this.base) return;
    this.relay(this.to, this.own.subarray(this.base, this.used));
    // (the next read's place was given already: only next() may go back to the start)
    this.base = this.used;
  }

  private relay(to: RelayTo, chunk: Buffer): void {
    this.done = to.write(chunk);
    if (!this.relayed) {
      this.relayed = true;
      const fn = this.onRelayed;
      this.onRelayed = null;
      fn?.();
    }
  }

  /** Where the next read goes: the rest of the socket's own buffer while bulk, else the scratch. */
  private next(): Buffer {
    if (this.own === null) return (this.given = scratch);
    if (OWN - this.used < ROOM) this.flush();
    // all written, and the destination is done with all of it: from the start again
    if (this.used === this.base && (this.done || this.to?.holds() !== true)) this.base = this.used = 0;
    else if (OWN - this.used < ROOM) this.own = this.fresh(); // the destination still holds part of it: a new one
    return (this.given = this.own.subarray(this.used));
  }

  private got(n: number, buf: Uint8Array): boolean {
    const s = this.socket;
    if (s === null) return true; // cannot happen: reads start after attach
    const b = buf as Buffer;
    if (this.to === null) {
      // before the relay: as Node would (a copy of its own, pushed; false pauses the socket)
      return s.push(Buffer.from(b.subarray(0, n)));
    }
    if (b !== this.given || this.own === null) {
      // landed in the shared scratch: copied out at once
      this.relay(this.to, Buffer.from(b.subarray(0, n)));
      if (n >= BULK) this.own = this.fresh();
      return true;
    }
    this.used += n;
    if (n >= BULK) {
      // bulk: written with whatever else this turn of the event loop reads
      if (!this.flushing) {
        this.flushing = true;
        setImmediate(this.flushLater);
      }
      return true;
    }
    // a short read (a reply, the end of a message): out now, and the buffer is given up
    this.flush();
    this.own = null;
    this.base = this.used = 0;
    return true;
  }

  private fresh(): Buffer {
    this.buffers++;
    this.base = this.used = 0;
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
