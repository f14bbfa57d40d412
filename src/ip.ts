/**
 * NAME        src/ip — client addresses, parsed (never split as text)
 * DESCRIPTION `clientKey` is the key the auth-failure penalty counts under: an IPv4 address as
 *             itself, an IPv6 address by its /48 prefix (Dovecot's anvil does the same: one site
 *             gets a /48), an IPv4-mapped IPv6 address as the IPv4 address. The prefix is taken
 *             from the parsed 128-bit address, so `2001:db8::1`, `2001:db8::2` and
 *             `2001:db8:0:1::5` share one key and `2001:db9::1` has its own.
 *             `NetworkList` holds a CIDR list (limits.trusted_networks) and answers membership.
 *             Parsing is ipaddr.js (well-kept, the parser Express uses); node's net.BlockList
 *             answers membership but cannot give a prefix.
 * SECURITY    Anything that does not parse as an address keys as itself and matches no network.
 */
import { createRequire } from 'node:module';
import type * as Ipaddr from 'ipaddr.js';

// ipaddr.js is CommonJS: loaded with require(), not an ESM import, which costs node 20 ≈ 35 ms
// of CPU for this one file (perf stat task-clock, `import` vs `require` of it) in every process
// that reads pigeon.yaml, one `pigeon deliver` per message included
const ipaddr = createRequire(import.meta.url)('ipaddr.js') as typeof Ipaddr;

type Addr = Ipaddr.IPv4 | Ipaddr.IPv6;

// `::a.b.c.d` is the (deprecated) IPv4-compatible address ::/96, which is how inet_ntop prints
// one; ipaddr.js reads it as the IPv4-mapped ::ffff:a.b.c.d, so `::127.0.0.1` would be loopback
const IPV4_COMPATIBLE = /^::(\d{1,3}(?:\.\d{1,3}){3})$/;

// An IPv4 address as node gives a socket's: four decimal octets without leading zeros. Such text
// is its own canonical form and penalty key, so the functions below answer it without ipaddr.js
// (parse + toString 1.7 µs in a warm loop, the test 0.05; a few times per connection, ≈ 7 kB of
// garbage per login in a serve worker's allocation profile); anything else is parsed.
const CANONICAL_V4 = /^(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)$/;

/** The address, with an IPv4-mapped IPv6 address turned into IPv4; null when it does not parse. */
export function parseIp(text: string): Addr | null {
  if (!ipaddr.isValid(text)) return null;
  let a: Addr;
  try {
    const compat = IPV4_COMPATIBLE.exec(text);
    if (compat?.[1] !== undefined) {
      const o = ipaddr.IPv4.parse(compat[1]).octets;
      return new ipaddr.IPv6([0, 0, 0, 0, 0, 0, ((o[0] ?? 0) << 8) | (o[1] ?? 0), ((o[2] ?? 0) << 8) | (o[3] ?? 0)]);
    }
    a = ipaddr.parse(text);
  } catch {
    return null;
  }
  if (a.kind() === 'ipv6' && (a as Ipaddr.IPv6).isIPv4MappedAddress()) return (a as Ipaddr.IPv6).toIPv4Address();
  return a;
}

/**
 * A socket's address as the logs and limits use it: parsed, an IPv4-mapped IPv6 address as IPv4
 * (`::ffff:127.0.0.1` and `::ffff:7f00:1` alike), IPv6 in its canonical form; '' when there is
 * none (a unix socket or a pipe).
 */
export function unmapIp(ip: string | undefined): string {
  if (!ip) return '';
  return canonicalIp(ip);
}

/**
 * Is the client on this host? A loopback address (127.0.0.0/8, ::1 however written, either of them
 * IPv4-mapped), or no address at all (a unix socket or a pipe). Text that is no address is not.
 */
export function isLoopback(ip: string): boolean {
  if (ip === '') return true;
  if (CANONICAL_V4.test(ip)) return ip.startsWith('127.');
  return parseIp(ip)?.range() === 'loopback';
}

/** Canonical text of an address (IPv4-mapped unmapped), or the input when it is no address. */
export function canonicalIp(text: string): string {
  if (CANONICAL_V4.test(text)) return text;
  return parseIp(text)?.toString() ?? text;
}

/** IPv6 prefix the penalty counts under (LIMITS.md: per IP, /48). */
export const IPV6_PENALTY_PREFIX = 48;

/** The penalty key of a client address: IPv4 itself, IPv6 its /48 network. */
export function clientKey(text: string): string {
  if (CANONICAL_V4.test(text)) return text;
  const a = parseIp(text);
  if (a === null) return text;
  if (a.kind() === 'ipv4') return a.toString();
  const parts = (a as Ipaddr.IPv6).parts.slice();
  const keep = IPV6_PENALTY_PREFIX;
  for (let i = 0; i < 8; i++) {
    const bits = Math.max(0, Math.min(16, keep - i * 16));
    const mask = bits === 0 ? 0 : (0xffff << (16 - bits)) & 0xffff;
    parts[i] = (parts[i] ?? 0) & mask;
  }
  return `${new ipaddr.IPv6(parts).toString()}/${keep}`;
}

/** Parse `ADDR/BITS` or a single address (a /32 or /128); throws with a readable message. */
export function parseNetwork(text: string): [Addr, number] {
  const slash = text.indexOf('/');
  if (slash < 0) {
    const a = parseIp(text);
    if (a === null) throw new Error(`${JSON.stringify(text)} is not an IP address or CIDR network`);
    return [a, a.kind() === 'ipv4' ? 32 : 128];
  }
  if (!ipaddr.isValidCIDR(text)) throw new Error(`${JSON.stringify(text)} is not a CIDR network (ADDR/BITS)`);
  const [a, bits] = ipaddr.parseCIDR(text);
  if (a.kind() === 'ipv6' && (a as Ipaddr.IPv6).isIPv4MappedAddress() && bits >= 96) return [(a as Ipaddr.IPv6).toIPv4Address(), bits - 96];
  return [a, bits];
}

export class NetworkList {
  private readonly nets: readonly [Addr, number][];
  constructor(cidrs: readonly string[]) {
    this.nets = cidrs.map(parseNetwork);
  }

  /** true when the address is inside one of the networks */
  has(ip: string): boolean {
    const a = parseIp(ip);
    if (a === null) return false;
    return this.nets.some(([net, bits]) => net.kind() === a.kind() && a.match(net, bits));
  }
}
