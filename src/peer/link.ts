/**
 * NAME        src/peer/link — the sending side of a peer link: connect, verify, hand off
 * DESCRIPTION `openLink` connects to a registered node's peer address with mutual TLS 1.3: this
 *             node's host certificate as the client certificate, only the cluster CA trusted, the
 *             server certificate must name the target node and match its registered fingerprint.
 *             `sendHandOff` seals the hand-off to that TLS session and waits for the one-line
 *             answer. Connection attempts: up to PEER_CONNECT_ATTEMPTS, 1 s apart, only while the
 *             target refuses or resets (a restarting node); each within peer.connect_timeout_s.
 *             The daemon keeps a pool of spare, verified links per node in use (peer.pool_size,
 *             peer.pool_idle_s; described below), so most sessions skip the TLS handshake.
 *             Resumption (peer.resume_s, below): a link may resume the TLS 1.3 session of an
 *             earlier full handshake with the same node instead of exchanging certificates again.
 * DIAGNOSTICS AppError PEER_UNAVAILABLE (not registered, disabled, no address, down, timeout),
 *             PEER_REFUSED (the target refused the hand-off: code and text from its answer).
 */
import { connect, TLSSocket, type ConnectionOptions } from 'node:tls';
import type { X509Certificate } from 'node:crypto';
import { cryptoModule } from '../builtins.js';
import { certNodeName } from '../../certs/verify.js';
import type { PeerContext } from './context.js';
import { AppError, isAppError } from '../errors.js';
import { peerHandoffsSent, peerHandshakes, peerLinksOpened, peerLinksPooled } from '../metrics.js';
import { ownReader, ownReads, type OnRead } from '../proxy/own-reads.js';
import { PEER_PROTOCOL, HANDOFF_MAX_BYTES, newNonce, sealHandOff, readLine, type HandOff, type Reply } from './protocol.js';

export const PEER_CONNECT_ATTEMPTS = 3;

/** Split `host:port` / `[v6]:port`. */
export function splitHostPort(a: string): { host: string; port: number } {
  const m = /^\[([^\]]+)\]:(\d+)$/.exec(a) ?? /^([^:]+):(\d+)$/.exec(a);
  if (!m || m[1] === undefined || m[2] === undefined) throw new AppError('PEER_UNAVAILABLE', `bad peer address ${JSON.stringify(a)}`);
  return { host: m[1], port: Number(m[2]) };
}

/** A connected, handshaken link and the certificate it presented (checked for the target's name). */
interface Dialed {
  readonly sock: TLSSocket;
  cert: X509Certificate | undefined;
  /** the link resumed the offered ticket's session: no certificate was exchanged, the ticket's stands */
  resumed: boolean;
  /** session tickets that came before the certificate was checked (kept only once it is) */
  readonly early: Buffer[];
  /** where later tickets go once it is */
  onTicket: ((session: Buffer) => void) | null;
}

/*
 * Resumption (peer.resume_s, ctx.resumeMs; 0: off). A full handshake costs each node ≈ 2-3 ms of
 * CPU (OpenSSL 3.0 decodes every certificate's public key through its provider machinery, about a
 * fifth of it; the signatures and the chain check are the rest): with one link per session, the
 * largest part of what a login through the peer link costs both nodes. After a full handshake the
 * other node sends TLS 1.3 session tickets; the newest one, with the certificate that handshake
 * presented and this node verified (chain to the cluster CA, the target's name, its registered
 * fingerprint), is kept per node for ctx.resumeMs and offered by the next links, which then skip
 * the certificates and signatures and still make a fresh ECDHE key exchange (psk_dhe_ke: forward
 * secrecy stays). Only the node that issued the ticket can decrypt it (node:tls' random key, which
 * node:cluster shares among the workers of one `pigeon serve`), so a resumed link reaches that
 * same running node; the registry is still asked about its certificate on every
 * link (verifyPeer), as the other node asks about ours (src/peer/listener.ts), so a node disabled,
 * removed or re-keyed loses resumed links as it loses full ones. A ticket the other node no
 * longer accepts (restarted, expired) gives an ordinary full handshake,
 * checked as always. One ticket serves several links (RFC 8446 advises against that only because
 * an observer could link the connections; these are two known nodes).
 */
