/**
 * NAME        src/proxy/router — after login: find the mailbox, start its backend, relay bytes
 * DESCRIPTION Reads nothing from the database itself: the caller passes the user and effective
 *             config from the one auth read. Allocation goes through src/allocation.ts, the same
 *             function delivery uses, so a first login creates exactly the mailbox the first mail
 *             would. A mailbox on this node goes to the local backend that `imap.backend` /
 *             `pop3.backend` names; one on another node goes to the remote backend (the peer
 *             link) — both through the same contract (backends/types.ts) and the same relay
 *             (src/proxy/relay.ts). A hand-off (the plain client socket given to the backend
 *             itself) starts only after the backend's start() has put on the wire whatever the
 *             client must see first (backends/types.ts prepareHandoff). Under `pigeon serve`, a
 *             client that cannot be handed off (TLS, or a session received over the peer link) has
 *             its backend started by the spawner on one end of a local socket pair
 *             (src/peer/pair.ts; no fork of the worker) and relayed from the other end like a
 *             backend on pipes (pairedSession). Before a backend starts,
 *             the client's connection takes a user+IP slot (src/proxy/slots.ts;
 *             limits.max_userip_connections), given back when the session ends or does not start.
 *             An `external` backend (upstream) allocates nothing and is the only one given the
 *             client's credentials (RouteOptions.credentials); its server refusing them is
 *             `refused`, which the login layer answers as a wrong password.
 */
import type { ResolvedUser } from '../modules.js';
import type { ProxyEnv } from './env.js';
import type { ClientConn } from './conn.js';
import type { Duplex } from 'node:stream';
import type { Backend, BackendEnd, BackendSession, MailProtocol } from '../../backends/types.js';
import { placeUser } from '../allocation.js';
import { BACKENDS, localBackends, remoteBackend } from '../../backends/registry.js';
import { isAppError } from '../errors.js';
import { trackSession, untrackSession } from './live.js';
import { relay } from './relay.js';
import { dropAhead, slotOf, takeLoginAhead, type Slot } from './slots.js';
import { HANDOFF_MAX_INPUT, RELAY_GRACE_MS } from '../limits.js';
import { sessionPair, type Pair } from '../peer/pair.js';
import { backendStart, sessions } from '../metrics.js';

/** the backend name of each running session (metrics label, `pigeon who`) */
const backendNames = new WeakMap<BackendSession, string>();

export type RouteResult =
  | { ok: true; session: BackendSession; backend: string }
  /**
   * `limit`: the user+IP limit (its maximum) refused the session, already logged; `refused`: an
   * external backend's server refused the credentials (answered as a wrong password); else an
   * internal failure
   */
  | { ok: false; reason: string; limit?: number; refused?: true };

export interface RouteOptions {
  /** false on a node that received the session over a peer link: never forward it again */
  readonly forward: boolean;
  /** epoch ms: a locked database is waited for until then (the login's one busy timeout) */
  readonly deadline?: number;
  /** the client's login bytes: given to an external backend (upstream) only, never logged */
  readonly credentials?: { readonly user: Uint8Array; readonly password: Uint8Array };
}

/**
 * A backend started on the far end of `p` (by the spawner, or by a backend that forks it itself),
 * relayed like one on pipes: its bytes come out of `near`, which ends once every holder of the far
 * end closed it (the backend, and the spawner, which keeps it for the backend's last words). This
 * process's copy is closed at once: the backend's process has its own, and this one is never
 * read (node's spawn and the spawner's stopReading stop a socket they give away from reading), so
 * it would only hold a descriptor. The relay, `pigeon who`/`kick` and the logout line with its
 * byte counts are those of any relayed session.
 */
function pairedSession(p: Pair, s: BackendSession): BackendSession {
  const { near, far } = p;
  far.destroy();
  const closed = new Promise<void>((resolve) => {
    if (near.destroyed) resolve();
    else near.once('close', () => resolve());
  });
  return {
    greeting: Buffer.alloc(0),
    handedOff: false,
    input: near,
    output: near,
    ended: s.ended.then((end) => closed.then(() => end)),
    clientEnded() {
      // the client is gone: the backend sees EOF on its input and leaves; then the pair goes
      if (!near.writableEnded) near.end();
      setTimeout(() => near.destroy(), RELAY_GRACE_MS).unref();
    },
    stop() {
      s.stop();
      near.destroy();
    },
  };
}

function closePair(p: Pair): void {
  p.near.destroy();
  p.far.destroy();
}

