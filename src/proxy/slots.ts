/**
 * NAME        src/proxy/slots — a client connection's place in the node-wide limits
 * DESCRIPTION `admit` asks the node state service (src/anvil) for a slot when a client connects:
 *             limits.preauth_per_ip for unauthenticated connections from one address (addresses
 *             in limits.trusted_networks and local pipes are exempt) and limits.max_connections
 *             for all the proxy holds; a full limit evicts the oldest unauthenticated connection
 *             (its owner gets `onEnd('evicted')`), and with none to evict the new one is refused.
 *             After authentication `login` takes a user+IP slot (limits.max_userip_connections),
 *             `handedOff` says the backend now holds the socket (it stops counting against
 *             max_connections), `logout` returns to pre-auth after a session that did not start,
 *             `started` names where the session went and `onKick` how to end it (`pigeon who` /
 *             `pigeon kick`, over the same service), `close` frees the slot. Slots are found
 *             from the ClientConn (`slotOf`), so the router needs no extra parameters;
 *             `loginAhead` asks for the user+IP slot while the login still waits for its penalty
 *             lookup (route() takes that answer, `dropLoginAhead` gives it back); a session received over a peer link has none
 *             (the node the client connected to counted it).
 * SECURITY    Limits come from pigeon.yaml at each call (a SIGHUP reload applies to the next
 *             connection). A limits service that cannot be reached falls back to per-process
 *             state (src/anvil/client.ts), never to refusing everyone.
 */
import type { ProxyEnv } from './env.js';
import type { ClientConn } from './conn.js';
import type { FileConfig } from '../instance.js';
import { NetworkList, canonicalIp } from '../ip.js';

export interface Slot {
  readonly id: string;
  readonly ip: string;
  /** take a user+IP slot: 'ok', or 'limit' with the configured maximum */
  login(user: string, session: string): Promise<{ ok: true } | { ok: false; max: number }>;
  /** the session did not start: back to pre-auth */
  logout(): void;
  /** the backend holds the client's socket now */
  handedOff(): void;
  /** the session runs on `backend` (dovecot, courier, peer:NODE): for `pigeon who` */
  started(backend: string): void;
  /** how to end the running session when `pigeon kick` names it (`kick()` at once if it already did) */
  onKick(target: Kickable): void;
  /**
   * The session outlives its connection (handed off: the backend holds the socket): `close()`
   * from the connection's side is ignored until release() (the session's end). From here on the
   * connection can no longer be evicted (it is logged in): the slot lets go of the forker's
   * end handler and with it of everything that handler reaches (the connection, its socket).
   */
  keep(): void;
  /** the kept session ended: the slot is freed */
  release(): void;
  close(): void;
}

/** What `pigeon kick` ends: the running session (an object, not a closure per session). */
export interface Kickable {
  kick(): void;
}

export type Admission = { admitted: true; slot: Slot } | { admitted: false; why: string };

const trustedCache = new WeakMap<FileConfig['limits'], NetworkList>();

/** limits.trusted_networks of the current configuration, parsed once per (re)load. */
export function trustedNetworks(env: ProxyEnv): NetworkList {
  const l = env.instance.config.limits;
  let n = trustedCache.get(l);
  if (!n) {
    n = new NetworkList(l.trusted_networks);
    trustedCache.set(l, n);
  }
  return n;
}

/**
 * A connection's slot: one object per connection (methods on the prototype, not closures per
 * connection: a handed-off session keeps its slot for its whole life, so its size counts).
 */
class ConnSlot implements Slot {
  readonly id: string;
  readonly ip: string;
  private readonly env: ProxyEnv;
  // the forker's: an eviction closes the connection; null once the session is kept (never evicted)
  private onEnd: ((reason: string) => void) | null;
  private closed = false;
  private kept = false;
  // a kick ends the session the way its router said (onKick); an eviction goes to the forker
  private kick: Kickable | null = null;
  private kicked = false;

  constructor(env: ProxyEnv, id: string, ip: string, onEnd: (reason: string) => void) {
    this.env = env;
    this.id = id;
    this.ip = ip;
    this.onEnd = onEnd;
  }

  /** the node state service ended this connection (evicted, kicked): AnvilClient's EndHandler */
  ended(reason: string): void {
    if (reason !== 'kicked') this.onEnd?.(reason);
    else if (this.kick) this.kick.kick();
    else this.kicked = true;
  }

