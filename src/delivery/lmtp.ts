/**
 * NAME        src/delivery/lmtp — LMTP server (RFC 2033) on smtp-server's LMTP mode
 * SYNOPSIS    pigeon lmtp --forker stdio|inetd        (one session on stdin/stdout or fd 0)
 *             createLmtpServer({instance, store, logger}) + handleLmtpSocket / listenLmtp  (serve)
 * DESCRIPTION Each RCPT is resolved at once (one configuration read; unknown → 550 5.1.1 in reply
 *             to RCPT). After DATA the message is spooled once and delivered per recipient through
 *             the same pipeline as `pigeon deliver`; the server then sends exactly one reply per
 *             accepted RCPT, in RCPT order — RFC 2033 §4.2.
 *             Work-around (smtp-server 3.21.6): a repeated RCPT replaces the earlier entry of
 *             envelope.rcptTo, so the library would send one reply fewer than the client counts.
 *             We keep our own list of accepted RCPTs per transaction and always hand onData an
 *             array with one entry per accepted RCPT (a duplicate gets the same reply as the
 *             first; the message is stored once). No `size` option is given to the library for
 *             the same reason (its oversize path counts envelope.rcptTo); mailstore.max_size is
 *             applied per recipient instead.
 *             Replies carry our enhanced status codes (`452 4.2.2 Mailbox full`): the library's
 *             automatic code is suppressed for texts that already begin with one.
 * DIAGNOSTICS Spool failure (disk full, ...) → 451/452 for every recipient; a bug → 451 4.3.0.
 * SECURITY    No AUTH, no STARTTLS: listen on loopback or a unix socket only.
 */
import net from 'node:net';
import { Duplex } from 'node:stream';
import { fstatSync, unlinkSync, existsSync, statSync } from 'node:fs';
import { hostname } from 'node:os';
import { SMTPServer, type SMTPServerSession, type SMTPServerDataStream } from 'smtp-server';
import type { Instance } from '../instance.js';
import type { Store } from '../store.js';
import type { Logger } from '../log.js';
import { spool } from './message.js';
import { resolveRecipient, deliverRecipient, type Resolved } from './pipeline.js';
import { spoolLimit } from './mailstore.js';
import { makeDeliveryEnv } from './env.js';
import type { PeerContext } from '../peer/context.js';
import { fsFailure } from './mda.js';
import { smtpCodeOf, statusLine } from './outcome.js';
import type { DeliveryResult } from './types.js';

export interface LmtpServerOptions {
  readonly instance: Instance;
  readonly store: Store;
  readonly logger: Logger;
  /** host name in the greeting; default os.hostname() */
  readonly name?: string;
  /** idle timeout of a session in ms; default 300 000 */
  readonly socketTimeout?: number;
  /** peer links of the daemon (shared registry); default: one of the server's own */
  readonly peer?: PeerContext;
}

type Accepted = Extract<Resolved, { ok: true }>;

interface Transaction {
  sender: string;
  rcpts: Accepted[];
}

const ENHANCED = /^[245]\.\d{1,3}\.\d{1,3} /;

function smtpError(r: DeliveryResult): Error & { responseCode: number } {
  return Object.assign(new Error(statusLine(r)), { responseCode: smtpCodeOf(r) });
}

/** An LMTP server; connect sockets to it with handleLmtpSocket, or listen with listenLmtp. */
export function createLmtpServer(o: LmtpServerOptions): SMTPServer {
  const env = makeDeliveryEnv(o.instance, o.store, o.logger, 'lmtp', o.peer);
  const tx = new WeakMap<object, Transaction>();
  const txOf = (s: SMTPServerSession): Transaction => {
    let t = tx.get(s.envelope);
    if (!t) {
      t = { sender: '', rcpts: [] };
      tx.set(s.envelope, t);
    }
    return t;
  };
  const server = new SMTPServer({
    lmtp: true,
    name: o.name ?? (hostname() || 'localhost'),
    banner: 'PigeonDeliver LMTP ready',
    disabledCommands: ['AUTH', 'STARTTLS'],
    hideSTARTTLS: true,
    hideENHANCEDSTATUSCODES: false,
    authOptional: true,
    disableReverseLookup: true,
    logger: false,
    socketTimeout: o.socketTimeout ?? 300_000,
    onMailFrom(address, session, cb) {
      // smtp-server decodes the command as UTF-8, with U+FFFD for bytes that are not: such a
      // sender is not the address the client sent (forwards and vacation replies would use it)
      if (address.address.includes('\ufffd')) {
        cb(smtpError({ dsn: '5.1.7', text: 'bad sender address: not UTF-8' }));
        return;
      }
      txOf(session).sender = address.address;
      cb();
    },
    onRcptTo(address, session, cb) {
      resolveRecipient(o.store, address.address).then(
        (r) => {
          if (!r.ok) {
            env.log('info', 'rejected', { user: r.rcpt, status: statusLine(r.result) });
            cb(smtpError(r.result));
            return;
          }
          txOf(session).rcpts.push(r);
          cb();
        },
        (e: unknown) => cb(smtpError({ dsn: '4.3.0', text: `configuration lookup failed: ${e instanceof Error ? e.message : 'internal error'}` })),
      );
    },
    onData(stream: SMTPServerDataStream, session, cb) {
      const t = txOf(session);
      void deliverAll(stream, t)
        .then((replies) => cb(null, replies as never))
        .catch((e: unknown) => {
          env.log('error', 'internal error', { error: e instanceof Error ? e.message : String(e) });
          const r = smtpError({ dsn: '4.3.0', text: 'internal error; try again later' });
          cb(null, t.rcpts.map(() => r) as never);
        });
    },
  });

  async function deliverAll(stream: SMTPServerDataStream, t: Transaction): Promise<(string | Error)[]> {
    let message;
    try {
      message = await spool(stream as AsyncIterable<Buffer>, { limit: spoolLimit(t.rcpts.map((r) => r.config['mailstore.max_size']?.value)) });
    } catch (e) {
      stream.resume();
      const r = smtpError(fsFailure(e, 'spool'));
      return t.rcpts.map(() => r);
    }
    try {
      const results = new Map<string, DeliveryResult>();
      for (const r of t.rcpts) {
        if (results.has(r.rcpt)) continue; // duplicate RCPT: one copy, same reply
        const res = await deliverRecipient({ resolved: r, sender: t.sender, original: null, mailbox: null, message }, env);
        if (!res.dsn.startsWith('2')) env.log(res.dsn.startsWith('4') ? 'warn' : 'info', res.dsn.startsWith('4') ? 'deferred' : 'rejected', { user: r.rcpt, status: statusLine(res) });
        results.set(r.rcpt, res);
      }
      return t.rcpts.map((r) => {
        const res = results.get(r.rcpt) ?? { dsn: '4.3.0', text: 'internal error' };
        return res.dsn.startsWith('2') ? statusLine(res) : smtpError(res);
      });
    } finally {
      await message.close();
    }
  }

  // our texts carry their own enhanced status code: keep the library from adding a second one
  const connect = server.connect.bind(server);
  server.connect = (socket, opts) => {
    const before = new Set(server.connections);
    connect(socket, opts);
    for (const c of server.connections) {
      if (before.has(c)) continue;
      const conn = c as unknown as { send: (code: number, data: unknown, ctx?: unknown) => void };
      const send = conn.send.bind(conn);
      conn.send = (code, data, ctx) => send(code, data, typeof data === 'string' && ENHANCED.test(data) ? false : ctx);
    }
  };
  return server;
}

