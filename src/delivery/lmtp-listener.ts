/**
 * NAME        src/delivery/lmtp-listener — the `lmtp` listener of `pigeon serve`
 * SYNOPSIS    pigeon.yaml: listen: ["lmtp=127.0.0.1:24"] or ["lmtp=/var/spool/postfix/private/pigeon-lmtp"]
 * DESCRIPTION For an lmtp listener `pigeon serve` (src/commands/proxy.ts) gets a net.Server here
 *             whose connections go to one shared LMTP server (src/delivery/lmtp.ts) built on the
 *             daemon's store, nodes and peer links. The LMTP module is loaded on first use, so
 *             `pigeon deliver` never pays for smtp-server. A stale unix socket file left by a
 *             previous run is removed first. Logging follows the daemon's logger, also after a
 *             SIGHUP reload.
 *             When serve runs as root, the worker's mail writer child (src/writer/mail-writer.ts)
 *             is started with the listener, before the worker says it is ready: the first message
 *             on each worker does not wait for a Node process to start.
 *             `lmtp=HOST:PORT,proxy`: each connection starts with a PROXY header, accepted only from
 *             limits.trusted_proxies (src/proxy/proxy-header.ts); its address is the LMTP client's.
 * SECURITY    LMTP has no authentication: listen on loopback or a unix socket only.
 */
import net from 'node:net';
import { existsSync, statSync, unlinkSync } from 'node:fs';
import type { Instance, Listener } from '../instance.js';
import type { Store } from '../store.js';
import type { Logger } from '../log.js';
import type { NodeDirectory } from '../nodes.js';
import type { RemoteStore } from './types.js';
import { passProxyHeader } from '../proxy/proxy-header.js';
import { resolveMailUser } from '../mailuser.js';
import { prestartMailWriter } from '../writer/mail-writer.js';

/** What the daemon shares with its LMTP server (read at each use: a reload swaps instance and log). */
export interface LmtpDaemon {
  readonly instance: Instance;
  readonly store: Store;
  readonly log: Logger;
  readonly nodes: NodeDirectory;
}

export function lmtpListener(l: Listener, env: LmtpDaemon, remote: RemoteStore): net.Server | null {
  if (l.protocol !== 'lmtp') return null;
  if (l.path !== null && existsSync(l.path) && statSync(l.path).isSocket()) unlinkSync(l.path);
  try {
    prestartMailWriter(resolveMailUser(env.instance.config.mail_user));
  } catch (e) {
    // not fatal: the first delivery starts the writer (and reports what stops it, per message)
    env.log.log('warn', 'lmtp', `mail writer not started ahead: ${e instanceof Error ? e.message : String(e)}`);
  }
  const ready = import('./lmtp.js').then((m) => ({
    m,
    server: m.createLmtpServer({ instance: env.instance, store: env.store, logger: { log: (...a) => env.log.log(...a) }, remote, nodes: env.nodes }),
  }));
  return net.createServer({ pauseOnConnect: true }, (sock) => {
    sock.on('error', () => undefined);
    // `,proxy`: the client's address from the PROXY header (only from limits.trusted_proxies);
    // smtp-server's own useProxy is not used: it would take a header from any address
    const peer = l.proxy ? passProxyHeader(sock, env.instance.config.limits, env.log, 'lmtp') : Promise.resolve(undefined);
    Promise.all([ready, peer]).then(
      ([{ m, server }, p]) => {
        if (p === null) return; // refused and closed (logged)
        m.handleLmtpSocket(server, sock, p && p.rip !== '' ? { remoteAddress: p.rip, remotePort: p.rport } : undefined);
      },
      (e: unknown) => {
        env.log.log('error', 'lmtp', `LMTP unavailable: ${e instanceof Error ? e.message : String(e)}`);
        sock.end('421 4.3.0 LMTP service unavailable\r\n');
      },
    );
  });
}
