/**
 * NAME        src/peer/listener — the `peer` listener of `pigeon serve`: receive hand-offs
 * SYNOPSIS    pigeon.yaml: listen: ["peer=10.0.0.3:4190"]   (peer.advertise when behind NAT)
 * DESCRIPTION TLS 1.3 only, with this node's peer.cert/peer.key (never the client-facing tls.cert);
 *             the client must present a host certificate issued by the cluster CA
 *             (node:tls checks chain and dates), and the node it names must be registered,
 *             enabled, with that certificate's fingerprint (NodeDirectory.check, from the cached
 *             registry: no database read per link). A link that resumes a TLS 1.3 session of an
 *             earlier full handshake (peer.resume_s, src/peer/link.ts) presents no certificate:
 *             the one that handshake verified comes with the session and is checked the same way
 *             (OpenSSL restores the verification result with it: a certificate that failed the
 *             chain check stays unauthorized; a session without a certificate counts as verified,
 *             and is refused for having none). A link refused for its certificate is closed
 *             before node:tls writes the session tickets OpenSSL made for it.
 *             Then one hand-off (src/peer/protocol.ts),
 *             within peer.handoff_timeout_s, checked for mac, freshness, replay, addressee,
 *             sender, hop count and home node. Who is trusted is the trust module's decision
 *             (peer.trust, certs/trust.ts; default `registry`). What an accepted hand-off becomes
 *             is the caller's (`pigeon serve` wires it, src/commands/proxy.ts): for imap/pop3 the
 *             proxy starts its local backend from what was received — no authentication, no user
 *             lookup — (src/proxy/received.ts), the listener answers {"ok":true} when it runs, and
 *             the relay takes the link; for a delivery the delivery driver runs this node's
 *             mailstore (src/delivery/receive.ts) and the listener answers only after the message
 *             is durably stored (file fsync, rename, directory fsync). Moves stay here
 *             (src/peer/move.ts).
 *             Every refresh of the registry re-checks the open links: a node disabled or removed
 *             loses its links at once.
 * DIAGNOSTICS Log lines `peer: Refused link from NODE (rip=…): reason`, `peer: Refused hand-off
 *             from NODE: code: text`, `peer(user): Login: from=NODE, rip=…, session=…`.
 */
import { createServer, type Server, type TLSSocket } from 'node:tls';
import { constants, type X509Certificate } from 'node:crypto';
import type { Instance, Listener } from '../instance.js';
import type { Logger } from '../log.js';
import type { MailUser } from '../mailuser.js';
import type { UserRecord } from '../store.js';
import type { Effective } from '../resolve.js';
import type { ResolvedUser } from '../modules.js';
import type { DeliveryResult } from '../delivery/types.js';
import type { PeerContext } from './context.js';
import { certNodeName, certOutOfDate } from '../../certs/verify.js';
import { peerHandoffsReceived, peerHandshakes, peerLinksRefused } from '../metrics.js';
import { unmapIp } from '../ip.js';
import { HOP_LIMIT, HANDOFF_MAX_BYTES, CLOCK_SKEW_MS, NonceCache, openHandOff, readLine, replyLine, exactBytes, fromWireUser, fromWireConfig, type HandOff } from './protocol.js';
import { isAppError } from '../errors.js';
import { PEER_TLS_HANDSHAKE_MS } from '../limits.js';

interface Link {
  readonly sock: TLSSocket;
  readonly node: string;
  readonly fingerprint: string;
  readonly certificate: X509Certificate;
}

/** An IMAP/POP3 session another node handed over; the proxy runs it (src/proxy/received.ts). */
export interface ReceivedSession {
  readonly sock: TLSSocket;
  readonly protocol: 'imap' | 'pop3';
  readonly user: ResolvedUser;
  /** the client as the sending node saw it */
  readonly client: { readonly rip: string; readonly rport: number; readonly lip: string; readonly lport: number; readonly tls: boolean };
  readonly session: string;
  readonly tag: string | null;
  /** the sending node */
  readonly from: string;
  /** the backend runs: the sending node is told, and the link carries the session from now on */
  accept(): void;
  /** the session cannot start here: the sending node is told why, the link closes */
  refuse(code: string, text: string): void;
}