interface Ticket {
  readonly session: Buffer;
  readonly cert: X509Certificate;
  /** offered until then: ctx.resumeMs after it came, and never past the certificate's validTo
   * (a full handshake then, where node:tls refuses an expired certificate) */
  readonly until: number;
}
const tickets = new WeakMap<PeerContext, Map<string, Ticket>>();

function ticketFor(ctx: PeerContext, target: string): Ticket | undefined {
  if (ctx.resumeMs <= 0) return undefined;
  const t = tickets.get(ctx)?.get(target);
  return t && Date.now() < t.until ? t : undefined;
}

function keepTicket(ctx: PeerContext, target: string, session: Buffer, cert: X509Certificate): void {
  let m = tickets.get(ctx);
  if (!m) {
    m = new Map();
    tickets.set(ctx, m);
  }
  m.set(target, { session, cert, until: Math.min(Date.now() + ctx.resumeMs, Date.parse(cert.validTo)) });
}

/** Forget the ticket of `target` (its node no longer trusted, or its ticket refused). */
function dropTicket(ctx: PeerContext, target: string): void {
  tickets.get(ctx)?.delete(target);
}

/**
 * After every full handshake node:tls builds the server's whole chain as a legacy object
 * (`getPeerCertificate(true)`, ≈ 0.4 ms on the event loop) only to pass it to
 * checkServerIdentity. Ours reads the X509Certificate instead (kept for verifyPeer: one parse per
 * link), so the socket answers that one call with an empty object while it handshakes; the
 * prototype's method is back once the link is up. Nothing is checked less: the chain against the
 * cluster CA (rejectUnauthorized), the node's name here, its registered fingerprint in dial().
 */
const NO_LEGACY_CERT = { configurable: true, value: (): object => ({}) };

/**
 * node:tls' connect() decodes an offered session twice, in the TLSSocket constructor and again
 * in connect() itself (lib/_tls_wrap.js, Node 20), and each decode parses the certificate the
 * session holds (OpenSSL 3 decodes its public key through its provider machinery): 0.2-0.3 ms of
 * every resumed link's ≈ 0.7 ms on the dialing node's event loop (--cpu-prof of 1,000 links).
 * Given to the socket once, after connect() returned and before its TCP connection is up (the
 * handshake starts on 'connect'), it is decoded once. A runtime whose TLSSocket has no
 * setSession gets the session as connect()'s option, as before.
 */
const setSession = (TLSSocket.prototype as unknown as { setSession?: (this: TLSSocket, session: Buffer) => void }).setSession;

