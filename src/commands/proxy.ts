/**
 * NAME        src/commands/proxy — pigeon serve | imap | pop3
 * DESCRIPTION `serve` runs the standalone daemon (forkers/listen.ts). `imap`/`pop3` run one session
 *             on what the process inherited, chosen with --forker stdio|inetd|postfix.
 *             In the one-session modes stdout (and, for inetd/postfix, stderr) is the protocol:
 *             a startup failure is answered in protocol (`* BYE [UNAVAILABLE]`, `-ERR [SYS/TEMP]`)
 *             and logged to log.file or syslog, never printed.
 *             Every session first takes its slot in the node-wide limits (src/proxy/slots.ts): a
 *             one-shot process reaches the node state service, starting it when none runs.
 *             `serve` exits 75 with one line when a listener cannot be opened.
 */
import type { Command } from '@commander-js/extra-typings';
import { Option } from '@commander-js/extra-typings';
import type { ProxyEnv } from '../proxy/env.js';
import type { ExtraListener, HandoffListener } from '../../forkers/listen.js';
import type { PeerContext } from '../peer/context.js';
import type { DeliveryEnv } from '../delivery/types.js';
import { oneShotForkers } from '../../forkers/registry.js';
import { AppError, EX, isAppError, replyCode } from '../errors.js';

/**
 * `serve` opens lmtp=, peer= and metrics= listeners through their own modules (imported only for
 * serve). This is where the daemon joins them: the peer listener hands received sessions to the
 * proxy (src/proxy/received.ts) and received messages to the delivery driver
 * (src/delivery/receive.ts); LMTP stores mail for other nodes over the worker's peer links.
 */
async function extraListeners(): Promise<ExtraListener> {
  const [{ lmtpListener }, { peerListener }, { metricsServer }, { createPeerContext }, { remoteStore }, { receiveSession }, { receiveDelivery }, { makeDeliveryEnv }] = await Promise.all([
    import('../delivery/lmtp-listener.js'),
    import('../peer/listener.js'),
    import('../metrics.js'),
    import('../peer/context.js'),
    import('../peer/remote-store.js'),
    import('../proxy/received.js'),
    import('../delivery/receive.js'),
    import('../delivery/env.js'),
  ]);
  // one peer context per worker: its spare links serve every listener of the worker
  const peers = new WeakMap<ProxyEnv, PeerContext>();
  const peerOf = (env: ProxyEnv): PeerContext => {
    let p = peers.get(env);
    if (!p) {
      p = createPeerContext(env.instance, env.store, env.nodes);
      p.prewarm = true;
      peers.set(env, p);
    }
    return p;
  };
  // the delivery side of received messages, built on the first one (mail user looked up once);
  // no RemoteStore: a received message is never forwarded again; the logger follows SIGHUP reloads
  const received = new WeakMap<ProxyEnv, DeliveryEnv>();
  const deliveryEnvOf = (env: ProxyEnv): DeliveryEnv => {
    let d = received.get(env);
    if (!d) {
      d = makeDeliveryEnv(env.instance, env.store, { log: (...a) => env.log.log(...a) }, 'lmtp', null, env.nodes);
      received.set(env, d);
    }
    return d;
  };
  return (l, env) => {
    // with --workers 1 only: else the primary serves the sum of all workers (forkers/listen.ts)
    if (l.protocol === 'metrics') return metricsServer(false);
    if (l.protocol === 'lmtp') return lmtpListener(l, env, remoteStore(env.instance, env.store, env.nodes, peerOf(env)));
    return peerListener(l, env, peerOf(env), {
      session: (s) => receiveSession(env, s),
      delivery: (d) => receiveDelivery(deliveryEnvOf(env), d),
    });
  };
}

/**
 * The socket `pigeon deliver` hands its messages to (src/delivery/handoff-server.ts): each
 * worker delivers them with its own store and nodes (a peer link only for a recipient homed on
 * another node, built on first use), logging as `deliver(user)`
 * (the lines an in-process deliver writes); the logger follows SIGHUP reloads.
 */
async function handoffListener(): Promise<HandoffListener> {
  const [{ handoffServer }, { makeDeliveryEnv }, { remoteStore }] = await Promise.all([
    import('../delivery/handoff-server.js'),
    import('../delivery/env.js'),
    import('../peer/remote-store.js'),
  ]);
  return (env) => {
    let delivery: DeliveryEnv | null = null;
    return handoffServer(() => {
      delivery ??= makeDeliveryEnv(env.instance, env.store, { log: (...a) => env.log.log(...a) }, 'deliver', remoteStore(env.instance, env.store, env.nodes), env.nodes);
      return { store: env.store, env: delivery };
    });
  };
}

