/**
 * NAME        forkers/listen — the standalone daemon behind `pigeon serve`
 * SYNOPSIS    pigeon -c /etc/pigeon serve [--workers N]
 * DESCRIPTION Opens every imap, imaps, pop3 and pop3s listener of pigeon.yaml (and lmtp when the
 *             delivery agent provides it), in N worker processes sharing the ports (node:cluster;
 *             default one per core). Stays in the foreground and logs to stderr or log.file.
 *             Under systemd (src/systemd.ts, contrib/systemd/): sockets passed by socket units
 *             (LISTEN_FDS) replace the listeners of their protocol, every worker listening on
 *             the primary's inherited fd through node:cluster; the primary notifies READY=1 once
 *             every worker has opened its listeners, RELOADING=1 … READY=1 around a SIGHUP
 *             reload of all workers, and STOPPING=1 on SIGTERM (Type=notify).
 *             The primary process owns the node state service (src/anvil/server.ts) before any
 *             listener opens: connection limits and failure penalties are node-wide, shared by
 *             the workers and by one-shot inetd / Postfix spawn processes of the same instance.
 *             Each TCP connection asks it for a slot when accepted (src/proxy/slots.ts; on TLS
 *             ports before the handshake): limits.preauth_per_ip, limits.max_connections, with
 *             the oldest unauthenticated connection evicted when full.
 *             SIGTERM: stop accepting, let sessions end (up to 10 s; also those received over
 *             peer links), exit 0.
 *             SIGHUP (reloadWorker, the one reload entry point): re-read pigeon.yaml and conf.d,
 *             build the new auth chain, client TLS contexts (tls.cert/key, tls.sni), mail user and
 *             logger first; only when all of them load, swap them in (settings and limits come
 *             with the new instance; backends are re-created with their new sections), keep every
 *             session and the database connection, and log ONE line: `configuration reloaded`,
 *             naming what changed but needs a restart (listeners, database, node name, run_dir,
 *             peer certificate and settings, modules). A bad configuration logs an error and
 *             keeps the old one whole.
 * DIAGNOSTICS exit 78 on a bad configuration at start; 75 with one line on stderr
 *             (`pigeon: error: cannot listen on imap=HOST:PORT: EADDRINUSE`) when a listener
 *             cannot be opened, whatever the worker count: every worker is stopped first.
 */
import cluster from 'node:cluster';

