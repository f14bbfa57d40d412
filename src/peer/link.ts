/**
 * NAME        src/peer/link — the sending side of a peer link: connect, verify, hand off
 * DESCRIPTION `openLink` connects to a registered node's peer address with mutual TLS 1.3: this
 *             node's host certificate as the client certificate, only the cluster CA trusted, the
 *             server certificate must name the target node and match its registered fingerprint.
 *             `sendHandOff` seals the hand-off to that TLS session and waits for the one-line
 *             answer. Connection attempts: up to PEER_CONNECT_ATTEMPTS, 1 s apart, only while the
 *             target refuses or resets (a restarting node); each within peer.connect_timeout_s.
 * DIAGNOSTICS AppError PEER_UNAVAILABLE (not registered, disabled, no address, down, timeout),
 *             PEER_REFUSED (the target refused the hand-off: code and text from its answer).
 */
import { connect, type TLSSocket } from 'node:tls';
import type { X509Certificate } from 'node:crypto';
import { randomBytes } from 'node:crypto';
import { certNodeName } from '../../certs/verify.js';
import type { PeerContext } from './context.js';
import { AppError } from '../errors.js';
import { peerHandoffsSent } from '../metrics.js';
import { PEER_PROTOCOL, HANDOFF_MAX_BYTES, newNonce, sealHandOff, readLine, type HandOff, type Reply } from './protocol.js';

export const PEER_CONNECT_ATTEMPTS = 3;

/** Split `host:port` / `[v6]:port`. */
export function splitHostPort(a: string): { host: string; port: number } {
  const m = /^\[([^\]]+)\]:(\d+)$/.exec(a) ?? /^([^:]+):(\d+)$/.exec(a);
  if (!m || m[1] === undefined || m[2] === undefined) throw new AppError('PEER_UNAVAILABLE', `bad peer address ${JSON.stringify(a)}`);
  return { host: m[1], port: Number(m[2]) };
}

function connectOnce(ctx: PeerContext, target: string, host: string, port: number): Promise<TLSSocket> {
  return new Promise((resolve, reject) => {
    const sock = connect({
      host,
      port,
      secureContext: ctx.clientContext(),
      // every link is a full handshake: both ends see and check the other's certificate (no resumption)
      session: undefined,
      minVersion: 'TLSv1.3',
      maxVersion: 'TLSv1.3',
      // the certificate must name the node we mean to reach, whatever address it answers on
      checkServerIdentity: (_h, cert) => (cert.subject.CN === target ? undefined : new Error(`peer at ${host}:${port} presented node ${cert.subject.CN}, expected ${target}`)),
    });
    const t = setTimeout(() => {
      sock.destroy();
      reject(new AppError('PEER_UNAVAILABLE', `no TLS link to ${target} at ${host}:${port} within ${ctx.connectTimeoutMs / 1000}s`));
    }, ctx.connectTimeoutMs);
    sock.once('secureConnect', () => {
      clearTimeout(t);
      resolve(sock);
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
    let sock: TLSSocket;
    try {
      sock = await connectOnce(ctx, target, host, port);
    } catch (e) {
      last = e as Error;
      const code = (e as NodeJS.ErrnoException).code ?? '';
      if (code === 'ECONNREFUSED' || code === 'ECONNRESET') continue;
      break;
    }
    const x = sock.getPeerX509Certificate();
    const bad = await verifyPeer(ctx, target, x);
    if (bad !== null || !x) {
      sock.destroy();
      throw new AppError('PEER_UNAVAILABLE', `node ${target} at ${n.peerAddress} presented a certificate that is not its registered one: ${bad ?? 'none'}`);
    }
    sock.setNoDelay(true);
    certs.set(sock, x);
    return sock;
  }
  const code = (last as NodeJS.ErrnoException).code;
  throw new AppError('PEER_UNAVAILABLE', `node ${target} at ${n.peerAddress} is unreachable: ${typeof code === 'string' && /^E[A-Z]+$/.test(code) ? code : last.message}`);
}

/*
 * Spare links (daemon only, ctx.prewarm): after a link to a node is used, one more is opened in
 * the background, so the next session to that node skips the TLS handshake (~5 ms with RSA keys).
 * A spare carries nothing until taken (each link still carries exactly one hand-off, sealed to its
 * own TLS session); it is re-checked against the registry when taken, and dropped unused after
 * half the peer's hand-off timeout (the receiving node closes idle links at that timeout). Idle
 * nodes keep no spares: a spare is only replaced when one is used.
 */
interface Spare {
  readonly sock: TLSSocket;
  readonly timer: NodeJS.Timeout;
}
const spares = new WeakMap<PeerContext, Map<string, Spare | 'opening'>>();

function spareMap(ctx: PeerContext): Map<string, Spare | 'opening'> {
  let m = spares.get(ctx);
  if (!m) {
    m = new Map();
    spares.set(ctx, m);
  }
  return m;
}

async function takeSpare(ctx: PeerContext, target: string): Promise<TLSSocket | null> {
  const m = spareMap(ctx);
  const sp = m.get(target);
  if (!sp || sp === 'opening') return null;
  m.delete(target);
  clearTimeout(sp.timer);
  sp.sock.ref();
  // the registry may have changed since the spare was opened: check again
  if (sp.sock.destroyed || !sp.sock.writable || (await verifyPeer(ctx, target, certs.get(sp.sock))) !== null) {
    sp.sock.destroy();
    return null;
  }
  return sp.sock;
}

function prewarm(ctx: PeerContext, target: string): void {
  const m = spareMap(ctx);
  if (!ctx.prewarm || m.has(target)) return;
  m.set(target, 'opening');
  dial(ctx, target).then(
    (sock) => {
      sock.unref();
      sock.on('error', () => undefined);
      const timer = setTimeout(() => {
        if (m.get(target) === spare) m.delete(target);
        sock.destroy();
      }, Math.max(500, ctx.handoffTimeoutMs / 2));
      timer.unref();
      const spare: Spare = { sock, timer };
      sock.once('close', () => {
        if (m.get(target) === spare) m.delete(target);
      });
      m.set(target, spare);
    },
    () => m.delete(target),
  );
}

/** A verified TLS link to `target`'s peer listener (a spare one when there is one). */
export async function openLink(ctx: PeerContext, target: string): Promise<TLSSocket> {
  const sock = (await takeSpare(ctx, target)) ?? (await dial(ctx, target));
  prewarm(ctx, target);
  return sock;
}

export type HandOffRequest = Omit<HandOff, 'proto' | 'from' | 'to' | 'nonce' | 'ts'>;

/**
 * Open a link to `target`, send the hand-off, wait for its answer (up to `answerMs`).
 * Resolves with the socket after {"ok":true}; the caller owns it from then on.
 */
export async function sendHandOff(ctx: PeerContext, target: string, req: HandOffRequest, answerMs: number): Promise<TLSSocket> {
  const sock = await openLink(ctx, target);
  const h: HandOff = { proto: PEER_PROTOCOL, from: ctx.node, to: target, nonce: newNonce(), ts: Date.now(), ...req };
  sock.write(sealHandOff(sock, h));
  let line: Buffer;
  try {
    line = await readLine(sock, HANDOFF_MAX_BYTES, answerMs);
  } catch (e) {
    sock.destroy();
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
  return randomBytes(12).toString('base64');
}