async function oneSession(proto: 'imap' | 'pop3', forkerName: string, implicitTls: boolean, cfg: string | undefined): Promise<number> {
  const forker = oneShotForkers().find((f) => f.name === forkerName);
  if (!forker) throw new AppError('USAGE', `unknown forker ${JSON.stringify(forkerName)}; one of: ${oneShotForkers().map((f) => f.name).join(', ')}`);
  // one session, then exit: nobody could read this process's metrics
  (await import('../metrics.js')).countNothing();
  const { createProxyEnv } = await import('../proxy/env.js');
  const { syslogSink, createLogger } = await import('../log.js');
  let env: ProxyEnv;
  try {
    env = await createProxyEnv(cfg, { logToStderr: !forker.stdioIsProtocol, role: forker.name });
  } catch (e) {
    const msg = isAppError(e) ? e.message : String(e);
    // a configuration error (or any start-up failure) is temporary for the client: [UNAVAILABLE], [SYS/TEMP]
    const code = replyCode(e, proto);
    const line = proto === 'imap' ? `* BYE [${code}] Server configuration error, see the server log.\r\n` : `-ERR [${code}] Server configuration error, see the server log.\r\n`;
    process.stdout.write(line);
    createLogger({ level: 'info', sink: syslogSink() ?? (() => {}) }).log('error', `${proto}-login`, `fatal: ${msg}`);
    if (forker.name === 'stdio') process.stderr.write(`pigeon: error: ${msg}\n`);
    return isAppError(e) ? e.exit : EX.CONFIG;
  }
  const { ClientConn } = await import('../proxy/conn.js');
  const conn = new ClientConn({ ...forker.transport(), secure: false });
  // this connection's place in the node-wide limits (the node state service, started if none runs)
  const { admit, attachSlot, limitReply } = await import('../proxy/slots.js');
  let tlsUp = false;
  const a = await admit(env, conn.peer.rip, proto, () => {
    env.log.log('info', `${proto}-login`, 'Disconnected (connection limit reached: evicted as the oldest connection that had not logged in):', { rip: conn.peer.rip });
    conn.end(implicitTls && !tlsUp ? undefined : limitReply(proto, 'evicted'));
  });
  if (!a.admitted) {
    env.log.log('warn', `${proto}-login`, `Connection refused (${a.why === 'max_connections' ? 'too many connections: limits.max_connections, none unauthenticated to evict' : a.why}):`, { rip: conn.peer.rip });
    conn.end(implicitTls ? undefined : limitReply(proto, 'refused'));
    env.anvil.shutdown();
    return EX.OK;
  }
  attachSlot(conn, a.slot);
  try {
    if (implicitTls) {
      if (!env.tls) throw new AppError('CONFIG_INVALID', 'no TLS certificate configured');
      const { alpnCallback, handshakeTimeoutMs } = await import('../proxy/tls.js');
      try {
        await conn.startTls(env.tls, { timeoutMs: handshakeTimeoutMs(env.instance), alpn: alpnCallback(proto) });
        tlsUp = true;
      } catch (e) {
        env.log.log('info', `${proto}-login`, `Disconnected (TLS handshaking: ${(e as Error).message}):`, { rip: conn.peer.rip });
        return EX.OK;
      }
    }
    await (await import('../proxy/sessions.js')).runSession(env, proto, conn);
    // a handed-off session runs on after its login: this process waits for its backend's end
    await (await import('../proxy/live.js')).drained();
    return EX.OK;
  } finally {
    a.slot.close();
    env.anvil.shutdown();
  }
}

export function registerProxy(program: Command, cfg: () => string | undefined): void {
  program
    .command('serve')
    .option('--workers <n>', 'worker processes sharing the ports (default: one per core)', (v) => {
      if (!/^\d+$/.test(v) || Number(v) > 256) throw new AppError('USAGE', `--workers: expected a number 0-256, got ${JSON.stringify(v)}`);
      return Number(v);
    })
    .description('standalone daemon: every imap/imaps/pop3/pop3s/lmtp/peer/metrics listener in the config (foreground)')
    .action(async (o) => {
      const { serve } = await import('../../forkers/listen.js');
      const { createProxyEnv } = await import('../proxy/env.js');
      const { registerAtStart, startDuties, REGISTRY_REFRESH_MS } = await import('../peer/duties.js');
      const { watchMoves } = await import('../proxy/live.js');
      const cluster = (await import('node:cluster')).default;
      if (cluster.isPrimary) {
        // once, before any worker: check the certificate and join (or refresh) the node registry
        const { loadInstance } = await import('../instance.js');
        for (const l of (await registerAtStart(loadInstance(cfg()))).lines) process.stderr.write(`pigeon: ${l}\n`);
      }
      const makeEnv = async (): Promise<ProxyEnv> => {
        const env = await createProxyEnv(cfg(), { logToStderr: true, role: 'worker', daemon: true });
        (await import('../metrics.js')).setNode(env.instance.config.node);
        startDuties(env);
        // sessions of users whose mailbox is being moved end (they log in again on the new node)
        watchMoves(env.store, REGISTRY_REFRESH_MS, (address, n) => env.log.log('info', `imap(${address})`, `Ended ${n} session(s): mailbox is being moved`));
        return env;
      };
      let code: number;
      try {
        code = await serve(makeEnv, cfg(), o.workers ?? 0, await extraListeners(), await handoffListener());
      } catch (e) {
        // a start-up failure (a listener that cannot be opened): one line, and nothing left running
        if (!isAppError(e)) throw e;
        process.stderr.write(`pigeon: error: ${e.message}\n`);
        code = e.exit;
      }
      process.exit(code);
    });
  for (const proto of ['imap', 'pop3'] as const) {
    program
      .command(proto)
      .addOption(new Option('--forker <name>', 'what the session runs on').choices(oneShotForkers().map((f) => f.name)).default('stdio'))
      .option('--tls', `implicit TLS on the inherited socket (${proto}s)`)
      .description(`one ${proto.toUpperCase()} session on the inherited stdin/stdout (inetd.conf, master.cf spawn, ssh, tests)`)
      .action(async (o) => {
        const code = await oneSession(proto, o.forker, o.tls ?? false, cfg());
        // let the last bytes reach the client, then exit even if a handle lingers
        process.stdout.write('', () => process.exit(code));
        setTimeout(() => process.exit(code), 2000).unref();
      });
  }
}
