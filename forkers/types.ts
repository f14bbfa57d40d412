/**
 * NAME        forkers/types — how a session or a server starts
 * DESCRIPTION A forker turns what the process was given (a pipe pair, an inherited socket, a
 *             listening port) into ClientConns for the protocol sessions. The core never imports
 *             `net`; forkers do.
 */
import type { ClientConn } from '../src/proxy/conn.js';

export interface Forker {
  readonly kind: 'forker';
  readonly name: 'stdio' | 'inetd' | 'postfix' | 'listen';
  readonly summary: string;
  /** true when stdout/stderr carry the protocol (logs must go elsewhere) */
  readonly stdioIsProtocol: boolean;
}

export interface OneShotForker extends Forker {
  /** the single connection of this process */
  connection(): ClientConn;
}
