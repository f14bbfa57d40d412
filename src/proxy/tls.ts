/**
 * NAME        src/proxy/tls — client-facing TLS: handshake deadline and ALPN, one policy for
 *             implicit TLS (imaps/pop3s in `serve`, `--forker inetd --tls`) and STARTTLS/STLS
 * DESCRIPTION A handshake must finish within limits.tls_handshake_timeout_s (default 15 s) from
 *             the moment the connection arrived — an absolute deadline, not an idle timer, so a
 *             client that trickles its ClientHello is cut as surely as one that sends nothing.
 *             A client that offers ALPN must offer this port's protocol (`imap` or `pop3`, the
 *             IANA ALPN ids): a ClientHello whose list holds only foreign protocols (`http/1.1`,
 *             `h2`, the other mail protocol) is refused during the handshake with the
 *             no_application_protocol alert (cross-protocol attacks). No ALPN at all is fine.
 * DIAGNOSTICS One log line per failed handshake: `Disconnected (TLS handshaking: REASON)`.
 * SECURITY    The raw socket of a failed or overdue handshake is destroyed: it holds no
 *             descriptor past the deadline.
 */
import type { Server as TlsServer, TLSSocket } from 'node:tls';
import type { Socket } from 'node:net';
import type { Instance } from '../instance.js';
import type { Logger } from '../log.js';
import { unmapIp } from '../ip.js';

export type MailProtocol = 'imap' | 'pop3';

/** The handshake deadline of this instance, in milliseconds. */
export function handshakeTimeoutMs(instance: Instance): number {
  return instance.config.limits.tls_handshake_timeout_s * 1000;
}

/** Node's ALPNCallback: select `protocol` when offered, refuse a list without it. */
export function alpnCallback(protocol: MailProtocol): (arg: { servername: string; protocols: string[] }) => string | undefined {
  return ({ protocols }) => (protocols.includes(protocol) ? protocol : undefined);
}

/** The options of an implicit-TLS server for `protocol` (certificate and key given by the caller). */
export function implicitTlsOptions(instance: Instance, protocol: MailProtocol, files: { cert: Buffer; key: Buffer }) {
  return {
    ...files,
    minVersion: 'TLSv1.2' as const,
    // Node's own (idle) timer only backs up guardHandshakes' absolute deadline
    handshakeTimeout: handshakeTimeoutMs(instance) + 1000,
    ALPNCallback: alpnCallback(protocol),
  };
}

/**
 * Hold every connection of an implicit-TLS server to the handshake deadline (read from
 * `current()` at each connection, so a reload applies), log each failed handshake once, and
 * destroy its socket. Node's own `handshakeTimeout` only reports (tlsClientError) and restarts
 * with every byte received. `ripOf`: the client's address for the log (behind a PROXY header,
 * the one the header named).
 */
export function guardHandshakes(server: TlsServer, protocol: MailProtocol, current: () => { instance: Instance; log: Logger }, ripOf: (raw: Socket) => string = (raw) => unmapIp(raw.remoteAddress)): void {
  const pending = new Map<string, { timer: NodeJS.Timeout; raw: Socket }>();
  const key = (s: { remoteAddress?: string | undefined; remotePort?: number | undefined }): string => `${s.remoteAddress ?? ''}|${s.remotePort ?? 0}`;
  const failed = (rip: string, why: string): void => {
    current().log.log('info', `${protocol}-login`, `Disconnected (TLS handshaking: ${why}):`, { rip });
  };
  server.on('connection', (raw: Socket) => {
    const k = key(raw);
    const timer = setTimeout(() => {
      pending.delete(k);
      failed(ripOf(raw), `no handshake within ${current().instance.config.limits.tls_handshake_timeout_s} s`);
      raw.destroy();
    }, handshakeTimeoutMs(current().instance));
    pending.set(k, { timer, raw });
    raw.once('close', () => {
      const p = pending.get(k);
      if (p && p.raw === raw) {
        clearTimeout(p.timer);
        pending.delete(k);
      }
    });
  });
  server.on('secureConnection', (s: TLSSocket) => {
    const p = pending.get(key(s));
    if (p) {
      clearTimeout(p.timer);
      pending.delete(key(s));
    }
  });
  server.on('tlsClientError', (e: Error, s: TLSSocket) => {
    const p = pending.get(key(s));
    if (p) {
      clearTimeout(p.timer);
      pending.delete(key(s));
      failed(ripOf(p.raw), e.message);
    }
    s.destroy();
  });
}