/** Serve one already-connected socket (TCP, unix, or a stdio duplex). */
export function handleLmtpSocket(server: SMTPServer, socket: net.Socket | Duplex, peer?: { remoteAddress: string; remotePort: number }): void {
  server.connect(socket as net.Socket, peer ? { remoteAddress: peer.remoteAddress, remotePort: peer.remotePort } : null);
}

/** Listen for LMTP on HOST:PORT or a unix socket path (a stale socket file is replaced). */
export function listenLmtp(server: SMTPServer, where: { host: string; port: number; path: string | null }): Promise<net.Server> {
  const srv = net.createServer((s) => handleLmtpSocket(server, s));
  return new Promise((resolve, reject) => {
    srv.once('error', reject);
    if (where.path !== null) {
      if (existsSync(where.path) && statSync(where.path).isSocket()) unlinkSync(where.path);
      srv.listen(where.path, () => resolve(srv));
    } else srv.listen(where.port, where.host, () => resolve(srv));
  });
}

/** stdin/stdout as one duplex, for `--forker stdio` when fd 0 is a pipe, not a socket. */
class StdioDuplex extends Duplex {
  private timer: NodeJS.Timeout | null = null;
  private timeoutMs = 0;
  readonly remoteAddress = '127.0.0.1';
  readonly remotePort = 0;
  readonly localAddress = '127.0.0.1';
  readonly localPort = 0;
  /** smtp-server writes only to a socket whose readyState is 'open' */
  get readyState(): string {
    return this.destroyed ? 'closed' : 'open';
  }
  constructor() {
    super({ allowHalfOpen: false });
    process.stdin.on('data', (d: Buffer) => {
      this.touch();
      if (!this.push(d)) process.stdin.pause();
    });
    process.stdin.on('end', () => this.push(null));
    process.stdin.on('error', (e) => this.destroy(e));
    process.stdout.on('error', (e) => this.destroy(e));
  }
  override _read(): void {
    process.stdin.resume();
  }
  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (e?: Error | null) => void): void {
    this.touch();
    process.stdout.write(chunk, (e) => cb(e ?? null));
  }
  override _final(cb: (e?: Error | null) => void): void {
    process.stdout.end(() => cb());
  }
  override _destroy(e: Error | null, cb: (e: Error | null) => void): void {
    if (this.timer) clearTimeout(this.timer);
    process.stdin.destroy();
    cb(e);
  }
  private touch(): void {
    if (this.timeoutMs <= 0) return;
    if (this.timer) clearTimeout(this.timer);
    this.timer = setTimeout(() => this.emit('timeout'), this.timeoutMs);
  }
  setTimeout(ms: number, cb?: () => void): this {
    this.timeoutMs = ms;
    if (cb) this.once('timeout', cb);
    this.touch();
    return this;
  }
  setNoDelay(): this {
    return this;
  }
  setKeepAlive(): this {
    return this;
  }
}

/**
 * The session's socket for `pigeon lmtp --forker stdio|inetd`: fd 0 itself when it is a socket
 * that is also fd 1 (inetd, Postfix spawn), else stdin + stdout as one duplex (pipes, or the two
 * socketpairs a parent process such as a test or swaks --pipe gives).
 */
export function stdioSocket(forker: 'stdio' | 'inetd'): net.Socket | Duplex {
  const s0 = fstatSync(0);
  const s1 = fstatSync(1);
  const shared = s0.isSocket() && s0.ino === s1.ino && s0.dev === s1.dev;
  if (forker === 'inetd' && !shared) throw new Error('--forker inetd: fd 0 is not the connection socket (use --forker stdio)');
  if (shared) return new net.Socket({ fd: 0, readable: true, writable: true });
  return new StdioDuplex();
}