function connectOnce(ctx: PeerContext, target: string, host: string, port: number, ticket: Ticket | undefined): Promise<Dialed> {
  return new Promise((resolve, reject) => {
    // the link carries the other node's answers, a large FETCH or RETR among them: its reads land
    // in a buffer the relay reuses (src/proxy/own-reads.ts)
    const reads = ownReads();
    let cert: X509Certificate | undefined;
    const early: Buffer[] = [];
    const options: ConnectionOptions & { readonly onread: OnRead } = {
      onread: reads.onread,
      host,
      port,
      secureContext: ctx.clientContext(),
      // a full handshake (both ends present and check their certificates), or the resumption of
      // one with this node (see Resumption above; node:tls calls checkServerIdentity only for a
      // full one)
      ...(setSession === undefined && ticket ? { session: ticket.session } : {}),
      minVersion: 'TLSv1.3',
      maxVersion: 'TLSv1.3',
      // the certificate must name the node we mean to reach, whatever address it answers on
      checkServerIdentity: () => {
        cert = sock.getPeerX509Certificate();
        const name = cert ? certNodeName(cert) : '(none)';
        return name === target ? undefined : new Error(`peer at ${host}:${port} presented node ${name}, expected ${target}`);
      },
    };
    const sock = connect(options);
    if (setSession !== undefined && ticket) setSession.call(sock, ticket.session);
    Object.defineProperty(sock, 'getPeerCertificate', NO_LEGACY_CERT);
    reads.attach(sock);
    const t = setTimeout(() => {
      sock.destroy();
      reject(new AppError('PEER_UNAVAILABLE', `no TLS link to ${target} at ${host}:${port} within ${ctx.connectTimeoutMs / 1000}s`));
    }, ctx.connectTimeoutMs);
    if (ctx.resumeMs > 0) {
      sock.on('session', (session: Buffer) => {
        if (dialed.onTicket) dialed.onTicket(session);
        else if (early.length < 4) early.push(session);
      });
    }
    const dialed: Dialed = { sock, cert: undefined, resumed: false, early, onTicket: null };
    sock.once('secureConnect', () => {
      clearTimeout(t);
      delete (sock as { getPeerCertificate?: unknown }).getPeerCertificate;
      dialed.resumed = ticket !== undefined && sock.isSessionReused();
      dialed.cert = dialed.resumed && ticket ? ticket.cert : cert;
      resolve(dialed);
    });
    sock.once('error', (e) => {
      clearTimeout(t);
      sock.destroy();
      reject(e);
    });
  });
}

/** Is the certificate on this link the registered one of `target`? Refusal reason, or null. */
async function verifyPeer(ctx: PeerContext, target: string, x: X509Certificate | undefined): Promise<string | null> {
  if (!x) return 'no certificate';
  if (certNodeName(x) !== target) return `it names node ${certNodeName(x)}`;
  const chk = await ctx.trust.check(ctx.nodes, { name: target, fingerprint: x.fingerprint256, certificate: x });
  return chk.ok ? null : chk.reason;
}

// the certificate each link was verified with (Node stops returning it once a TLS 1.3 session ticket arrives)
const certs = new WeakMap<TLSSocket, X509Certificate>();

/** A fresh, verified link: registry lookup, connect (with retries), certificate check. */
async function dial(ctx: PeerContext, target: string): Promise<TLSSocket> {
  const n = await ctx.nodes.get(target);
  if (!n) throw new AppError('PEER_UNAVAILABLE', `node ${target} is not registered`);
  if (n.state !== 'active') throw new AppError('PEER_UNAVAILABLE', `node ${target} is ${n.state}`);
  if (n.peerAddress === null) throw new AppError('PEER_UNAVAILABLE', `node ${target} has no peer address (is it running "pigeon serve" with a peer= listener?)`);
  const { host, port } = splitHostPort(n.peerAddress);
  ctx.clientContext(); // this node's certificate and key: a clear error when they cannot be read
  let last: Error = new Error('no attempt');
  for (let i = 0; i < PEER_CONNECT_ATTEMPTS; i++) {
    if (i > 0) await new Promise((r) => setTimeout(r, 1000));
    let dialed: Dialed;
    try {
      dialed = await connectOnce(ctx, target, host, port, ticketFor(ctx, target));
    } catch (e) {
      last = e as Error;
      const code = (e as NodeJS.ErrnoException).code ?? '';
      if (code === 'ECONNREFUSED' || code === 'ECONNRESET') continue;
      break;
    }
    const { sock, cert: x } = dialed;
    const bad = await verifyPeer(ctx, target, x);
    if (bad !== null || !x) {
      sock.destroy();
      dropTicket(ctx, target);
      throw new AppError('PEER_UNAVAILABLE', `node ${target} at ${n.peerAddress} presented a certificate that is not its registered one: ${bad ?? 'none'}`);
    }
    sock.setNoDelay(true);
    certs.set(sock, x);
    peerHandshakes.inc({ side: 'dialed', kind: dialed.resumed ? 'resumed' : 'full' });
    // tickets of a full handshake whose certificate passed (a resumed link gets none from OpenSSL 3.0)
    if (ctx.resumeMs > 0 && !dialed.resumed) {
      const keep = (session: Buffer): void => keepTicket(ctx, target, session, x);
      for (const s of dialed.early) keep(s);
      dialed.early.length = 0;
      dialed.onTicket = keep;
    }
    return sock;
  }
  const code = (last as NodeJS.ErrnoException).code;
  throw new AppError('PEER_UNAVAILABLE', `node ${target} at ${n.peerAddress} is unreachable: ${typeof code === 'string' && /^E[A-Z]+$/.test(code) ? code : last.message}`);
}