/** A message another node hands over for one of this node's users (src/delivery/receive.ts stores it). */
export interface ReceivedDelivery {
  readonly from: string;
  readonly session: string;
  readonly rcpt: string;
  readonly sender: string;
  readonly detail: string | null;
  readonly original: string | null;
  readonly mailbox: string | null;
  readonly user: UserRecord;
  readonly config: Effective;
  /** the message: exactly its announced size, read from the link */
  readonly body: AsyncIterable<Buffer>;
}

/** What `pigeon serve` does with an accepted hand-off. */
export interface PeerHandlers {
  session(s: ReceivedSession): Promise<void>;
  /** the answer goes back to the sending node, which acknowledges the mail only for a 2.x.x; a throw drops the link (it defers) */
  delivery(d: ReceivedDelivery): Promise<DeliveryResult>;
}

/** What the listener reads from the daemon at each use (a reload swaps instance and log). */
export interface PeerListenerEnv {
  readonly instance: Instance;
  readonly log: Logger;
  readonly mailUser: MailUser;
}

/** The hand-off checks that do not need the TLS session (mac is checked by openHandOff). */
export function admissible(h: HandOff, me: string, sender: string, nonces: NonceCache, mailRoot: string, now = Date.now()): { code: string; text: string } | null {
  if (h.from !== sender) return { code: 'sender', text: `hand-off claims to come from ${h.from} but the certificate is ${sender}'s` };
  if (h.to !== me) return { code: 'addressee', text: `hand-off is addressed to node ${h.to}, this is ${me}` };
  if (h.hops < 1 || h.hops > HOP_LIMIT) return { code: 'hops', text: `hop count ${h.hops} outside 1..${HOP_LIMIT} (a forwarding loop?)` };
  if (Math.abs(now - h.ts) > CLOCK_SKEW_MS) return { code: 'stale', text: `hand-off timestamp is ${Math.round((now - h.ts) / 1000)}s off (clock skew over ${CLOCK_SKEW_MS / 1000}s, or a replay)` };
  if (!nonces.admit(h.nonce, now)) return { code: 'replay', text: 'hand-off nonce already used' };
  if (h.kind === 'move-out' || h.kind === 'move-in') {
    const mv = h.move;
    if (!mv) return { code: 'malformed', text: 'move without move fields' };
    if (h.kind === 'move-out' && mv.from !== me) return { code: 'not-home', text: `move-out is for node ${mv.from}, this is ${me}` };
    if (h.kind === 'move-in' && (mv.to !== me || mv.from !== sender)) return { code: 'addressee', text: `move-in of ${h.user.address} from ${mv.from} to ${mv.to} does not match this link (${sender} → ${me})` };
    if (mv.pass === 1 && h.user.movingTo !== mv.to) return { code: 'not-moving', text: `user ${h.user.address} is not marked as moving to ${mv.to}` };
    return null;
  }
  const a = h.user.allocation;
  if (a !== null && (!a.path.startsWith(`${mailRoot}/`) || (a.node !== undefined && a.node !== me))) {
    return { code: 'allocation', text: `mailbox ${a.path} of ${h.user.address} is not in this node's mail root ${mailRoot}` };
  }
  if (h.user.home !== me) return { code: 'not-home', text: `user ${h.user.address} does not live on this node (home ${h.user.home ?? 'none'})` };
  if (h.user.state !== 'active') return { code: 'disabled', text: `user ${h.user.address} is disabled` };
  if (h.user.movingTo !== null) return { code: 'moving', text: `user ${h.user.address} is being moved to ${h.user.movingTo}` };
  if ((h.kind === 'deliver') !== (h.deliver !== null)) return { code: 'malformed', text: 'delivery fields do not match the kind' };
  return null;
}