// let the kernel spread connections over the workers (round-robin through the primary costs ~0.3 ms a login)
cluster.schedulingPolicy = cluster.SCHED_NONE;
import { createServer, type Server, type Socket } from 'node:net';
import { createServer as createTlsServer, type TLSSocket, type Server as TlsServer } from 'node:tls';
import { readFileSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { availableParallelism } from 'node:os';
import type { ProxyEnv } from '../src/proxy/env.js';
import type { SniCallback } from '../src/client-tls.js';
import type { Instance, Listener } from '../src/instance.js';
import type { ClientConn, Peer } from '../src/proxy/conn.js';
import type { Slot } from '../src/proxy/slots.js';
import type { AnvilServer } from '../src/anvil/server.js';
import { AppError, isAppError, isErrorCode, type ErrorCode } from '../src/errors.js';
import type { InheritedSocket } from '../src/systemd.js';
import { withHotFlags, applyHotFlags } from '../src/hot-flags.js';
import { socketTransport } from './inetd.js';

export type ExtraListener = (l: Listener, env: ProxyEnv) => Server | null;
/** The `pigeon deliver` hand-off socket's server (src/delivery/handoff-server.ts), built per worker. */
export type HandoffListener = (env: ProxyEnv) => Server;

/** How the primary tells its workers the hand-off socket to listen on (src/delivery/handoff-file.ts). */
const HANDOFF_ENV = 'PIGEON_HANDOFF_SOCKET';

/** The forker module (its registry entry lives in forkers/listen-forker.ts, without this code). */
export { default } from './listen-forker.js';

function addr(l: Listener, s: Server): string {
  const a = s.address();
  const where = typeof a === 'object' && a !== null ? `${a.address.includes(':') ? `[${a.address}]` : a.address}:${a.port}` : String(a ?? l.path);
  return l.fd === undefined ? where : `${where} (inherited fd ${l.fd})`;
}

/** The listeners to open: pigeon.yaml's, except the protocols systemd passed sockets for, and those. */
function listenersOf(configured: readonly Listener[], inherited: readonly InheritedSocket[]): Listener[] {
  const taken = new Set(inherited.map((i) => i.protocol));
  return [...configured.filter((l) => !taken.has(l.protocol)), ...inherited.map((i) => ({ protocol: i.protocol, host: '', port: 0, path: null, proxy: i.proxy, fd: i.fd }))];
}

let notified: Promise<void> = Promise.resolve();

/** sd_notify, in the order called (RELOADING=1 before its READY=1); warnings to stderr (the daemon's log may not exist yet). */
function notify(state: string): Promise<void> {
  notified = notified.then(async () => {
    const { sdNotify } = await import('../src/systemd.js');
    await sdNotify(state, (m) => process.stderr.write(`pigeon: warning: ${m}\n`));
  }).catch((e: unknown) => {
    process.stderr.write(`pigeon: warning: NOTIFY_SOCKET: ${e instanceof Error ? e.message : String(e)}\n`);
  });
  return notified;
}

function tlsFiles(env: ProxyEnv): { cert: Buffer; key: Buffer } {
  return { cert: readFileSync(env.instance.tls.cert), key: readFileSync(env.instance.tls.key) };
}

/**
 * Run the daemon. The primary owns the node state service, then forks and supervises (workers
 * > 1) or serves itself. A start-up failure (a listener that cannot be opened) is an AppError:
 * thrown in the primary, reported to the primary by a worker.
 */
export async function serve(makeEnv: () => Promise<ProxyEnv>, configPath: string | undefined, workers: number, extra: ExtraListener | null, handoff: HandoffListener | null = null): Promise<number> {
  const n = workers > 0 ? workers : availableParallelism();
  const { takeInheritedSockets } = await import('../src/systemd.js');
  if (cluster.isWorker) {
    (await import('../src/metrics.js')).answerPrimary();
    try {
      const path = process.env[HANDOFF_ENV];
      return await runWorker(makeEnv, configPath, extra, takeInheritedSockets(), handoff !== null && path !== undefined && path !== '' ? { path, server: handoff } : null);
    } catch (e) {
      if (!isAppError(e)) throw e;
      // the primary says it (once for all workers) and stops the others
      await new Promise<void>((resolve) => {
        if (!process.send?.({ pigeon: 'fatal', code: e.code, text: e.message } satisfies Fatal, () => resolve())) resolve();
      });
      return e.exit;
    }
  }
  // refuse to start half-configured: errors exit 78 before the service, listeners or workers
  const { loadInstance } = await import('../src/instance.js');
  const instance = loadInstance(configPath);
  // this process serves the node state service, and with --workers 1 or 0 the sessions too
  applyHotFlags();
  // sockets from systemd: taken (and LISTEN_* removed) before any child process exists
  const inherited = takeInheritedSockets();
  const anvil = await ownNodeService(instance);
  // the serve that owns run_dir offers `pigeon deliver` its hand-off socket there
  const offered = anvil !== null && handoff !== null ? await offerHandoff(instance) : null;
  const metrics: Server[] = [];
  try {
    if (n > 1) {
      // one scrape for the whole process tree: the primary answers with every worker's numbers
      const { metricsServer, setNode } = await import('../src/metrics.js');
      setNode(instance.config.node);
      for (const l of instance.config.listen.filter((x) => x.protocol === 'metrics')) metrics.push(await listenOn(l, metricsServer(true), metrics));
      return await supervise(n, inherited, offered);
    }
    return await runWorker(makeEnv, configPath, extra, inherited, offered !== null && handoff !== null ? { path: offered, server: handoff } : null);
  } finally {
    if (offered !== null) await withdrawHandoff(instance, offered);
    for (const s of metrics) s.close();
    anvil?.close();
  }
}

/**
 * The hand-off socket's path, RUN_DIR/deliver.sock, named in DIR/deliver-handoff.json for
 * `pigeon deliver` (a socket left by a killed serve is removed first: this process owns
 * run_dir). null, logged, when it cannot be offered; deliver then delivers in its own process.
 */
async function offerHandoff(instance: Instance): Promise<string | null> {
  const [{ createLogger }, { writeHandoffAs, writerFor }, { HANDOFF_SOCKET, MAX_SOCKET_PATH }, { join }, { lstatSync, unlinkSync }, { resolveMailUser }] = await Promise.all([
    import('../src/log.js'),
    import('../src/delivery/handoff-file-write.js'),
    import('../src/delivery/handoff-file.js'),
    import('node:path'),
    import('node:fs'),
    import('../src/mailuser.js'),
  ]);
  const log = createLogger({ level: instance.config.log.level, file: instance.logFile });
  const path = join(instance.runDir, HANDOFF_SOCKET);
  if (Buffer.byteLength(path) > MAX_SOCKET_PATH) {
    log.log('warn', 'deliver', `no hand-off for pigeon deliver: ${path} is longer than a unix socket path may be (${MAX_SOCKET_PATH} bytes; set a shorter run_dir)`);
    return null;
  }
  try {
    try {
      if (lstatSync(path).isSocket()) unlinkSync(path);
    } catch {
      /* none */
    }
    // never as root into a directory the mail user may change (see src/delivery/handoff-file.ts)
    writeHandoffAs(instance.file, path, writerFor(instance.dir, resolveMailUser(instance.config.mail_user)));
    return path;
  } catch (e) {
    log.log('warn', 'deliver', `no hand-off for pigeon deliver: cannot write ${instance.dir}/deliver-handoff.json: ${(e as NodeJS.ErrnoException).code ?? String(e)}`);
    return null;
  }
}

/** serve stops: deliver no longer finds it (the runtime file first, then the socket). */
async function withdrawHandoff(instance: Instance, path: string): Promise<void> {
  const [{ removeHandoff }, { lstatSync, unlinkSync }] = await Promise.all([import('../src/delivery/handoff-file-write.js'), import('node:fs')]);
  removeHandoff(instance.dir);
  try {
    if (lstatSync(path).isSocket()) unlinkSync(path);
  } catch {
    /* gone */
  }
}

/** Listen on `l`; a failure closes `opened` and is the one-line TEMPFAIL error of serve. */
async function listenOn(l: Listener, s: Server, opened: readonly Server[]): Promise<Server> {
  await new Promise<void>((resolve, reject) => {
    s.once('error', reject);
    if (l.path !== null) s.listen(l.path, resolve);
    else s.listen(l.port, l.host, resolve);
  }).catch((e: NodeJS.ErrnoException) => {
    for (const o of opened) o.close();
    throw new AppError('TEMPFAIL', `cannot listen on ${l.protocol}=${l.path ?? `${l.host}:${l.port}`}: ${e.code ?? e.message}`);
  });
  if (!cluster.isWorker) process.stderr.write(`pigeon: listening ${l.protocol} ${addr(l, s)}\n`);
  return s;
}

/** A worker's start-up failure, sent to the primary: the AppError's code and message. */
interface Fatal {
  readonly pigeon: 'fatal';
  readonly code: ErrorCode;
  readonly text: string;
}

function fatalError(m: unknown): AppError | null {
  if (typeof m !== 'object' || m === null || (m as { pigeon?: unknown }).pigeon !== 'fatal') return null;
  const { code, text } = m as { code?: unknown; text?: unknown };
  return typeof code === 'string' && isErrorCode(code) && typeof text === 'string' ? new AppError(code, text) : null;
}

/** The node state service, owned by this (primary) process; null when one runs already or none can. */
async function ownNodeService(instance: Instance): Promise<AnvilServer | null> {
  const [{ createLogger }, { openRunDir }, { ownService }] = await Promise.all([import('../src/log.js'), import('../src/anvil/run-dir.js'), import('../src/anvil/server.js')]);
  const log = createLogger({ level: instance.config.log.level, file: instance.logFile });
  try {
    const dir = openRunDir(instance.runDir, { create: true });
    if (!dir.mine) {
      dir.close();
      log.log('info', 'anvil', `run_dir ${instance.runDir} belongs to another user: using the node state service running there, if any`);
      return null;
    }
    const r = await ownService(dir, {
      log: (level, msg) => log.log(level, 'anvil', msg),
      idleMs: null,
      onStop: (why) => log.log('error', 'anvil', `node state service stopped (${why}); processes fall back to per-process limits`),
    });
    if (r.kind === 'taken') {
      dir.close();
      log.log('info', 'anvil', `a node state service already runs in ${instance.runDir}: the workers use it`);
      return null;
    }
    log.log('info', 'anvil', `node state service listening in ${instance.runDir} (pid ${process.pid})`);
    return r.server;
  } catch (e) {
    log.log('warn', 'anvil', `${e instanceof Error ? e.message : String(e)}; limits and failure delays are per process`);
    return null;
  }
}

/** What a worker tells the primary besides a fatal start-up error: all its listeners are open, a reload finished. */
interface WorkerState {
  readonly pigeon: 'ready' | 'reloaded';
}

function workerState(m: unknown): WorkerState['pigeon'] | null {
  const p = typeof m === 'object' && m !== null ? (m as { pigeon?: unknown }).pigeon : undefined;
  return p === 'ready' || p === 'reloaded' ? p : null;
}

async function supervise(n: number, inherited: readonly InheritedSocket[], handoffPath: string | null): Promise<number> {
  const { workerEnv, monotonicUsec } = await import('../src/systemd.js');
  let stopping = false;
  // readiness: every first worker has opened its listeners; a reload: every worker has reloaded
  const started = new Set<number>();
  let announced = false;
  let reloading: Set<ReturnType<typeof cluster.fork>> | null = null;
  const reloadStep = (w: ReturnType<typeof cluster.fork> | null): void => {
    if (reloading === null) return;
    if (w) reloading.delete(w);
    if (reloading.size > 0) return;
    reloading = null;
    void notify('READY=1\nSTATUS=configuration reloaded');
  };
  let fatal: AppError | null = null;
  const live = new Set<ReturnType<typeof cluster.fork>>();
  let allExited: (() => void) | null = null;
  const stopAll = (signal: NodeJS.Signals): void => {
    if (!stopping) void notify('STOPPING=1');
    stopping = true;
    for (const w of live) w.process.kill(signal);
    if (live.size === 0) allExited?.();
  };
  const fork = (): void => {
    const w = cluster.fork({ ...workerEnv(inherited), [HANDOFF_ENV]: handoffPath ?? '' });
    live.add(w);
    w.on('message', (m: unknown) => {
      const state = workerState(m);
      if (state === 'reloaded') reloadStep(w);
      if (state === 'ready' && !announced) {
        started.add(w.id);
        if (started.size >= n) {
          announced = true;
          void notify(`READY=1\nMAINPID=${process.pid}\nSTATUS=${n} workers ready`);
        }
      }
      const e = fatalError(m);
      if (e === null || fatal !== null) return;
      fatal = e;
      process.stderr.write(`pigeon: error: ${e.message}\n`);
      stopAll('SIGTERM');
    });
    w.on('exit', (code, sig) => {
      live.delete(w);
      reloadStep(w);
      if (stopping) {
        if (live.size === 0) allExited?.();
        return;
      }
      process.stderr.write(`pigeon: worker ${w.process.pid} exited (${code ?? sig}); restarting\n`);
      setTimeout(() => {
        if (!stopping) fork();
      }, 1000);
    });
  };
  // the workers' V8 optimises their per-login and per-message code sooner (src/hot-flags.ts)
  cluster.setupPrimary({ execArgv: withHotFlags(process.execArgv) });
  for (let i = 0; i < n; i++) fork();
  await new Promise<void>((resolve) => {
    allExited = resolve;
    process.on('SIGTERM', () => stopAll('SIGTERM'));
    process.on('SIGINT', () => process.emit('SIGTERM'));
    process.on('SIGHUP', () => {
      if (stopping) return;
      // systemd sees the reload begin here and end when every worker has said it finished
      void notify(`RELOADING=1\nMONOTONIC_USEC=${monotonicUsec()}`);
      reloading = new Set(live);
      for (const w of live) w.process.kill('SIGHUP');
      reloadStep(null);
    });
  });
  return fatal === null ? 0 : (fatal as AppError).exit;
}

/** A file's SHA-256 (never its bytes: one is a private key), or its error code. */
function fileState(f: string): string {
  try {
    return createHash('sha256').update(readFileSync(f)).digest('hex');
  } catch (e) {
    return (e as NodeJS.ErrnoException).code ?? 'error';
  }
}

/** The peer link's files as they are now: a certificate replaced on disk is a change. */
export function peerFiles(i: Instance): string {
  return [i.peerTls.cert, i.peerTls.key, i.peerTls.ca].map((f) => `${f}:${fileState(f)}`).join('\n');
}

/**
 * What differs between two loads of pigeon.yaml that a running daemon cannot take over: the
 * listeners (sockets are open, shared by the workers), the database (its connection and the
 * registry), the node's name and run_dir, the peer link's certificate and settings (verified
 * links are open, and the registry holds the certificate's fingerprint), the modules loaded.
 * `oldPeer`/`nowPeer`: peerFiles of the running configuration (read when it loaded) and the new one.
 */
export function needsRestart(old: Instance, now: Instance, oldPeer: string, nowPeer: string): string[] {
  const out: string[] = [];
  const same = (a: unknown, b: unknown): boolean => JSON.stringify(a) === JSON.stringify(b);
  const spec = (i: Instance): string[] => i.config.listen.map((l) => `${l.protocol}=${l.path ?? `${l.host}:${l.port}`}`);
  if (!same(spec(old), spec(now))) out.push(`listen (${spec(now).join(' ') || 'none'})`);
  if (old.dbPath !== now.dbPath || !same(old.dbOptions, now.dbOptions)) out.push('database');
  if (old.config.node !== now.config.node) out.push(`node (${now.config.node})`);
  if (old.runDir !== now.runDir) out.push('run_dir');
  if (!same(old.config.peer, now.config.peer) || oldPeer !== nowPeer) out.push('peer (peer.*, node certificate)');
  if (!same(old.config.modules, now.config.modules)) out.push('modules');
  return out;
}

/** A TCP connection waiting for (or holding) its slot in the node-wide limits. */
interface Admitted {
  /** the slot, or null when refused or closed meanwhile */
  slot: Promise<Slot | null>;
  /** the session's connection, once it runs (eviction then ends it in protocol); null again once its login session returned */
  conn: ClientConn | null;
  /** the TCP socket until it closes (a handed-off session's is closed in the worker at once) */
  open: Socket | null;
  /** the client's addresses: the socket's, or those a PROXY header named */
  readonly peer: Peer;
}

async function runWorker(
  makeEnv: () => Promise<ProxyEnv>,
  configPath: string | undefined,
  extra: ExtraListener | null,
  inherited: readonly InheritedSocket[],
  handoff: { readonly path: string; readonly server: HandoffListener } | null,
): Promise<number> {
  const [{ implicitTlsOptions, guardHandshakes }, { loadClientTls }, { loadInstance }, { createLogger }, { ClientConn }, { unmapIp }, { liveCount }, { admit, attachSlot, limitReply }, sessions, { passProxyHeader, socketPeer }, systemd] = await Promise.all([
    import('../src/proxy/tls.js'),
    import('../src/client-tls.js'),
    import('../src/instance.js'),
    import('../src/log.js'),
    import('../src/proxy/conn.js'),
    import('../src/ip.js'),
    import('../src/proxy/live.js'),
    import('../src/proxy/slots.js'),
    import('../src/proxy/sessions.js'),
    import('../src/proxy/proxy-header.js'),
    import('../src/systemd.js'),
  ]);
  const env = await makeEnv();
  const servers: Server[] = [];
  const tlsServers: TlsServer[] = [];
  const sockets = new Set<Socket>();
  /** TLS connections between TCP accept and the end of the handshake, by client address:port */
  const handshaking = new Map<string, Admitted>();

  /**
   * What the node state service calls to evict an unauthenticated connection. Made here, not in
   * admitTcp, so that it holds the connection only through `adm` (which lets go of the socket and
   * the session once they end): the service keeps it for the slot's whole life.
   */
  const evict = (proto: 'imap' | 'pop3', adm: Admitted) => (): void => {
    env.log.log('info', `${proto}-login`, 'Disconnected (connection limit reached: evicted as the oldest connection that had not logged in):', { rip: adm.peer.rip, lport: adm.peer.lport });
    if (adm.conn) adm.conn.end(limitReply(proto, 'evicted'));
    else adm.open?.destroy();
  };

  /**
   * Ask the node for a slot for a new TCP connection. A TLS connection without one is closed
   * (nothing can be said before the handshake); a plain one's session says the refusal itself
   * (runSession, with the answer still to come).
   */
  const admitTcp = (proto: 'imap' | 'pop3', raw: Socket, tls: boolean, peer: Peer): Admitted => {
    const ip = peer.rip;
    let closed = false;
    let slot: Slot | null = null;
    sockets.add(raw);
    raw.on('error', () => {});
    raw.once('close', () => {
      closed = true;
      sockets.delete(raw);
      adm.open = null;
      slot?.close();
    });
    const adm: Admitted = { conn: null, open: raw, peer, slot: Promise.resolve(null) };
    // plain: the request leaves after an IMAP greeting, which runSession writes in this same turn
    const asked = tls ? admit(env, ip, proto, evict(proto, adm)) : Promise.resolve().then(() => admit(env, ip, proto, evict(proto, adm)));
    adm.slot = asked.then((a) => {
        if (!a.admitted) {
          env.log.log('warn', `${proto}-login`, `Connection refused (${a.why === 'max_connections' ? 'too many connections: limits.max_connections, none unauthenticated to evict' : a.why}):`, { rip: ip });
          if (tls) raw.destroy(); // no TLS yet: nothing can be said
          return null;
        }
        if (closed) {
          a.slot.close();
          return null;
        }
        slot = a.slot;
        return a.slot;
      });
    return adm;
  };

  /** `slot` null: admission still under way (adm.slot): an IMAP session greets meanwhile, a POP3 one waits (src/proxy/sessions.ts) */
  const runSession = (proto: 'imap' | 'pop3', sock: Socket | TLSSocket, secure: boolean, adm: Admitted, slot: Slot | null): void => {
    sock.on('error', () => {});
    const conn = new ClientConn({ ...socketTransport(sock, secure, adm.peer), secure });
    adm.conn = conn;
    let admitted: Promise<boolean> | undefined;
    if (slot) attachSlot(conn, slot);
    else
      admitted = adm.slot.then((s) => {
        if (s) {
          attachSlot(conn, s);
          return true;
        }
        // refused (admitTcp logged why), or the client already gone
        conn.end(limitReply(proto, 'refused'));
        return false;
      });
    sessions
      .runSession(env, proto, conn, admitted)
      .catch((e: unknown) => {
        env.log.log('error', `${proto}-login`, `session failed: ${e instanceof Error ? e.message : String(e)}`);
        sock.destroy();
      })
      .finally(() => {
        // a handed-off session goes on (its slot kept by the router); this connection is done
        adm.conn = null;
        if (slot) slot.close();
        else
          void adm.slot.then(
            (s) => s?.close(),
            () => undefined, // the session's own catch above has logged it
          );
      });
  };

  /** The client's addresses: the socket's own, or (a `,proxy` listener) those its PROXY header names; null: refused and closed. */
  const clientPeer = (proto: 'imap' | 'pop3', sock: Socket, proxied: boolean): Promise<Peer | null> =>
    proxied ? passProxyHeader(sock, env.instance.config.limits, env.log, `${proto}-login`) : Promise.resolve(socketPeer(sock));
  const acceptPlain = (proto: 'imap' | 'pop3', proxied: boolean) => (sock: Socket) => {
    void clientPeer(proto, sock, proxied).then((peer) => {
      if (!peer) return;
      // IMAP greets at once, as Dovecot's imap-login does: the node's admission (one round trip
      // to its state service) runs meanwhile, and no command is read before it has answered; a
      // refused client reads the greeting, then `* BYE Too many connections`. POP3 has no way
      // to take its +OK greeting back: its session starts once admitted (or says -ERR).
      runSession(proto, sock, false, admitTcp(proto, sock, false, peer), null);
    });
  };
  const peerKey = (s: Socket): string => `${s.remoteAddress ?? ''}|${s.remotePort ?? 0}`;
  const acceptTls = (proto: 'imap' | 'pop3') => (sock: TLSSocket) => {
    const k = peerKey(sock);
    const adm = handshaking.get(k);
    handshaking.delete(k);
    if (!adm) {
      sock.destroy();
      return;
    }
    void adm.slot.then((slot) => {
      if (slot && !sock.destroyed) runSession(proto, sock, true, adm, slot);
      else sock.destroy();
    });
  };

  /** TCP connections of `,proxy` TLS listeners that passed the PROXY gate (admitted there), with the client's addresses */
  const gated = new WeakMap<Socket, Peer>();

  const banners: string[] = [];
  for (const l of listenersOf(env.instance.config.listen, inherited)) {
    // with workers, the primary serves metrics= for all of them (src/metrics.ts)
    if (l.protocol === 'metrics' && cluster.isWorker) continue;
    let server: Server | null = null;
    let bound: Server | null = null;
    if (l.protocol === 'imap' || l.protocol === 'pop3') server = createServer({ pauseOnConnect: true }, acceptPlain(l.protocol, l.proxy));
    else if (l.protocol === 'imaps' || l.protocol === 'pop3s') {
      const proto = l.protocol === 'imaps' ? 'imap' : 'pop3';
      // tls.sni: the current configuration's choice (SIGHUP swaps env.tls)
      const SNICallback: SniCallback = (name, cb) => (env.tls ? env.tls.SNICallback(name, cb) : cb(null, undefined));
      // handshake deadline and ALPN (src/proxy/tls.ts); failed handshakes are logged and closed there
      server = createTlsServer({ ...implicitTlsOptions(env.instance, proto, tlsFiles(env)), SNICallback }, acceptTls(proto));
      // the slot is taken at TCP accept, so connections still in the handshake count too
      const tlsServer = server as TlsServer;
      const admitHandshake = (raw: Socket, peer: Peer): void => {
        const k = peerKey(raw);
        handshaking.set(k, admitTcp(proto, raw, true, peer));
        raw.once('close', () => handshaking.delete(k));
      };
      server.on('connection', (raw: Socket) => {
        if (!gated.has(raw)) admitHandshake(raw, socketPeer(raw));
      });
      tlsServers.push(tlsServer);
      guardHandshakes(tlsServer, proto, () => env, (raw) => gated.get(raw)?.rip ?? unmapIp(raw.remoteAddress));
      if (l.proxy) {
        // the PROXY header comes before the TLS handshake: a plain TCP listener reads it, then
        // hands the socket (and any bytes after the header) to the TLS server
        bound = createServer({ pauseOnConnect: true }, (raw) => {
          void clientPeer(proto, raw, true).then((peer) => {
            if (!peer || raw.destroyed) return;
            gated.set(raw, peer);
            admitHandshake(raw, peer);
            tlsServer.emit('connection', raw);
          });
        });
      }
    } else if (extra) server = extra(l, env);
    if (!server) {
      env.log.log('warn', 'master', `listener ${l.protocol} is not served by this version; skipped`);
      continue;
    }
    const s = bound ?? server;
    await new Promise<void>((resolve, reject) => {
      s.once('error', reject);
      // an inherited socket: in a worker, node:cluster has the primary open fd l.fd and share it
      if (l.fd !== undefined) s.listen({ fd: l.fd }, resolve);
      else if (l.path !== null) s.listen(l.path, resolve);
      else s.listen(l.port, l.host, resolve);
    }).catch((e: NodeJS.ErrnoException) => {
      for (const o of servers) o.close();
      throw new AppError('TEMPFAIL', `cannot listen on ${l.protocol}=${l.path ?? `${l.host}:${l.port}`}: ${e.code ?? e.message}`);
    });
    servers.push(s);
    banners.push(`pigeon: listening ${l.protocol} ${addr(l, s)}${l.proxy ? ' (PROXY protocol)' : ''}\n`);
  }
  if (handoff !== null) {
    const s = await listenHandoff(env, handoff.path, handoff.server(env), sockets);
    if (s !== null) servers.push(s);
  }
  if (cluster.isWorker) {
    // one worker woken per new connection, the first idle one (src/exclusive-accept.ts)
    // (before this worker says it is ready)
    const { exclusiveAccept } = await import('../src/exclusive-accept.js');
    await Promise.all(
      servers.map((s) =>
        exclusiveAccept(s, (text, lost) => {
          env.log.log('error', 'master', `listener: cannot make accepting exclusive: ${text}${lost ? ' (this worker stops accepting there: restarting it)' : ''}`);
          if (lost) process.kill(process.pid, 'SIGTERM');
        }),
      ),
    );
  }
  if (servers.length === 0) env.log.log('warn', 'master', 'no listeners configured (add --listen at init or listen: in pigeon.yaml)');
  if (!cluster.isWorker || cluster.worker?.id === 1) process.stderr.write(`${banners.join('')}pigeon: ready (${banners.length} listeners)\n`);
  env.log.log('info', 'master', `pigeon started (pid ${process.pid}${cluster.isWorker ? `, worker ${cluster.worker?.id ?? '?'}` : ''}, ${banners.length} listeners)`);
  // systemd: the primary says READY=1 once every worker said this (or this process is all there is)
  const tell = (state: WorkerState['pigeon'], systemd: string): void => {
    if (cluster.isWorker) process.send?.({ pigeon: state } satisfies WorkerState);
    else void notify(systemd);
  };
  tell('ready', `READY=1\nMAINPID=${process.pid}\nSTATUS=ready`);

  const started = env.instance;
  const startedPeer = peerFiles(started);
  /**
   * The reload entry point (SIGHUP): everything new is built before anything is swapped, so a
   * configuration that does not load leaves the old one whole. Resolves true when it reloaded.
   */
  const reloadWorker = async (): Promise<boolean> => {
    const [{ resolveMailUser }, { createAuth }] = await Promise.all([import('../src/mailuser.js'), import('../auth/chain.js')]);
    let next: { inst: Instance; tls: ReturnType<typeof loadClientTls>; mailUser: ReturnType<typeof resolveMailUser>; auth: Awaited<ReturnType<typeof createAuth>>; files: { cert: Buffer; key: Buffer } };
    try {
      const inst = loadInstance(configPath);
      next = {
        inst,
        tls: loadClientTls(inst.tls),
        mailUser: resolveMailUser(inst.config.mail_user),
        auth: await createAuth(inst.config.auth, env.store, inst.dir),
        files: { cert: readFileSync(inst.tls.cert), key: readFileSync(inst.tls.key) },
      };
    } catch (e) {
      env.log.log('error', 'master', `reload failed, keeping the old configuration: ${e instanceof Error ? e.message : String(e)}`);
      return false;
    }
    // compared with what this process started with: a second reload still names what waits
    const restart = needsRestart(started, next.inst, startedPeer, peerFiles(next.inst));
    env.instance = next.inst;
    env.tls = next.tls;
    env.mailUser = next.mailUser;
    env.auth = next.auth;
    for (const s of tlsServers) s.setSecureContext({ ...next.files, minVersion: 'TLSv1.2' });
    env.log = createLogger({ level: next.inst.config.log.level, file: next.inst.logFile });
    env.log.log(
      restart.length > 0 ? 'warn' : 'info',
      'master',
      `configuration reloaded (settings, limits, auth chain, TLS certificates, mail user, log, backends)${restart.length > 0 ? `; needs a restart to take effect: ${restart.join('; ')}` : ''}`,
    );
    return true;
  };
  process.on('SIGHUP', () => {
    // systemd (Type=notify): RELOADING=1 now, READY=1 once this process reloaded or kept the old
    // configuration (with workers, the primary says READY=1 when every worker told it so)
    if (!cluster.isWorker) void notify(`RELOADING=1\nMONOTONIC_USEC=${systemd.monotonicUsec()}`);
    void reloadWorker().then(() => tell('reloaded', 'READY=1\nSTATUS=configuration reloaded'));
  });
  return new Promise<number>((resolve) => {
    const stop = (): void => {
      if (!cluster.isWorker) void notify('STOPPING=1');
      env.log.log('info', 'master', 'stopping: no new connections');
      for (const s of servers) s.close();
      const deadline = setTimeout(() => {
        for (const s of sockets) s.destroy();
        resolve(0);
      }, 10_000);
      deadline.unref();
      const check = setInterval(() => {
        // client connections here, and sessions received over peer links (tracked in src/proxy/live.ts)
        if (sockets.size === 0 && liveCount() === 0) {
          clearInterval(check);
          clearTimeout(deadline);
          resolve(0);
        }
      }, 100);
    };
    process.once('SIGTERM', stop);
    process.once('SIGINT', stop);
  });
}

/**
 * Listen on the hand-off socket: mode 0660, group of mail_user, when serve runs as root (pipe(8)
 * runs deliver as that user), else 0600; run_dir's own permissions decide who reaches it at all.
 * Its connections count as open sessions at SIGTERM (a hand-off in progress may finish). A
 * failure is logged, and deliver then delivers in its own process.
 */
async function listenHandoff(env: ProxyEnv, path: string, server: Server, open: Set<Socket>): Promise<Server | null> {
  const { chmodSync, chownSync } = await import('node:fs');
  server.on('connection', (s: Socket) => {
    open.add(s);
    s.once('close', () => open.delete(s));
  });
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(path, resolve);
    });
    if ((process.geteuid?.() ?? 0) === 0) {
      chownSync(path, 0, env.mailUser.gid);
      chmodSync(path, 0o660);
    } else chmodSync(path, 0o600);
  } catch (e) {
    server.close();
    env.log.log('warn', 'deliver', `no hand-off for pigeon deliver: cannot listen on ${path}: ${(e as NodeJS.ErrnoException).code ?? String(e)}`);
    return null;
  }
  env.log.log('info', 'deliver', `hand-off socket for pigeon deliver: ${path}`);
  return server;
}
