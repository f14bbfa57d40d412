/**
 * NAME        forkers/inetd — one session on the socket inherited as fd 0
 * SYNOPSIS    inetd.conf: 127.0.0.1:143 stream tcp nowait.2000 mail /usr/local/bin/pigeon pigeon -c /etc/pigeon imap --forker inetd
 *             (also `pigeon lmtp --forker inetd`; Postfix spawn(8): see forkers/postfix.ts)
 * DESCRIPTION fds 0, 1 and 2 are the client socket: peer addresses come from it, and nothing but
 *             protocol is ever written to stdout or stderr (logs go to log.file or syslog).
 *             `--tls` makes it an implicit-TLS port (imaps/pop3s).
 *             Each process is one client of the node state service (src/anvil), which the first
 *             of them starts: limits and failure delays count across processes
 *             (src/commands/proxy.ts takes the connection's slot before the greeting).
 * DIAGNOSTICS USAGE when fd 0 is not a socket shared with fd 1 (use --forker stdio).
 */
import type { Socket } from 'node:net';
import { netModule } from '../src/builtins.js';
import { fstatSync } from 'node:fs';
import type { OneShotForker, Transport } from './types.js';
import type { Peer } from '../src/proxy/conn.js';
import { unmapIp, isLoopback } from '../src/ip.js';
import { AppError } from '../src/errors.js';

/**
 * A connected TCP socket as a transport (also `pigeon serve`'s connections); `peer`: the client's
 * addresses when not the socket's own (a PROXY header named them).
 */
export function socketTransport(sock: Socket, secure: boolean, peer?: Peer): Transport {
  // small protocol lines both ways: no Nagle delay (a pipelined USER+PASS otherwise stalls 40 ms)
  sock.setNoDelay(true);
  const p = peer ?? { rip: unmapIp(sock.remoteAddress), rport: sock.remotePort ?? 0, lip: unmapIp(sock.localAddress), lport: sock.localPort ?? 0 };
  return {
    stream: sock,
    peer: p,
    local: isLoopback(p.rip),
    canTls: !secure,
  };
}

/** Is fd 0 a socket, the same one as fd 1 (inetd, Postfix spawn)? */
export function stdinIsConnection(): boolean {
  const s0 = fstatSync(0);
  const s1 = fstatSync(1);
  return s0.isSocket() && s0.ino === s1.ino && s0.dev === s1.dev;
}

/** The inherited connection socket (fd 0, also fd 1). */
export function inheritedSocket(forker: string): Socket {
  if (!stdinIsConnection()) throw new AppError('USAGE', `--forker ${forker}: fd 0 is not the connection socket (use --forker stdio)`);
  return new (netModule().Socket)({ fd: 0, readable: true, writable: true });
}

export default {
  kind: 'forker',
  name: 'inetd',
  summary: 'one session on the inherited socket (fd 0), as inetd starts it',
  stdioIsProtocol: true,
  transport: () => socketTransport(inheritedSocket('inetd'), false),
} satisfies OneShotForker;