function quotaOf(u: ResolvedUser): number {
  const q = u.config['mailstore.quota']?.value;
  return typeof q === 'number' && Number.isFinite(q) && q > 0 ? Math.floor(q) : 0;
}

export async function route(
  env: ProxyEnv,
  protocol: MailProtocol,
  u: ResolvedUser,
  conn: ClientConn,
  sid: string,
  tag: string | null,
  leftover: () => Buffer,
  opts: RouteOptions = { forward: true },
): Promise<RouteResult> {
  // the user+IP slot, if the login asked for it ahead (while its penalty lookup ran)
  const early = opts.forward ? takeLoginAhead(conn, u.user.address) : null;
  if (u.user.movingTo !== null) {
    if (early) dropAhead(conn, early);
    return { ok: false, reason: `mailbox of ${u.user.address} is being moved to node ${u.user.movingTo}; try again in a moment` };
  }
  // sessions per user+IP (limits.max_userip_connections), before any backend starts
  const slot = opts.forward ? slotOf(conn) : null;
  if (slot) {
    const l = await (early ?? slot.login(u.user.address, sid));
    if (!l.ok) {
      const text = `Maximum number of connections from user+IP exceeded (mail_max_userip_connections=${l.max})`;
      env.log.log('info', `${protocol}-login`, `${text}:`, { user: u.user.address, rip: conn.peer.rip, lip: conn.peer.lip, session: sid });
      return { ok: false, reason: text, limit: l.max };
    }
  }
  const t0 = process.hrtime.bigint();
  const r = await startRoute(env, protocol, u, conn, sid, tag, leftover, opts);
  if (!r.ok) slot?.logout();
  else {
    backendStart.observe({ protocol, backend: r.backend }, Number(process.hrtime.bigint() - t0) / 1e9);
    backendNames.set(r.session, r.backend);
    if (slot && r.session.handedOff) slot.handedOff();
    slot?.started(r.backend);
  }
  return r;
}

async function startRoute(
  env: ProxyEnv,
  protocol: MailProtocol,
  u: ResolvedUser,
  conn: ClientConn,
  sid: string,
  tag: string | null,
  leftover: () => Buffer,
  opts: RouteOptions,
): Promise<RouteResult> {
  const name = String(u.config[`${protocol}.backend`]?.value ?? 'dovecot');
  const local = BACKENDS.get(name);
  if (!local || local.serves !== 'local') return { ok: false, reason: `backend ${name} is not available on this node (known: ${localBackends().map((b) => b.name).join(', ')})` };
  if (local.external === true) return startExternal(env, local, protocol, u, conn, sid, tag, opts);
  let placement;
  try {
    placement = await placeUser(
      { store: opts.deadline === undefined ? env.store : env.store.withDeadline(opts.deadline), node: env.instance.config.node, mailRoot: env.instance.mailRoot, mailUser: env.mailUser, nodes: env.nodes },
      u.user,
      u.config,
    );
  } catch (e) {
    return { ok: false, reason: isAppError(e) ? e.message : `allocation failed: ${String(e)}` };
  }
  let backend: Backend = local;
  if (placement.kind === 'remote') {
    if (!opts.forward) return { ok: false, reason: `mailbox of ${u.user.address} is on node ${placement.node}, not here (hand-offs are not forwarded again)` };
    const remote = remoteBackend();
    if (!remote) return { ok: false, reason: `mailbox of ${u.user.address} is on node ${placement.node}, and this node has no remote backend` };
    backend = remote;
  }
  const instance = env.backend(backend);
  let handoff: { socket: Duplex; input: Buffer } | null = null;
  let pair: Pair | null = null;
  const sock = conn.handoffSocket();
  if (sock && env.instance.config.handoff) {
    const { pending } = conn.detach();
    const input = Buffer.concat([leftover(), ...pending]);
    if (input.length <= HANDOFF_MAX_INPUT && instance.acceptsHandoff(protocol, input)) handoff = { socket: sock, input };
    else conn.reattach(input);
  } else if (!sock && placement.kind === 'local' && env.spawner && env.instance.config.handoff && instance.acceptsHandoff(protocol, Buffer.alloc(0))) {
    // a TLS client, or a session received over the peer link: the spawner starts the backend on
    // one end of a local pair, the relay joins the client with the other (src/peer/pair.ts)
    try {
      pair = await sessionPair();
      handoff = { socket: pair.far, input: Buffer.alloc(0) };
    } catch (e) {
      env.log.log('warn', `${protocol}(${u.user.address})`, `No local socket pair (relaying through pipes): ${(e as Error).message}:`, { session: sid });
    }
  }
  const user = placement.kind === 'remote' ? { user: placement.user, config: u.config } : u;
  try {
    const session = await instance.start({
      handoff,
      protocol,
      user,
      address: u.user.address,
      node: placement.kind === 'remote' ? placement.node : env.instance.config.node,
      allocation: placement.kind === 'local' ? placement.allocation : null,
      client: { peer: conn.peer, secure: conn.secure },
      sessionId: sid,
      tag,
      quota: quotaOf(u),
      logLine: backendLogLine(env, `${protocol}(${u.user.address})`),
    });
    if (placement.kind === 'remote') env.log.log('info', `${protocol}(${u.user.address})`, `Handed off to node ${placement.node}:`, { rip: conn.peer.rip, session: sid });
    const name = placement.kind === 'remote' ? `${backend.name}:${placement.node}` : backend.name;
    if (pair !== null && !session.handedOff) closePair(pair); // the backend would not take it: on pipes
    return { ok: true, session: pair !== null && session.handedOff ? pairedSession(pair, session) : session, backend: name };
  } catch (e) {
    if (pair) closePair(pair);
    else if (handoff) conn.reattach(handoff.input);
    return { ok: false, reason: isAppError(e) ? e.message : placement.kind === 'remote' ? `link to node ${placement.node} failed: ${String(e)}` : String(e) };
  }
}

