/**
 * NAME        src/delivery/lmtp — LMTP server (RFC 2033) on smtp-server's LMTP mode
 * SYNOPSIS    pigeon lmtp --forker stdio|inetd|postfix   (one session on a forker's transport)
 *             createLmtpServer({instance, store, logger, remote}) + handleLmtpSocket / listenLmtp  (serve)
 * DESCRIPTION Each RCPT is resolved at once (one configuration read; unknown → 550 5.1.1 in reply
 *             to RCPT). After DATA the delivery driver (src/delivery/driver.ts, shared with
 *             `pigeon deliver` and the peer receiver) spools the message once and delivers it per
 *             recipient; the server then sends exactly one reply per accepted RCPT, in RCPT
 *             order — RFC 2033 §4.2.
 *             Work-around (smtp-server 3.21.6): a repeated RCPT replaces the earlier entry of
 *             envelope.rcptTo, so the library would send one reply fewer than the client counts.
 *             We keep our own list of accepted RCPTs per transaction and always hand onData an
 *             array with one entry per accepted RCPT (a duplicate gets the same reply as the
 *             first; the message is stored once). No `size` option is given to the library for
 *             the same reason (its oversize path counts envelope.rcptTo); mailstore.max_size is
 *             applied per recipient instead.
 *             Replies carry our enhanced status codes (`452 4.2.2 Mailbox full`): the library's
 *             automatic code is suppressed for texts that already begin with one. The replies of
 *             one turn of the event loop are written together (one segment for a pipelined
 *             MAIL/RCPT/DATA, as Postfix's lmtp client sends them). The greeting goes out at
 *             once: the library's 100 ms early-talker delay (an anti-spam heuristic of public
 *             SMTP) is left out, as Dovecot's lmtp has none; input sent before it is served in
 *             order.
 * DIAGNOSTICS Spool failure (disk full, ...) → 451/452 for every recipient; a bug → 451 4.3.0.
 * SECURITY    No AUTH, no STARTTLS: listen on loopback or a unix socket only.
 */
import { LMTP_IDLE_MS } from '../limits.js';
import net from 'node:net';
import type { Duplex } from 'node:stream';
import { unlinkSync, existsSync, statSync } from 'node:fs';
import { hostname } from 'node:os';
import { SMTPServer, type SMTPServerSession, type SMTPServerDataStream } from 'smtp-server';
import { SMTPConnection } from 'smtp-server/lib/smtp-connection';
import type { Instance } from '../instance.js';
import type { Store } from '../store.js';
import type { Logger } from '../log.js';
import type { NodeDirectory } from '../nodes.js';
import { resolveRecipient, deliverMessage, type Accepted } from './driver.js';
import { makeDeliveryEnv } from './env.js';
import { smtpCodeOf, statusLine } from './outcome.js';
import type { DeliveryResult, RemoteStore } from './types.js';

export interface LmtpServerOptions {
  readonly instance: Instance;
  readonly store: Store;
  readonly logger: Logger;
  /** host name in the greeting; default os.hostname() */
  readonly name?: string;
  /** idle timeout of a session in ms; default 300 000 */
  readonly socketTimeout?: number;
  /** recipients homed on other nodes (the peer link); null: refused with 4.3.0 */
  readonly remote: RemoteStore | null;
  /** the cluster's nodes (mailstore.placement fewest) */
  readonly nodes?: NodeDirectory;
}

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
  const env = makeDeliveryEnv(o.instance, o.store, o.logger, 'lmtp', o.remote, o.nodes);
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
    socketTimeout: o.socketTimeout ?? LMTP_IDLE_MS,
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
    const results = await deliverMessage(env, stream as AsyncIterable<Buffer>, { sender: t.sender, original: null, mailbox: null, recipients: t.rcpts });
    stream.resume(); // a spool that failed half-way: let the library read the rest and answer
    return t.rcpts.map((r) => {
      const res = results.get(r.rcpt) ?? { dsn: '4.3.0', text: 'internal error' };
      return res.dsn.startsWith('2') ? statusLine(res) : smtpError(res);
    });
  }

  // server.connect as the library's, but without the early-talker delay of its init(): it holds
  // the greeting back 100 ms on every connection to catch spammers that talk first, a public-SMTP
  // heuristic; LMTP comes from our own MTA over loopback or a unix socket (Dovecot's lmtp greets at
  // once). Each new connection of Postfix's lmtp client waited those 100 ms, a benchmark round
  // once per connection. A client that talks before the greeting is then served in order.
  // Our texts carry their own enhanced status code: the library must not add a second one; the
  // replies of one turn of the event loop leave in one write (see coalesce).
  server.connect = (socket, opts) => {
    const conn = new SMTPConnection(server, socket, opts);
    server.connections.add(conn);
    conn.on('error', (err: Error) => server._onError(err));
    conn.on('connect', (data: Parameters<SMTPServer['_onClientConnect']>[0]) => server._onClientConnect(data));
    const c = conn as unknown as { send: (code: number, data: unknown, ctx?: unknown) => void };
    const send = c.send.bind(conn);
    const flushLater = coalesce(socket);
    c.send = (code, data, ctx) => {
      flushLater();
      send(code, data, typeof data === 'string' && ENHANCED.test(data) ? false : ctx);
    };
    conn._setListeners(() => conn.connectionReady());
  };
  return server;
}

/**
 * Replies written in one turn of the event loop leave together: the first one corks the socket and
 * the check phase of that turn uncorks it. A pipelined MAIL, RCPT, DATA is then answered with one
 * segment (250, 250, 354), as Dovecot's corked output does, instead of three, each of which would
 * wake the client. Nothing waits longer than the turn that wrote it; end() flushes a corked socket.
 */
function coalesce(socket: Duplex): () => void {
  let corked = false;
  const uncork = (): void => {
    corked = false;
    socket.uncork();
  };
  return () => {
    if (corked) return;
    corked = true;
    socket.cork();
    setImmediate(uncork);
  };
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
