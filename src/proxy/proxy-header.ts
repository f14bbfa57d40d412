/**
 * NAME        src/proxy/proxy-header — the PROXY protocol (v1 and v2) in front of a listener
 * SYNOPSIS    pigeon.yaml: listen: ["imap=0.0.0.0:143,proxy"], limits.trusted_proxies: [10.0.0.5/32]
 *             (also `--listen imaps=0.0.0.0:993,proxy` at init; any of imap imaps pop3 pop3s lmtp)
 * DESCRIPTION On a listener marked `,proxy` every connection must start with a PROXY header
 *             (HAProxy `send-proxy` or `send-proxy-v2`) naming the client's real address; on an
 *             implicit-TLS port it comes before the TLS handshake. The address it names then
 *             stands for the client everywhere: logs (`rip=`), the failure delay, per-IP limits,
 *             the `IP` given to Dovecot. The header is framed here (v1: one line of at most
 *             PROXY_V1_MAX bytes; v2: 16 bytes and the length they give, at most PROXY_V2_MAX in
 *             all) and its bytes are parsed by proxy-protocol-js; the bytes after it are put back
 *             into the socket for the session. A v2 LOCAL command (a health check) or v1 UNKNOWN
 *             keeps the connection's own addresses.
 * CONFIG      limits.trusted_proxies (CIDR list; empty: every `,proxy` connection is refused),
 *             limits.proxy_header_timeout_s (default 3).
 * DIAGNOSTICS One log line per refused connection (`Connection refused (PROXY: ...)`), then the
 *             socket is closed without a word: the far end is a proxy, not a mail client.
 * SECURITY    Only a connection from limits.trusted_proxies may name another address; any other
 *             is closed before a byte of it is read. A connection over a unix socket is trusted
 *             (its file's permissions decide who connects). Reads are bounded in size and time.
 */
import { isIP, type Socket } from 'node:net';
import ipaddr from 'ipaddr.js';
import { V1ProxyProtocol, V2ProxyProtocol, Command, IPv4ProxyAddress, IPv6ProxyAddress } from 'proxy-protocol-js';
import { PROXY_V1_MAX, PROXY_V2_MAX } from '../limits.js';
import { NetworkList, unmapIp } from '../ip.js';
import type { Logger } from '../log.js';
import type { Peer } from './conn.js';

const V2_SIGNATURE = Buffer.from([0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a]);
const V1_SIGNATURE = Buffer.from('PROXY ', 'latin1');

/** What the first bytes of a connection said. `peer` null: keep the connection's own addresses (LOCAL, UNKNOWN). */
export type ProxyHeaderResult = { readonly ok: true; readonly peer: Peer | null } | { readonly ok: false; readonly why: string };

/** Is `b` (so far) a prefix of `sig`, or does it start with it? */
function startsLike(b: Buffer, sig: Buffer): boolean {
  const n = Math.min(b.length, sig.length);
  return b.subarray(0, n).equals(sig.subarray(0, n));
}

type Framed = { kind: 'more' } | { kind: 'bad'; why: string } | { kind: 'header'; version: 1 | 2; length: number };

/** How long the header at the start of `b` is, whether more bytes are needed, or why it is no header. */
export function frameProxyHeader(b: Buffer): Framed {
  if (b.length === 0) return { kind: 'more' };
  if (startsLike(b, V2_SIGNATURE)) {
    if (b.length < 16) return { kind: 'more' };
    const length = 16 + b.readUInt16BE(14);
    if (length > PROXY_V2_MAX) return { kind: 'bad', why: `v2 header of ${length} bytes (at most ${PROXY_V2_MAX})` };
    return b.length < length ? { kind: 'more' } : { kind: 'header', version: 2, length };
  }
  if (startsLike(b, V1_SIGNATURE)) {
    const end = b.subarray(0, PROXY_V1_MAX).indexOf('\r\n');
    if (end >= 0) return { kind: 'header', version: 1, length: end + 2 };
    return b.length >= PROXY_V1_MAX ? { kind: 'bad', why: `v1 header longer than ${PROXY_V1_MAX} bytes` } : { kind: 'more' };
  }
  return { kind: 'bad', why: 'no PROXY header' };
}

function port(n: number): boolean {
  return Number.isInteger(n) && n >= 0 && n <= 65535;
}