/**
 * A backend whose mailbox is on a server outside PigeonDeliver (upstream): nothing allocated, no
 * node to forward to; it alone gets the client's credentials, and its server may refuse them.
 */
async function startExternal(env: ProxyEnv, backend: Backend, protocol: MailProtocol, u: ResolvedUser, conn: ClientConn, sid: string, tag: string | null, opts: RouteOptions): Promise<RouteResult> {
  try {
    const session = await env.backend(backend).start({
      handoff: null,
      protocol,
      user: u,
      address: u.user.address,
      node: env.instance.config.node,
      allocation: null,
      client: { peer: conn.peer, secure: conn.secure },
      sessionId: sid,
      tag,
      quota: quotaOf(u),
      logLine: backendLogLine(env, `${protocol}(${u.user.address})`),
      ...(opts.credentials !== undefined ? { credentials: opts.credentials } : {}),
    });
    return { ok: true, session, backend: backend.name };
  } catch (e) {
    if (isAppError(e) && e.code === 'AUTH_FAILED') return { ok: false, reason: e.message, refused: true };
    return { ok: false, reason: isAppError(e) ? e.message : String(e) };
  }
}

/**
 * The `pigeon_sessions` labels of a protocol and backend: one shared object per pair, not one per
 * session (a handed-off session keeps its labels for its whole life).
 */
type SessionLabels = { readonly protocol: MailProtocol; readonly backend: string };
const labelSets = new Map<string, SessionLabels>();
function labelsOf(protocol: MailProtocol, backend: string): SessionLabels {
  const k = `${protocol}\0${backend}`;
  let l = labelSets.get(k);
  if (!l) {
    l = { protocol, backend };
    labelSets.set(k, l);
  }
  return l;
}

/** The backend name route() recorded for `s` (once: the entry is not kept for the session's life). */
function takeBackendName(s: BackendSession): string {
  const b = backendNames.get(s) ?? 'unknown';
  backendNames.delete(s);
  return b;
}

/**
 * Relay a routed session to its end, registered in the live-session table, with its log lines.
 * A handed-off session returns at once (HandedOff): the rest of its life is a compact record,
 * not this call's frames.
 */
export async function runSession(env: ProxyEnv, protocol: MailProtocol, address: string, sid: string, conn: ClientConn, s: BackendSession, leftover: Buffer): Promise<void> {
  const labels = labelsOf(protocol, takeBackendName(s));
  if (s.handedOff) {
    HandedOff.supervise(env, labels, address, sid, s, slotOf(conn), conn.peer.rip, s.releasedClient === true ? null : conn.raw);
    return;
  }
  trackSession(address, s);
  sessions.inc(labels);
  // `pigeon kick`: the backend is stopped, which ends the relay (and closes the client's socket)
  let kicked = false;
  slotOf(conn)?.onKick({
    kick: () => {
      kicked = true;
      env.log.log('info', `${protocol}(${address})`, 'Kicked (pigeon kick):', { rip: conn.peer.rip, session: sid });
      s.stop();
    },
  });
  try {
    const res = await relay(conn, s, leftover);
    if (res.end.lost !== undefined && !kicked) env.log.log('warn', `${protocol}(${address})`, `${res.end.lost}:`, { session: sid });
    slotOf(conn)?.close(); // before the logout line: a client that saw it may log in again at once
    const how = kicked ? 'Kicked' : 'Logged out';
    env.log.log('info', `${protocol}(${address})`, res.in < 0 ? `Disconnected: ${how} (socket handed to the backend)` : `Disconnected: ${how} in=${res.in} out=${res.out}`, { session: sid });
  } finally {
    sessions.dec(labels);
    untrackSession(address, s);
    // the user+IP slot and the connection slot end with the session
    slotOf(conn)?.close();
  }
}

