/**
 * NAME        forkers/types — the contract of a forker: how a session or a server starts
 * DESCRIPTION A forker turns what the process was given (a pipe pair, an inherited socket, a
 *             listening port) into client connections. A one-shot forker (stdio, inetd, postfix)
 *             produces the single `Transport` of its process, which the IMAP/POP3 proxy
 *             (src/commands/proxy.ts) and LMTP (src/commands/delivery.ts) both run on; `listen`
 *             is the standalone daemon. Registered by name in forkers/registry.ts: the CLI's
 *             `--forker` choices are its one-shot forkers. Forkers are always built in: they run
 *             before the configuration is read (a forker named in pigeon.yaml could not choose
 *             how the process starts).
 *             The core never imports `net`; forkers do.
 */
import type { Duplex } from 'node:stream';
import type { ModuleBase } from '../src/modules.js';
import type { Peer } from '../src/proxy/conn.js';

/** One client connection as a forker hands it over. */
export interface Transport {
  /** the connection: what the client sends, and where the replies go (half-open: the client may stop sending and still read) */
  readonly stream: Duplex;
  readonly peer: Peer;
  /** loopback or a local pipe: plaintext logins are allowed by default (login.plaintext = loopback) */
  readonly local: boolean;
  /** a socket that STARTTLS can wrap (not a pipe) */
  readonly canTls: boolean;
}

export interface Forker extends ModuleBase<'forker'> {
  /** true when stdout/stderr carry the protocol (logs must go elsewhere) */
  readonly stdioIsProtocol: boolean;
}

export interface OneShotForker extends Forker {
  /** the single connection of this process; throws AppError USAGE when the process was not started that way */
  transport(): Transport;
}

export function isOneShot(f: Forker): f is OneShotForker {
  return typeof (f as Partial<OneShotForker>).transport === 'function';
}