/** Parse one framed header (exactly its bytes). */
export function parseProxyHeader(header: Buffer, version: 1 | 2): ProxyHeaderResult {
  try {
    if (version === 1) {
      const text = header.toString('latin1');
      if (/^PROXY UNKNOWN[^\r\n]*\r\n$/.test(text)) return { ok: true, peer: null };
      const p = V1ProxyProtocol.parse(text);
      const family = p.inetProtocol === 'TCP4' ? 4 : 6;
      if (isIP(p.source.ipAddress) !== family || isIP(p.destination.ipAddress) !== family || !port(p.source.port) || !port(p.destination.port) || (p.data ?? '') !== '') {
        return { ok: false, why: 'malformed v1 header' };
      }
      return { ok: true, peer: { rip: unmapIp(p.source.ipAddress), rport: p.source.port, lip: unmapIp(p.destination.ipAddress), lport: p.destination.port } };
    }
    if ((header[12] ?? 0) >> 4 !== 2) return { ok: false, why: 'unknown PROXY header version' };
    const p = V2ProxyProtocol.parse(header);
    if (p.command === Command.LOCAL) return { ok: true, peer: null };
    const a = p.proxyAddress;
    if (a instanceof IPv4ProxyAddress || a instanceof IPv6ProxyAddress) {
      const text = (octets: readonly number[]): string => unmapIp(ipaddr.fromByteArray([...octets]).toString());
      return { ok: true, peer: { rip: text(a.sourceAddress.address), rport: a.sourcePort, lip: text(a.destinationAddress.address), lport: a.destinationPort } };
    }
    // AF_UNIX or AF_UNSPEC: nothing that names a client address
    return { ok: true, peer: null };
  } catch (e) {
    return { ok: false, why: `malformed v${version} header${e instanceof Error || (typeof e === 'object' && e !== null && 'message' in e) ? `: ${String((e as { message: unknown }).message)}` : ''}` };
  }
}

/**
 * Read the PROXY header from a paused socket, within `timeoutMs`. The bytes after the header are
 * put back (unshift) and the socket is left paused for whoever reads next.
 */
export function readProxyHeader(sock: Socket, timeoutMs: number): Promise<ProxyHeaderResult> {
  return new Promise((resolve) => {
    let buf: Buffer = Buffer.alloc(0);
    let done = false;
    const finish = (r: ProxyHeaderResult, rest: Buffer | null): void => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      sock.off('data', onData);
      sock.off('end', onEnd);
      sock.off('close', onEnd);
      sock.pause();
      if (rest !== null && rest.length > 0) sock.unshift(rest);
      resolve(r);
    };
    const onData = (c: Buffer): void => {
      buf = buf.length === 0 ? c : Buffer.concat([buf, c]);
      const f = frameProxyHeader(buf);
      if (f.kind === 'more') return;
      if (f.kind === 'bad') return finish({ ok: false, why: f.why }, null);
      finish(parseProxyHeader(buf.subarray(0, f.length), f.version), buf.subarray(f.length));
    };
    const onEnd = (): void => finish({ ok: false, why: 'closed before the PROXY header' }, null);
    const timer = setTimeout(() => finish({ ok: false, why: `no PROXY header within ${Math.round(timeoutMs / 1000)} s` }, null), timeoutMs);
    sock.on('data', onData);
    sock.once('end', onEnd);
    sock.once('close', onEnd);
    sock.resume();
  });
}

const proxiesCache = new WeakMap<readonly string[], NetworkList>();

/** limits.trusted_proxies of a configuration, parsed once per (re)load. */
function trustedProxies(cidrs: readonly string[]): NetworkList {
  let n = proxiesCache.get(cidrs);
  if (!n) {
    n = new NetworkList(cidrs);
    proxiesCache.set(cidrs, n);
  }
  return n;
}

/** The socket's own addresses. */
export function socketPeer(sock: Socket): Peer {
  return { rip: unmapIp(sock.remoteAddress), rport: sock.remotePort ?? 0, lip: unmapIp(sock.localAddress), lport: sock.localPort ?? 0 };
}

/**
 * The gate of a `,proxy` listener: refuse a connection that is not from limits.trusted_proxies,
 * read its header, and give the client's real addresses; null when the connection was refused
 * (logged under `service` and destroyed).
 */
export async function passProxyHeader(sock: Socket, limits: { readonly trusted_proxies: readonly string[]; readonly proxy_header_timeout_s: number }, log: Logger, service: string): Promise<Peer | null> {
  const own = socketPeer(sock);
  sock.on('error', () => {});
  // a unix socket has no remote address: its file's permissions decide who connects
  if (own.rip !== '' && !trustedProxies(limits.trusted_proxies).has(own.rip)) {
    log.log('warn', service, 'Connection refused (PROXY: not from limits.trusted_proxies):', { rip: own.rip, lport: own.lport });
    sock.destroy();
    return null;
  }
  const r = await readProxyHeader(sock, limits.proxy_header_timeout_s * 1000);
  if (!r.ok) {
    log.log('warn', service, `Connection refused (PROXY: ${r.why}):`, { proxy: own.rip, lport: own.lport });
    sock.destroy();
    return null;
  }
  return r.peer ?? own;
}