/**
 * A handed-off session until its backend ends: all the proxy keeps of it (idle memory) is this
 * one object — what its end, `pigeon who`/`kick`, the user+IP slot and `user move` need: the
 * names for its log lines, its slot, the backend session (how to stop it, when it ended), and the
 * client socket only when the proxy itself may have to say the backend's last words (a backend
 * started without the spawner). No closure: it is its slot's kick target (Slot.onKick), its
 * entry in the live-session table (stop()), and its end is a bound method; nothing of the client
 * connection, the login (its session, user record, settings, credentials) or the socket is
 * reachable from it. The slot is kept past the connection's end (Slot.keep) and freed here,
 * before the logout line (a client that saw it may log in again at once).
 */
class HandedOff {
  private readonly env: ProxyEnv;
  private readonly labels: SessionLabels;
  private readonly address: string;
  private readonly sid: string;
  private readonly session: BackendSession;
  private readonly slot: Slot | null;
  private readonly rip: string;
  private readonly sock: Duplex | null;
  private kicked = false;

  private constructor(env: ProxyEnv, labels: SessionLabels, address: string, sid: string, session: BackendSession, slot: Slot | null, rip: string, sock: Duplex | null) {
    this.env = env;
    this.labels = labels;
    this.address = address;
    this.sid = sid;
    this.session = session;
    this.slot = slot;
    this.rip = rip;
    this.sock = sock;
  }

  static supervise(env: ProxyEnv, labels: SessionLabels, address: string, sid: string, s: BackendSession, slot: Slot | null, rip: string, sock: Duplex | null): void {
    const h = new HandedOff(env, labels, address, sid, s, slot, rip, sock);
    sessions.inc(labels);
    slot?.keep();
    trackSession(address, h);
    slot?.onKick(h);
    void s.ended.then(h.ended.bind(h));
  }

  /** `pigeon user move`, shutdown (src/proxy/live.ts) */
  stop(): void {
    this.session.stop();
  }

  /** `pigeon kick` (the slot) */
  kick(): void {
    this.kicked = true;
    this.env.log.log('info', `${this.labels.protocol}(${this.address})`, 'Kicked (pigeon kick):', { rip: this.rip, session: this.sid });
    this.session.stop();
  }

  private ended(end: BackendEnd): void {
    const who = `${this.labels.protocol}(${this.address})`;
    if (end.lost !== undefined && !this.kicked) this.env.log.log('warn', who, `${end.lost}:`, { session: this.sid });
    const sock = this.sock;
    if (sock) {
      if (end.lastWords !== undefined && !sock.destroyed) sock.end(end.lastWords);
      sock.destroy();
    }
    this.slot?.release();
    this.env.log.log('info', who, `Disconnected: ${this.kicked ? 'Kicked' : 'Logged out'} (socket handed to the backend)`, { session: this.sid });
    sessions.dec(this.labels);
    untrackSession(this.address, this);
  }
}

/** A backend's stderr → our log. Holds only the prefix string, not the user record (idle memory). */
/**
 * A backend's log line in ours, under our prefix: Dovecot's own prefix (`imap(user)<pid><session><rip=IP>: `)
 * is dropped, the client address it names (the IP Dovecot was given) kept as rip=.
 */
function backendLogLine(env: ProxyEnv, prefix: string): (line: string) => void {
  return (line) => {
    const own = /^[^:]*\([^)]*\)(<[^>]*>)*: /.exec(line)?.[0] ?? '';
    const rip = /<rip=([0-9a-fA-F:.]+)>/.exec(own)?.[1];
    env.log.log('info', prefix, line.slice(own.length), rip !== undefined ? { rip } : undefined);
  };
}