  async login(user: string, session: string): Promise<{ ok: true } | { ok: false; max: number }> {
    const max = this.env.instance.config.limits.max_userip_connections;
    const l = await this.env.anvil.login(this.id, user, session, max);
    // a connection evicted meanwhile is about to close: let it, its session is not counted
    if (l.ok || l.why === 'gone') return { ok: true };
    return { ok: false, max };
  }

  logout(): void {
    if (!this.closed) void this.env.anvil.logout(this.id);
  }

  handedOff(): void {
    if (!this.closed) void this.env.anvil.held(this.id, false);
  }

  started(backend: string): void {
    if (!this.closed) void this.env.anvil.backend(this.id, backend);
  }

  onKick(target: Kickable): void {
    this.kick = target;
    if (this.kicked) target.kick();
  }

  keep(): void {
    this.kept = true;
    this.onEnd = null;
  }

  release(): void {
    this.kept = false;
    this.close();
  }

  close(): void {
    if (this.closed || this.kept) return;
    this.closed = true;
    this.kick = null;
    this.onEnd = null;
    void this.env.anvil.close(this.id);
  }
}

/** Ask for a slot for a new client connection from `ip` ('' for a local pipe). */
export async function admit(env: ProxyEnv, clientIp: string, proto: string, onEnd: (reason: string) => void): Promise<Admission> {
  const a = env.anvil;
  const ip = canonicalIp(clientIp);
  const limits = env.instance.config.limits;
  const slot = new ConnSlot(env, a.connId(), ip, onEnd);
  const trusted = ip === '' || trustedNetworks(env).has(ip);
  const r = await a.open(slot.id, { ip, proto, trusted }, { perIp: limits.preauth_per_ip, total: limits.max_connections }, slot);
  if (!r.admitted) return { admitted: false, why: r.why };
  return { admitted: true, slot };
}

const slots = new WeakMap<ClientConn, Slot>();

type SlotLogin = { ok: true } | { ok: false; max: number };
/** user+IP slots asked for ahead of route(), by connection */
const ahead = new WeakMap<ClientConn, { readonly user: string; readonly result: Promise<SlotLogin> }>();

/**
 * Ask for the user+IP slot as soon as the password is known to be right, while the login's
 * other wait (the penalty lookup, a round trip of its own) is still running: route() then takes
 * this answer instead of asking again. The login's requests and answers are the same; one round
 * trip less is on its path.
 */
export function loginAhead(conn: ClientConn, user: string, session: string): void {
  const slot = slots.get(conn);
  if (!slot || ahead.has(conn)) return;
  const result = slot.login(user, session);
  result.catch(() => undefined);
  ahead.set(conn, { user, result });
}

/** The slot asked for ahead for `user` (route()), or null when none was; one for another user is given back. */
export function takeLoginAhead(conn: ClientConn, user: string): Promise<SlotLogin> | null {
  const a = ahead.get(conn);
  if (!a) return null;
  ahead.delete(conn);
  if (a.user === user) return a.result;
  dropAhead(conn, a.result);
  return null;
}

/** The login did not go on to route(): the slot asked for ahead goes back (pre-auth again). */
export function dropLoginAhead(conn: ClientConn): void {
  const a = ahead.get(conn);
  if (!a) return;
  ahead.delete(conn);
  dropAhead(conn, a.result);
}

/** A slot asked for ahead and taken (takeLoginAhead) that the session will not use: given back. */
export function dropAhead(conn: ClientConn, result: Promise<SlotLogin>): void {
  void result.then(
    (l) => {
      if (l.ok) slots.get(conn)?.logout();
    },
    () => undefined,
  );
}

export function attachSlot(conn: ClientConn, slot: Slot): void {
  slots.set(conn, slot);
}

export function slotOf(conn: ClientConn): Slot | null {
  return slots.get(conn) ?? null;
}

/** The one reply a client gets when its connection is refused or evicted by a connection limit. */
export function limitReply(proto: 'imap' | 'pop3', kind: 'refused' | 'evicted'): string {
  const text = kind === 'refused' ? 'Too many connections, try again later.' : 'Connection limit reached: closing the oldest connection that has not logged in.';
  return proto === 'imap' ? `* BYE ${text}\r\n` : `-ERR [SYS/TEMP] ${text}\r\n`;
}
