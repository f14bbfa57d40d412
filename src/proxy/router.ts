/**
 * NAME        src/proxy/router — after login: find the mailbox, start its backend, relay bytes
 * DESCRIPTION Reads nothing from the database itself: the caller passes the user and effective
 *             config from the one auth read. Allocation goes through src/allocation.ts, the same
 *             function delivery uses, so a first login creates exactly the mailbox the first mail
 *             would. Relay joins client and backend both ways (src/proxy/splice.ts: backpressure
 *             both ways, one watcher per stream); when either side ends the other is closed and
 *             no child is left behind. A hand-off (the plain client socket given to the backend
 *             itself) starts only after the backend's start() has put on the wire whatever the
 *             client must see first (backends/types.ts prepareHandoff). Before a backend starts,
 *             the client's connection takes a user+IP slot (src/proxy/slots.ts;
 *             limits.max_userip_connections), given back when the session ends or does not start.
 */
import type { ResolvedUser } from '../modules.js';
import type { ProxyEnv } from './env.js';
import type { ClientConn } from './conn.js';
import { placeUser } from '../allocation.js';
import { BACKENDS } from '../registry.js';
import { BackendError, type BackendSession } from '../../backends/types.js';
import { isAppError } from '../errors.js';
import { trackSession } from './live.js';
import { splice } from './splice.js';
import type { Writable } from 'node:stream';
import { startPeerSession, relayPeer, type PeerSession } from '../../backends/peer.js';
import { slotOf } from './slots.js';

export type RouteResult =
  | { ok: true; session: BackendSession | PeerSession; backend: string }
  /** `reply`: the client's answer when it is not an internal failure (a limit), already logged */
  | { ok: false; reason: string; reply?: string };

export interface RouteOptions {
  /** false on a node that received the session over a peer link: never forward it again */
  readonly forward: boolean;
  /** epoch ms: a locked database is waited for until then (the login's one busy timeout) */
  readonly deadline?: number;
}

const HANDOFF_MAX_INPUT = 16 * 1024;

function quotaOf(u: ResolvedUser): number {
  const q = u.config['mailstore.quota']?.value;
  return typeof q === 'number' && Number.isFinite(q) && q > 0 ? Math.floor(q) : 0;
}

export async function route(
  env: ProxyEnv,
  protocol: 'imap' | 'pop3',
  u: ResolvedUser,
  conn: ClientConn,
  sid: string,
  tag: string | null,
  leftover: () => Buffer,
  opts: RouteOptions = { forward: true },
): Promise<RouteResult> {
  if (u.user.movingTo !== null) return { ok: false, reason: `mailbox of ${u.user.address} is being moved to node ${u.user.movingTo}; try again in a moment` };
  // sessions per user+IP (limits.max_userip_connections), before any backend starts
  const slot = opts.forward ? slotOf(conn) : null;
  if (slot) {
    const l = await slot.login(u.user.address, sid);
    if (!l.ok) {
      const text = `Maximum number of connections from user+IP exceeded (mail_max_userip_connections=${l.max})`;
      env.log.log('info', `${protocol}-login`, `${text}:`, { user: u.user.address, rip: conn.peer.rip, lip: conn.peer.lip, session: sid });
      return { ok: false, reason: text, reply: protocol === 'imap' ? `${tag ?? '*'} NO [LIMIT] ${text}\r\n` : `-ERR [IN-USE] ${text}\r\n` };
    }
  }
  const r = await startRoute(env, protocol, u, conn, sid, tag, leftover, opts);
  if (!r.ok) slot?.logout();
  else if (slot && !('kind' in r.session) && r.session.handedOff) slot.handedOff();
  return r;
}

async function startRoute(
  env: ProxyEnv,
  protocol: 'imap' | 'pop3',
  u: ResolvedUser,
  conn: ClientConn,
  sid: string,
  tag: string | null,
  leftover: () => Buffer,
  opts: RouteOptions,
): Promise<RouteResult> {
  const backendName = String(u.config[`${protocol}.backend`]?.value ?? 'dovecot');
  const backend = BACKENDS.get(backendName);
  if (!backend) return { ok: false, reason: `backend ${backendName} is not available on this node (known: ${[...BACKENDS.keys()].join(', ')})` };
  let placement;
  try {
    placement = await placeUser(
      { store: opts.deadline === undefined ? env.store : env.store.withDeadline(opts.deadline), node: env.instance.config.node, mailRoot: env.instance.mailRoot, mailUser: env.mailUser, nodes: env.peer.nodes },
      u.user,
      u.config,
    );
  } catch (e) {
    return { ok: false, reason: isAppError(e) ? e.message : `allocation failed: ${String(e)}` };
  }
  if (placement.kind === 'remote') {
    if (!opts.forward) return { ok: false, reason: `mailbox of ${u.user.address} is on node ${placement.node}, not here (hand-offs are not forwarded again)` };
    try {
      const session = await startPeerSession(env.peer, placement.node, protocol, { user: placement.user, config: u.config }, conn, sid, tag);
      env.log.log('info', `${protocol}(${u.user.address})`, `Handed off to node ${placement.node}:`, { rip: conn.peer.rip, session: sid });
      return { ok: true, session, backend: `peer:${placement.node}` };
    } catch (e) {
      return { ok: false, reason: isAppError(e) ? e.message : `peer link to ${placement.node} failed: ${String(e)}` };
    }
  }
  let handoff: { socket: import('node:stream').Duplex; input: Buffer } | null = null;
  const sock = conn.handoffSocket();
  if (sock && env.instance.config.handoff) {
    const { pending } = conn.detach();
    const input = Buffer.concat([leftover(), ...pending]);
    if (input.length <= HANDOFF_MAX_INPUT && backend.acceptsHandoff(protocol, input)) handoff = { socket: sock, input };
    else conn.reattach(input);
  }
  try {
    const session = await backend.start({
      handoff,
      protocol,
      address: u.user.address,
      allocation: placement.allocation,
      mailUser: env.mailUser,
      peer: conn.peer,
      sessionId: sid,
      tag,
      binaries: backend.binaries(env.instance.config),
      quota: quotaOf(u),
      logLine: backendLogLine(env, `${protocol}(${u.user.address})`),
    });
    return { ok: true, session, backend: backendName };
  } catch (e) {
    if (handoff) conn.reattach(handoff.input);
    return { ok: false, reason: e instanceof BackendError ? e.message : String(e) };
  }
}

