/**
 * NAME        forkers/inetd — one session on the socket inherited as fd 0
 * SYNOPSIS    inetd.conf: 127.0.0.1:143 stream tcp nowait.2000 mail /usr/local/bin/pigeon pigeon -c /etc/pigeon imap --forker inetd
 *             (also Postfix spawn(8): see forkers/postfix.ts)
 * DESCRIPTION fds 0, 1 and 2 are the client socket: peer addresses come from it, and nothing but
 *             protocol is ever written to stdout or stderr (logs go to log.file or syslog).
 *             `--tls` makes it an implicit-TLS port (imaps/pop3s).
 *             Each process is one client of the node state service (src/anvil), which the first
 *             of them starts: limits and failure delays count across processes
 *             (src/commands/proxy.ts takes the connection's slot before the greeting).
 */
import { Socket } from 'node:net';
import { ClientConn, unmap, isLoopback } from '../src/proxy/conn.js';
import type { OneShotForker } from './types.js';

export function socketConn(sock: Socket, secure: boolean): ClientConn {
  // small protocol lines both ways: no Nagle delay (a pipelined USER+PASS otherwise stalls 40 ms)
  sock.setNoDelay(true);
  const rip = unmap(sock.remoteAddress);
  return new ClientConn({
    input: sock,
    peer: { rip, rport: sock.remotePort ?? 0, lip: unmap(sock.localAddress), lport: sock.localPort ?? 0 },
    secure,
    local: isLoopback(rip),
    canTls: !secure,
  });
}

export default {
  kind: 'forker',
  name: 'inetd',
  summary: 'one session on the inherited socket (fd 0), as inetd starts it',
  stdioIsProtocol: true,
  connection(): ClientConn {
    const sock = new Socket({ fd: 0, readable: true, writable: true });
    return socketConn(sock, false);
  },
} satisfies OneShotForker;