export function peerListener(l: Listener, env: PeerListenerEnv, peer: PeerContext, handlers: PeerHandlers): Server | null {
  if (l.protocol !== 'peer') return null;
  const creds = peer.credentials();
  const me = env.instance.config.node;
  const nonces = new NonceCache();
  const links = new Set<Link>();
  const log = (level: 'info' | 'warn' | 'error', prefix: string, msg: string, fields?: Record<string, string | number | boolean | null>): void =>
    env.log.log(level, prefix, msg, fields);

  peer.nodes.onRefresh(() => {
    for (const k of links) {
      void peer.trust.check(peer.nodes, { name: k.node, fingerprint: k.fingerprint, certificate: k.certificate }).then(
        (chk) => {
          if (chk.ok || !links.has(k)) return;
          log('warn', 'peer', `Closing link from ${k.node}: ${chk.reason}`);
          k.sock.destroy();
          links.delete(k);
        },
        () => undefined, // the registry cannot be read now: the link stays until a refresh says otherwise
      );
    }
  });

  const server = createServer({
    ca: creds.ca,
    cert: creds.cert,
    key: creds.key,
    requestCert: true,
    // checked in handle() before a byte is read, so the refusal can be logged with its reason
    rejectUnauthorized: false,
    minVersion: 'TLSv1.3',
    maxVersion: 'TLSv1.3',
    handshakeTimeout: PEER_TLS_HANDSHAKE_MS,
    // TLS 1.3 session tickets (src/peer/link.ts, Resumption): valid peer.resume_s, under node:tls'
    // random ticket key, which node:cluster gives every worker of this serve (the first worker's
    // server data, kept by the primary: a ticket resumes at any worker; test/peer-resume.test.ts);
    // a resumed link carries the certificate its full handshake presented, and handle() checks it
    // like any other. peer.resume_s 0: no stateless tickets (and no session cache here), so every
    // link is a full handshake
    ...(peer.resumeMs > 0 ? { sessionTimeout: Math.ceil(peer.resumeMs / 1000) } : { secureOptions: constants.SSL_OP_NO_TICKET }),
  });
  server.on('tlsClientError', (e: Error, s: TLSSocket) => {
    peerLinksRefused.inc({ reason: 'tls' });
    log('warn', 'peer', `Refused link (TLS: ${e.message.split('\n')[0] ?? ''}):`, { rip: unmapIp(s.remoteAddress) });
  });
  server.on('secureConnection', (sock: TLSSocket) => {
    sock.on('error', () => undefined);
    sock.setNoDelay(true);
    void handle(sock).catch((e: unknown) => {
      log('error', 'peer', `link failed: ${e instanceof Error ? e.message : String(e)}`);
      sock.destroy();
    });
  });

  const refuse = (sock: TLSSocket, code: string, text: string): void => {
    sock.end(replyLine({ ok: false, code, text }));
    setTimeout(() => sock.destroy(), 1000).unref();
  };

  async function handle(sock: TLSSocket): Promise<void> {
    const rip = unmapIp(sock.remoteAddress);
    if (!sock.authorized) {
      peerLinksRefused.inc({ reason: 'certificate' });
      log('warn', 'peer', `Refused link (certificate: ${String(sock.authorizationError ?? 'not verified')}):`, { rip });
      sock.destroy();
      return;
    }
    const x = sock.getPeerX509Certificate();
    if (!x) {
      log('warn', 'peer', 'Refused link (no client certificate):', { rip });
      sock.destroy();
      return;
    }
    const name = certNodeName(x);
    // a resumed session carries its full handshake's verification, dates included: they are checked again
    const outOfDate = sock.isSessionReused() ? certOutOfDate(x) : null;
    if (outOfDate !== null) {
      peerLinksRefused.inc({ reason: 'certificate' });
      log('warn', 'peer', `Refused link (certificate: ${outOfDate}):`, { rip });
      sock.destroy();
      return;
    }
    let chk;
    try {
      chk = await peer.trust.check(peer.nodes, { name, fingerprint: x.fingerprint256, certificate: x });
    } catch (e) {
      chk = { ok: false as const, reason: `node registry unavailable: ${e instanceof Error ? e.message : String(e)}` };
    }
    if (!chk.ok) {
      peerLinksRefused.inc({ reason: 'registry' });
      log('warn', 'peer', `Refused link from ${name}: ${chk.reason}:`, { rip });
      refuse(sock, 'refused', chk.reason);
      return;
    }
    peerHandshakes.inc({ side: 'accepted', kind: sock.isSessionReused() ? 'resumed' : 'full' });
    const link: Link = { sock, node: name, fingerprint: x.fingerprint256, certificate: x };
    links.add(link);
    sock.once('close', () => links.delete(link));
    let line: Buffer;
    try {
      line = await readLine(sock, HANDOFF_MAX_BYTES, peer.handoffTimeoutMs);
    } catch (e) {
      if (isAppError(e) && e.code === 'PEER_UNUSED') {
        env.log.log('debug', 'peer', `Link from ${name} closed unused:`, { rip });
        sock.destroy();
        return;
      }
      peerHandoffsReceived.inc({ kind: 'unknown', result: 'incomplete' });
      log('warn', 'peer', `Hand-off from ${name} failed: ${(e as Error).message}:`, { rip });
      sock.destroy();
      return;
    }
    const o = openHandOff(sock, line);
    const bad = o.ok ? admissible(o.handOff, me, name, nonces, env.instance.mailRoot) : { code: o.code, text: o.text };
    if (!o.ok || bad) {
      const b = bad ?? { code: '?', text: '?' };
      peerHandoffsReceived.inc({ kind: o.ok ? o.handOff.kind : 'unknown', result: b.code });
      log('warn', 'peer', `Refused hand-off from ${name}: ${b.code}: ${b.text}:`, { rip, ...(o.ok ? { user: o.handOff.user.address, session: o.handOff.session } : {}) });
      refuse(sock, b.code, b.text);
      return;
    }
    const h = o.handOff;
    peerHandoffsReceived.inc({ kind: h.kind, result: 'accepted' });
    if (h.kind === 'deliver') await receiveDelivery(sock, h, name);
    else if (h.kind === 'move-in' || h.kind === 'move-out') {
      const m = await import('./move.js');
      log('info', `peer(${h.user.address})`, `${h.kind} pass ${h.move?.pass ?? '?'} requested by ${name} (${h.move?.from ?? '?'} → ${h.move?.to ?? '?'})`);
      if (h.kind === 'move-in') await m.receiveMailbox(sock, h, env.instance.mailRoot, env.mailUser);
      else await m.serveMoveOut(sock, h, peer, env.instance.mailRoot);
    } else await receiveSession(sock, h, name);
  }

  async function receiveSession(sock: TLSSocket, h: HandOff, from: string): Promise<void> {
    const c = h.client ?? { rip: '', rport: 0, lip: '', lport: 0, tls: false };
    await handlers.session({
      sock,
      protocol: h.kind === 'pop3' ? 'pop3' : 'imap',
      user: { user: fromWireUser(h.user), config: fromWireConfig(h.config) },
      client: c,
      session: h.session,
      tag: h.tag,
      from,
      accept: () => sock.write(replyLine({ ok: true })),
      refuse: (code, text) => refuse(sock, code, text),
    });
  }

  async function receiveDelivery(sock: TLSSocket, h: HandOff, from: string): Promise<void> {
    const d = h.deliver;
    if (!d) return;
    sock.write(replyLine({ ok: true }));
    let result: DeliveryResult;
    try {
      result = await handlers.delivery({
        from,
        session: h.session,
        rcpt: d.rcpt,
        sender: d.sender,
        detail: d.detail,
        original: d.original,
        mailbox: d.mailbox,
        user: fromWireUser(h.user),
        config: fromWireConfig(h.config),
        body: exactBytes(sock[Symbol.asyncIterator]() as AsyncIterator<Buffer>, sock, d.size, peer.handoffTimeoutMs * 6),
      });
    } catch (e) {
      log('warn', `lmtp(${h.user.address})`, `Delivery from ${from} aborted: ${e instanceof Error ? e.message : String(e)}`, { session: h.session });
      sock.destroy();
      return;
    }
    sock.end(replyLine({ dsn: result.dsn, text: result.text }));
  }

  return server;
}
