/**
 * NAME        forkers/listen — the standalone daemon behind `pigeon serve`
 * SYNOPSIS    pigeon -c /etc/pigeon serve [--workers N]
 * DESCRIPTION Opens every imap, imaps, pop3 and pop3s listener of pigeon.yaml (and lmtp when the
 *             delivery agent provides it), in N worker processes sharing the ports (node:cluster;
 *             default one per core). Stays in the foreground (systemd Type=exec) and logs to
 *             stderr or log.file.
 *             Limits: PREAUTH_CONNS_PER_IP concurrent connections per client address and
 *             MAX_CONNECTIONS in all, per worker.
 *             SIGTERM: stop accepting, let sessions end (up to 10 s; also those received over
 *             peer links), exit 0.
 *             SIGHUP: re-read pigeon.yaml; on success swap the TLS certificate and log settings,
 *             keep every session; on error log it and keep the old configuration.
 * DIAGNOSTICS exit 78 on a bad configuration at start, 75 when a port cannot be bound.
 */
import cluster from 'node:cluster';

// let the kernel spread connections over the workers (round-robin through the primary costs ~0.3 ms a login)
cluster.schedulingPolicy = cluster.SCHED_NONE;
import { createServer, type Server, type Socket } from 'node:net';
import { createServer as createTlsServer, type TLSSocket, type Server as TlsServer } from 'node:tls';
import { readFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import type { ProxyEnv } from '../src/proxy/env.js';
import { loadTls } from '../src/proxy/env.js';
import type { SniCallback } from '../src/client-tls.js';
import { loadInstance, type Listener } from '../src/instance.js';
import { createLogger } from '../src/log.js';
import { socketConn } from './inetd.js';
import { ImapSession } from '../src/proxy/imap-session.js';
import { Pop3Session } from '../src/proxy/pop3-session.js';
import { unmap } from '../src/proxy/conn.js';
import { liveCount } from '../src/proxy/live.js';
import { PREAUTH_CONNS_PER_IP, MAX_CONNECTIONS } from '../src/limits.js';
import type { Forker } from './types.js';

export type ExtraListener = (l: Listener, env: ProxyEnv) => Server | null;

export const forker = { kind: 'forker', name: 'listen', summary: 'standalone daemon: every listener of the config', stdioIsProtocol: false } satisfies Forker;

function addr(l: Listener, s: Server): string {
  const a = s.address();
  return typeof a === 'object' && a !== null ? `${a.address.includes(':') ? `[${a.address}]` : a.address}:${a.port}` : String(a ?? l.path);
}

function tlsFiles(env: ProxyEnv): { cert: Buffer; key: Buffer } {
  return { cert: readFileSync(env.instance.tls.cert), key: readFileSync(env.instance.tls.key) };
}

/** Run the daemon. In the primary with workers > 1 this forks and supervises. */
export async function serve(makeEnv: () => ProxyEnv, configPath: string | undefined, workers: number, extra: ExtraListener | null): Promise<number> {
  const n = workers > 0 ? workers : availableParallelism();
  if (n > 1 && cluster.isPrimary) return supervise(n, configPath);
  return runWorker(makeEnv, configPath, extra);
}

async function supervise(n: number, configPath: string | undefined): Promise<number> {
  loadInstance(configPath); // refuse to start half-configured: errors exit 78 before forking
  let stopping = false;
  const fork = (): void => {
    const w = cluster.fork();
    w.on('exit', (code, sig) => {
      if (stopping) return;
      process.stderr.write(`pigeon: worker ${w.process.pid} exited (${code ?? sig}); restarting\n`);
      setTimeout(fork, 1000);
    });
  };
  for (let i = 0; i < n; i++) fork();
  return new Promise<number>((resolve) => {
    process.on('SIGTERM', () => {
      stopping = true;
      for (const w of Object.values(cluster.workers ?? {})) w?.process.kill('SIGTERM');
      const check = setInterval(() => {
        if (Object.keys(cluster.workers ?? {}).length === 0) {
          clearInterval(check);
          resolve(0);
        }
      }, 100);
    });
    process.on('SIGINT', () => process.emit('SIGTERM'));
    process.on('SIGHUP', () => {
      for (const w of Object.values(cluster.workers ?? {})) w?.process.kill('SIGHUP');
    });
  });
}

async function runWorker(makeEnv: () => ProxyEnv, configPath: string | undefined, extra: ExtraListener | null): Promise<number> {
  const env = makeEnv();
  const servers: Server[] = [];
  const tlsServers: TlsServer[] = [];
  const sockets = new Set<Socket>();
  const perIp = new Map<string, number>();
  let total = 0;

  const accept = (proto: 'imap' | 'pop3', secure: boolean) => (sock: Socket | TLSSocket) => {
    const ip = unmap(sock.remoteAddress);
    const count = (perIp.get(ip) ?? 0) + 1;
    if (count > PREAUTH_CONNS_PER_IP || total + 1 > MAX_CONNECTIONS) {
      env.log.log('warn', `${proto}-login`, `Connection refused (${count > PREAUTH_CONNS_PER_IP ? 'too many connections from this IP' : 'too many connections'}):`, { rip: ip });
      sock.end(proto === 'imap' ? '* BYE Too many connections, try again later.\r\n' : '-ERR [SYS/TEMP] Too many connections, try again later.\r\n');
      return;
    }
    perIp.set(ip, count);
    total++;
    sockets.add(sock);
    sock.on('error', () => {});
    const conn = socketConn(sock, secure);
    const session = proto === 'imap' ? new ImapSession(env, conn) : new Pop3Session(env, conn);
    session
      .run()
      .catch((e: unknown) => {
        env.log.log('error', `${proto}-login`, `session failed: ${e instanceof Error ? e.message : String(e)}`);
        sock.destroy();
      })
      .finally(() => {
        sockets.delete(sock);
        total--;
        const c = (perIp.get(ip) ?? 1) - 1;
        if (c <= 0) perIp.delete(ip);
        else perIp.set(ip, c);
      });
  };

  for (const l of env.instance.config.listen) {
    let server: Server | null = null;
    if (l.protocol === 'imap' || l.protocol === 'pop3') server = createServer({ pauseOnConnect: true }, accept(l.protocol, false));
    else if (l.protocol === 'imaps' || l.protocol === 'pop3s') {
      const proto = l.protocol === 'imaps' ? 'imap' : 'pop3';
      // tls.sni: the current configuration's choice (SIGHUP swaps env.tls)
      const SNICallback: SniCallback = (name, cb) => (env.tls ? env.tls.SNICallback(name, cb) : cb(null, undefined));
      server = createTlsServer({ ...tlsFiles(env), minVersion: 'TLSv1.2', handshakeTimeout: 15_000, SNICallback }, accept(proto, true));
      tlsServers.push(server as TlsServer);
      server.on('tlsClientError', (e: Error, s: TLSSocket) => {
        env.log.log('info', `${proto}-login`, `Disconnected (TLS handshaking: ${e.message.split('\n')[0] ?? ''}):`, { rip: unmap(s.remoteAddress) });
      });
    } else if (extra) server = extra(l, env);
    if (!server) {
      env.log.log('warn', 'master', `listener ${l.protocol} is not served by this version; skipped`);
      continue;
    }
    const s = server;
    await new Promise<void>((resolve, reject) => {
      s.once('error', reject);
      if (l.path !== null) s.listen(l.path, resolve);
      else s.listen(l.port, l.host, resolve);
    }).catch((e: NodeJS.ErrnoException) => {
      throw Object.assign(new Error(`cannot listen on ${l.protocol}=${l.path ?? `${l.host}:${l.port}`}: ${e.code ?? e.message}`), { exit: 75 });
    });
    servers.push(s);
    if (!cluster.isWorker || cluster.worker?.id === 1) process.stderr.write(`pigeon: listening ${l.protocol} ${addr(l, s)}\n`);
  }
  if (servers.length === 0) env.log.log('warn', 'master', 'no listeners configured (add --listen at init or listen: in pigeon.yaml)');
  if (!cluster.isWorker || cluster.worker?.id === 1) process.stderr.write(`pigeon: ready (${servers.length} listeners)\n`);
  env.log.log('info', 'master', `pigeon started (pid ${process.pid}${cluster.isWorker ? `, worker ${cluster.worker?.id ?? '?'}` : ''}, ${servers.length} listeners)`);

  process.on('SIGHUP', () => {
    try {
      const inst = loadInstance(configPath);
      const tls = loadTls(inst);
      env.tls = tls;
      env.instance = inst;
      for (const s of tlsServers) s.setSecureContext({ ...tlsFiles(env), minVersion: 'TLSv1.2' });
      env.log = createLogger({ level: inst.config.log.level, file: inst.logFile });
      env.log.log('info', 'master', 'configuration reloaded');
    } catch (e) {
      env.log.log('error', 'master', `reload failed, keeping the old configuration: ${e instanceof Error ? e.message : String(e)}`);
    }
  });
  return new Promise<number>((resolve) => {
    const stop = (): void => {
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