/*
 * The pool (daemon only, ctx.prewarm): spare, already verified links per node, so a session to
 * that node skips the TLS handshake. Each link still carries exactly one hand-off, sealed to its
 * own TLS session: a spare carries nothing until taken. After a hand-off to a node was answered
 * and the other node's first bytes after the answer came back (refillAfter), the pool of that node
 * is topped up in the background: one link for a session that found a spare,
 * two for one that had to dial (a burst grows the pool), never past peer.pool_size spares plus
 * dials under way; a hand-off that failed opens none (a node that is down is not dialed again). Idle nodes keep no spares: a spare unused for ctx.poolIdleMs is closed and not replaced.
 * A spare is watched while it waits: any byte from the other node (a refusal) or its close
 * removes it at once; it is re-checked against the registry when taken, and every registry
 * refresh closes the spares of a node that is no longer trusted (disabled, removed, re-keyed).
 * A spare that dies unnoticed between the take and the hand-off (the other node closed it a moment
 * before) is replaced by one fresh link (sendHandOff), so it never costs the session.
 */
interface Spare {
  readonly sock: TLSSocket;
  readonly timer: NodeJS.Timeout;
  /** stops the idle watch: the link's events are the taker's from then on */
  readonly unwatch: () => void;
}
interface Pool {
  /** newest last: the newest is taken first, the oldest expire */
  readonly idle: Spare[];
  opening: number;
}
const pools = new WeakMap<PeerContext, Map<string, Pool>>();

function poolsOf(ctx: PeerContext): Map<string, Pool> {
  let m = pools.get(ctx);
  if (!m) {
    const made = new Map<string, Pool>();
    pools.set(ctx, made);
    ctx.nodes.onRefresh(() => void recheckPools(ctx, made));
    m = made;
  }
  return m;
}

function poolOf(ctx: PeerContext, target: string): Pool {
  const m = poolsOf(ctx);
  let p = m.get(target);
  if (!p) {
    p = { idle: [], opening: 0 };
    m.set(target, p);
  }
  return p;
}

/** Take `sp` out of its pool (it was taken, it expired, it died, or its node lost our trust). */
function unpool(target: string, p: Pool, sp: Spare): boolean {
  const i = p.idle.indexOf(sp);
  if (i < 0) return false;
  p.idle.splice(i, 1);
  clearTimeout(sp.timer);
  sp.unwatch();
  peerLinksPooled.set({ to: target }, p.idle.length);
  return true;
}

/** Close the spares of nodes the registry no longer trusts (node disable/remove, a revoked fingerprint). */
async function recheckPools(ctx: PeerContext, m: Map<string, Pool>): Promise<void> {
  for (const [target, t] of tickets.get(ctx) ?? []) {
    let bad: string | null;
    try {
      bad = await verifyPeer(ctx, target, t.cert);
    } catch {
      bad = null;
    }
    if (bad !== null) dropTicket(ctx, target);
  }
  for (const [target, p] of m) {
    for (const sp of [...p.idle]) {
      let bad: string | null;
      try {
        bad = await verifyPeer(ctx, target, certs.get(sp.sock));
      } catch {
        bad = null; // the registry cannot be read now: the spare stays until a refresh says otherwise
      }
      if (bad !== null && unpool(target, p, sp)) sp.sock.destroy();
    }
  }
}

/** Has this spare link said nothing, and is it still open both ways? */
function isFresh(sock: TLSSocket): boolean {
  return !sock.destroyed && sock.writable && !sock.writableEnded && sock.readable && !sock.readableEnded && sock.readableLength === 0;
}

