/**
 * NAME        src/proxy/conn — one client connection, as the sessions see it
 * DESCRIPTION Wraps whatever a forker produced (TCP socket, TLS socket, stdin/stdout pair) behind
 *             read()/write()/startTls()/detach(). Reading is pull-based: the session asks for the
 *             next chunk only when the current command has settled, so a flooding client is
 *             paused by TCP backpressure. startTls() drops every byte received before the
 *             handshake (STARTTLS injection) and continues on the TLS socket; a handshake that
 *             fails, is refused (ALPN) or misses its deadline destroys the connection.
 */
import { TLSSocket } from 'node:tls';
import type { ClientTls } from '../client-tls.js';
import type { Duplex } from 'node:stream';
import { canonicalIp, parseIp } from '../ip.js';

export interface Peer {
  readonly rip: string;
  readonly rport: number;
  readonly lip: string;
  readonly lport: number;
}

/**
 * A socket's address as the logs and limits use it: parsed (src/ip.ts), an IPv4-mapped IPv6
 * address as IPv4 (`::ffff:127.0.0.1` and `::ffff:7f00:1` alike), IPv6 in its canonical form;
 * '' when there is none (a unix socket or a pipe).
 */
export function unmap(ip: string | undefined): string {
  if (!ip) return '';
  return canonicalIp(ip);
}

/**
 * Is the client on this host? A loopback address (127.0.0.0/8, ::1 however written, either of them
 * IPv4-mapped), or no address at all (a unix socket or a pipe). Text that is no address is not.
 */
export function isLoopback(ip: string): boolean {
  if (ip === '') return true;
  return parseIp(ip)?.range() === 'loopback';
}

export class ClientConn {
  private stream: Duplex;
  private output: Duplex | NodeJS.WritableStream;
  private chunks: Buffer[] = [];
  private ended = false;
  private waiter: (() => void) | null = null;
  private readonly onData = (c: Buffer): void => {
    this.bytesIn += c.length;
    this.chunks.push(c);
    this.stream.pause();
    this.wake();
  };
  private readonly onEnd = (): void => {
    this.ended = true;
    this.wake();
  };
  secure: boolean;
  bytesIn = 0;
  bytesOut = 0;
  readonly peer: Peer;
  /** the client is local (loopback address or a stdio pipe): plaintext auth allowed by default */
  readonly local: boolean;
  /** STARTTLS is possible (a socket, not a pipe) */
  readonly canTls: boolean;

  constructor(opts: { input: Duplex; output?: NodeJS.WritableStream; peer: Peer; secure: boolean; local: boolean; canTls: boolean }) {
    this.stream = opts.input;
    this.output = opts.output ?? opts.input;
    this.peer = opts.peer;
    this.secure = opts.secure;
    this.local = opts.local;
    this.canTls = opts.canTls;
    this.attach();
  }

  private attach(): void {
    this.stream.on('data', this.onData);
    this.stream.on('end', this.onEnd);
    this.stream.on('close', this.onEnd);
    this.stream.on('error', this.onEnd);
    this.stream.pause();
  }

  private unattach(): void {
    this.stream.off('data', this.onData);
    this.stream.off('end', this.onEnd);
    this.stream.off('close', this.onEnd);
    this.stream.off('error', this.onEnd);
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }

  /** Next chunk from the client, or null at EOF. Resolves early with null when `signal` fires. */
  async read(): Promise<Buffer | null> {
    for (;;) {
      const c = this.chunks.shift();
      if (c) return c;
      if (this.ended) return null;
      await new Promise<void>((r) => {
        this.waiter = r;
        this.stream.resume();
      });
    }
  }

  /** Abort a pending read (timeouts): the reader sees EOF. */
  abort(): void {
    this.ended = true;
    this.wake();
  }

  write(data: string | Buffer): void {
    const b = typeof data === 'string' ? Buffer.from(data, 'utf8') : data;
    this.bytesOut += b.length;
    if (!this.closed()) this.output.write(b);
  }

  closed(): boolean {
    const s = this.output as { destroyed?: boolean; writableEnded?: boolean };
    return s.destroyed === true || s.writableEnded === true;
  }

  /**
   * Upgrade to TLS. Bytes received before the handshake are dropped here (and by the caller's
   * framer). `alpn` chooses the protocol a client offering ALPN must offer (src/proxy/tls.ts);
   * the handshake must end within `timeoutMs`, else the connection is destroyed.
   */
  async startTls(server: ClientTls, opts: { timeoutMs: number; alpn: (arg: { servername: string; protocols: string[] }) => string | undefined }): Promise<void> {
    this.unattach();
    this.chunks = [];
    const raw = this.stream;
    const tls = new TLSSocket(raw, { isServer: true, secureContext: server.secureContext, SNICallback: server.SNICallback, minVersion: 'TLSv1.2', ALPNCallback: opts.alpn } as ConstructorParameters<typeof TLSSocket>[1]);
    try {
      await new Promise<void>((resolve, reject) => {
        const t = setTimeout(() => reject(new Error(`no handshake within ${Math.round(opts.timeoutMs / 1000)} s`)), opts.timeoutMs);
        tls.once('secure', () => {
          clearTimeout(t);
          resolve();
        });
        tls.once('error', (e) => {
          clearTimeout(t);
          reject(e);
        });
        tls.once('close', () => {
          clearTimeout(t);
          reject(new Error('connection closed'));
        });
      });
    } catch (e) {
      tls.on('error', () => {});
      tls.destroy();
      raw.destroy();
      this.ended = true;
      throw e;
    }
    this.stream = tls;
    this.output = tls;
    this.secure = true;
    this.attach();
  }

  /** Stop reading; return the stream (and any chunks read but not consumed) for relaying. */
  detach(): { input: Duplex; output: NodeJS.WritableStream; pending: Buffer[] } {
    this.unattach();
    const pending = this.chunks;
    this.chunks = [];
    // bytes the stream already buffered internally while paused
    for (let c: unknown = this.stream.read(); c !== null; c = this.stream.read()) {
      if (Buffer.isBuffer(c)) pending.push(c);
    }
    return { input: this.stream, output: this.output, pending };
  }

  /** Put bytes back in front of the input and read again (a hand-off that did not happen). */
  reattach(input: Buffer): void {
    if (input.length > 0) this.chunks.unshift(input);
    this.unattach();
    this.attach();
  }

  /**
   * The plain socket itself, when the client is on plain TCP (not TLS, not a pipe): a backend can
   * then be given the connection with no copy in between.
   */
  handoffSocket(): Duplex | null {
    if (this.secure || !this.canTls) return null;
    const s = this.stream as Duplex & { _handle?: { fd?: number } };
    return typeof s._handle?.fd === 'number' && s._handle.fd >= 0 ? s : null;
  }

  /** Underlying stream (for handing a plain socket's fd to a backend). */
  get raw(): Duplex {
    return this.stream;
  }

  end(final?: string): void {
    if (final !== undefined) this.write(final);
    const o = this.output as NodeJS.WritableStream & { destroy?: () => void };
    if (!this.closed()) o.end();
    if (this.stream !== this.output) this.stream.destroy();
    setTimeout(() => o.destroy?.(), 1000).unref();
  }
}