/** End a running session from outside (user moved away): the backend is told to stop, a link is cut. */
export function stopSession(s: BackendSession | PeerSession): void {
  if ('kind' in s) s.socket.destroy();
  else s.child.kill('SIGTERM');
}

/** Relay a routed session to its end, registered in the live-session table, with its log lines. */
export async function runSession(
  env: ProxyEnv,
  protocol: 'imap' | 'pop3',
  address: string,
  sid: string,
  conn: ClientConn,
  s: BackendSession | PeerSession,
  leftover: Buffer,
): Promise<void> {
  const untrack = trackSession(address, () => stopSession(s));
  try {
    const res = await relay(conn, s, leftover, (why) => env.log.log('warn', `${protocol}(${address})`, `Peer link to node ${'kind' in s ? s.node : '?'} lost: ${why}:`, { session: sid }));
    slotOf(conn)?.close(); // before the logout line: a client that saw it may log in again at once
    env.log.log('info', `${protocol}(${address})`, res.in < 0 ? 'Disconnected: Logged out (socket handed to the backend)' : `Disconnected: Logged out in=${res.in} out=${res.out}`, { session: sid });
  } finally {
    untrack();
    // the user+IP slot and the connection slot end with the session
    slotOf(conn)?.close();
  }
}

/** Relay until either side ends. Resolves with byte counts when both are closed. */
export function relay(conn: ClientConn, s: BackendSession | PeerSession, leftover: Buffer, onLinkLost: (why: string) => void = () => {}): Promise<{ in: number; out: number; exit: number | null }> {
  if ('kind' in s) return relayPeer(conn, s, leftover, onLinkLost);
  if (s.handedOff) return waitHandedOff(conn, s);
  const { input, output, pending } = conn.detach();
  const child = s.child;
  const { stdin, stdout } = child;
  return new Promise((resolve) => {
    if (!stdin || !stdout) {
      child.kill('SIGKILL');
      resolve({ in: 0, out: 0, exit: null });
      return;
    }
    let exitCode: number | null = null;
    let exited = false;
    let answered = false;
    let finished = false;
    let early = 0;
    const finish = (): void => {
      if (finished) return;
      finished = true;
      resolve({ in: early + counts.bytesIn, out: counts.bytesOut, exit: exitCode });
    };
    // done when the child has exited and its last words reached the client (or cannot any more)
    const settle = (): void => {
      const o = output as Writable;
      if (exited && (answered || o.destroyed || o.writableFinished)) finish();
    };
    output.write(s.greeting);
    for (const p of [leftover, ...pending]) {
      if (p.length === 0) continue;
      early += p.length;
      stdin.write(p);
    }
    const counts = splice(
      { client: { input, output: output as Writable }, backend: { input: stdin, output: stdout } },
      {
        clientEnded: () => {
          // the client stopped sending: the backend sees EOF; give it a moment to leave, then make sure
          if (!stdin.writableEnded) stdin.destroy();
          if (!exited) {
            const t = setTimeout(() => child.kill('SIGTERM'), 2000);
            t.unref();
            child.once('exit', () => clearTimeout(t));
          }
          settle();
        },
        // the backend said its last word and the client's socket has it: close our side
        backendEnded: () => {
          answered = true;
          input.destroy();
          settle();
        },
      },
    );
    child.once('exit', (code) => {
      exitCode = code;
      exited = true;
      settle();
      // its stdout normally ends with it (backendEnded); if something else holds the pipe open, do not wait for ever
      if (!finished) {
        setTimeout(() => {
          input.destroy();
          finish();
        }, 2000).unref();
      }
    });
  });
}

/** The backend owns the socket (start() already wrote what had to come first): wait for it to exit, then close ours. */
function waitHandedOff(conn: ClientConn, s: BackendSession): Promise<{ in: number; out: number; exit: number | null }> {
  const sock = conn.raw;
  return new Promise((resolve) => {
    const done = (code: number | null): void => {
      // Dovecot exits 89 on a fatal init error without a word to the client (imap)
      if (code === 89 && !sock.destroyed) sock.end('* BYE [UNAVAILABLE] Internal error occurred. Refer to server log for more information.\r\n');
      sock.destroy();
      resolve({ in: -1, out: -1, exit: code });
    };
    if (s.child.exitCode !== null) done(s.child.exitCode);
    else s.child.once('exit', (code) => done(code));
  });
}

/** Dovecot/Courier stderr → our log. Holds only the prefix string, not the user record (idle memory). */
function backendLogLine(env: ProxyEnv, prefix: string): (line: string) => void {
  return (line) => env.log.log('info', prefix, line.replace(/^[^:]*\([^)]*\)(<[^>]*>)*: /, ''));
}