async function takeSpare(ctx: PeerContext, target: string): Promise<TLSSocket | null> {
  const p = poolsOf(ctx).get(target);
  for (let sp = p?.idle.at(-1); p && sp; sp = p.idle.at(-1)) {
    unpool(target, p, sp);
    sp.sock.ref();
    // the registry may have changed since the spare was opened: check again
    let bad: string | null;
    try {
      bad = isFresh(sp.sock) ? await verifyPeer(ctx, target, certs.get(sp.sock)) : 'closed';
    } catch (e) {
      bad = String(e);
    }
    if (bad === null && isFresh(sp.sock)) return sp.sock;
    sp.sock.destroy();
  }
  return null;
}

/** A dialed spare joins the pool of `target`, watched until taken or closed. */
function addSpare(ctx: PeerContext, target: string, p: Pool, sock: TLSSocket): void {
  sock.unref();
  const drop = (): void => {
    if (unpool(target, p, spare)) sock.destroy();
  };
  // an idle link says nothing: a byte (a refusal), its end or an error means it is of no use
  const onData = (): void => drop();
  sock.on('data', onData);
  sock.on('end', drop);
  sock.on('close', drop);
  sock.on('error', drop);
  sock.on('error', () => undefined); // stays after the take: an error between take and hand-off is the hand-off's to report
  const timer = setTimeout(drop, ctx.poolIdleMs);
  timer.unref();
  const spare: Spare = {
    sock,
    timer,
    unwatch: () => {
      sock.off('data', onData);
      sock.off('end', drop);
      sock.off('close', drop);
      sock.off('error', drop);
      sock.pause();
    },
  };
  p.idle.push(spare);
  peerLinksPooled.set({ to: target }, p.idle.length);
}

/** Top up the pool of `target` by up to `n` links, in the background. */
function refill(ctx: PeerContext, target: string, n: number): void {
  if (!ctx.prewarm || ctx.poolSize <= 0) return;
  const p = poolOf(ctx, target);
  const room = Math.min(n, ctx.poolSize - p.idle.length - p.opening);
  for (let i = 0; i < room; i++) {
    p.opening++;
    dial(ctx, target).then(
      (sock) => {
        p.opening--;
        if (p.idle.length >= ctx.poolSize) sock.destroy();
        else addSpare(ctx, target, p, sock);
      },
      () => {
        p.opening--; // the node is down or refused us: the next session finds out for itself
      },
    );
  }
}

/** A verified TLS link to `target`'s peer listener (a spare one when there is one). */
export async function openLink(ctx: PeerContext, target: string, opts: { readonly pooled: boolean } = { pooled: true }): Promise<{ sock: TLSSocket; pooled: boolean }> {
  const spare = opts.pooled ? await takeSpare(ctx, target) : null;
  const sock = spare ?? (await dial(ctx, target));
  peerLinksOpened.inc({ how: spare ? 'pooled' : 'dialed' });
  return { sock, pooled: spare !== null };
}

/**
 * After a hand-off was answered: top up the pool once the other node's first bytes after the
 * answer have been read from the link (a session's: its backend's login answer, which the home
 * node may send a few ms after `ok`, while its Dovecot starts; a delivery's: its status), so they
 * are on their way. A handshake costs both nodes CPU; begun while the hand-off waited for its
 * answer, or between `ok` and the backend's first words, it competed with the home node starting
 * the session's backend and relaying its answer. Armed when the link's reader starts (the relay's
 * pipe resumes it): a listener added before that would take bytes nobody else sees.
 */
function refillAfter(ctx: PeerContext, target: string, pooled: boolean, sock: TLSSocket): void {
  if (!ctx.prewarm || ctx.poolSize <= 0) return;
  const go = (): void => {
    sock.off('close', drop);
    setImmediate(() => refill(ctx, target, pooled ? 1 : 2));
  };
  // the links this node dials read into the relay's buffers: no 'data' events once relayed
  const reader = ownReader(sock);
  const arm = (): void => {
    if (reader) reader.whenRelayed(go);
    else sock.once('data', go);
  };
  // a link that closes first (the session never started) opens none
  const drop = (): void => {
    sock.off('resume', arm);
    if (reader) reader.whenRelayed(null);
    else sock.off('data', go);
  };
  sock.once('resume', arm);
  sock.once('close', drop);
}

export type HandOffRequest = Omit<HandOff, 'proto' | 'from' | 'to' | 'nonce' | 'ts'>;

/**
 * Open a link to `target` (a spare when the pool has one), send the hand-off, wait for its answer
 * (up to `answerMs`). Resolves with the socket after {"ok":true}; the caller owns it from then on.
 */
export async function sendHandOff(ctx: PeerContext, target: string, req: HandOffRequest, answerMs: number): Promise<TLSSocket> {
  const unanswered = (e: unknown): unknown => {
    if (!isAppError(e) || e.code !== 'PEER_UNUSED') return e;
    peerHandoffsSent.inc({ kind: req.kind, result: 'no-answer' });
    return new AppError('PEER_UNAVAILABLE', e.message);
  };
  const first = await openLink(ctx, target);
  try {
    const sock = await handOffOn(ctx, target, first.sock, req, answerMs);
    refillAfter(ctx, target, first.pooled, sock);
    return sock;
  } catch (e) {
    // a spare the other node closed just before we took it (its idle limit, a restart): the
    // hand-off never reached it, so one fresh link carries it instead
    if (!first.pooled || !isAppError(e) || e.code !== 'PEER_UNUSED') throw unanswered(e);
  }
  const fresh = await openLink(ctx, target, { pooled: false });
  try {
    const sock = await handOffOn(ctx, target, fresh.sock, req, answerMs);
    refillAfter(ctx, target, false, sock);
    return sock;
  } catch (e) {
    throw unanswered(e);
  }
}

/**
 * Send the hand-off on `sock`, wait for its answer (up to `answerMs`). Resolves with the socket
 * after {"ok":true}. PEER_UNUSED: the link was closed before a byte of an answer (the hand-off may
 * not have reached the other node); PEER_UNAVAILABLE / PEER_REFUSED otherwise.
 */
async function handOffOn(ctx: PeerContext, target: string, sock: TLSSocket, req: HandOffRequest, answerMs: number): Promise<TLSSocket> {
  const h: HandOff = { proto: PEER_PROTOCOL, from: ctx.node, to: target, nonce: newNonce(), ts: Date.now(), ...req };
  sock.write(sealHandOff(sock, h));
  let line: Buffer;
  try {
    line = await readLine(sock, HANDOFF_MAX_BYTES, answerMs);
  } catch (e) {
    sock.destroy();
    if (isAppError(e) && e.code === 'PEER_UNUSED') throw new AppError('PEER_UNUSED', `node ${target} closed the link before answering the hand-off`);
    peerHandoffsSent.inc({ kind: req.kind, result: 'no-answer' });
    throw new AppError('PEER_UNAVAILABLE', `node ${target} did not answer the hand-off: ${(e as Error).message}`);
  }
  let r: Reply;
  try {
    r = JSON.parse(line.toString('utf8')) as Reply;
  } catch {
    sock.destroy();
    throw new AppError('PEER_UNAVAILABLE', `node ${target} answered the hand-off with garbage`);
  }
  if (r.ok !== true) {
    sock.destroy();
    peerHandoffsSent.inc({ kind: req.kind, result: 'refused' });
    throw new AppError('PEER_REFUSED', `node ${target} refused the hand-off (${String(r.code ?? '?')}): ${String(r.text ?? '')}`);
  }
  peerHandoffsSent.inc({ kind: req.kind, result: 'ok' });
  return sock;
}

/** A session id for links that do not come from a client session (deliveries). */
export function linkSessionId(): string {
  return cryptoModule().randomBytes(12).toString('base64');
}
