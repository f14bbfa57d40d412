/**
 * NAME        backends/types — the contract of a local backend (dovecot, courier)
 * DESCRIPTION A backend starts the user's own IMAP/POP3 server already logged in and returns the
 *             running child with the first bytes the client must see (`<tag> OK [CAPABILITY …]
 *             Logged in` or `+OK Logged in.`). It never authenticates anything itself.
 */
import type { ChildProcess } from 'node:child_process';
import type { Allocation } from '../src/store.js';
import type { MailUser } from '../src/mailuser.js';
import type { Peer } from '../src/proxy/conn.js';

export interface BackendRequest {
  readonly protocol: 'imap' | 'pop3';
  readonly address: string;
  readonly allocation: Allocation;
  readonly mailUser: MailUser;
  readonly peer: Peer;
  readonly sessionId: string;
  /** IMAP: the tag of the client's LOGIN/AUTHENTICATE, answered by the backend itself */
  readonly tag: string | null;
  /** binary paths from pigeon.yaml (node-local) */
  readonly binaries: { readonly imap: string; readonly pop3: string };
  /**
   * Plain-TCP client socket to give to the backend as its stdin/stdout (no copy), with the bytes
   * the proxy already read after the login command; null = relay through pipes.
   */
  readonly handoff: { readonly socket: import('node:stream').Duplex; readonly input: Buffer } | null;
  /** where the backend's own log lines go */
  readonly logLine: (line: string) => void;
}

export interface BackendSession {
  readonly child: ChildProcess;
  /** bytes to send to the client before relaying (the backend's tagged OK, or +OK) */
  readonly greeting: Buffer;
  /** the backend owns the client socket: nothing to relay, wait for it to exit */
  readonly handedOff: boolean;
}

export type BackendFailure = { readonly kind: 'start-failed' | 'timeout' | 'protocol'; readonly detail: string };

export interface Backend {
  readonly kind: 'backend';
  readonly name: string;
  readonly summary: string;
  start(req: BackendRequest): Promise<BackendSession>;
}

export class BackendError extends Error {
  readonly failure: BackendFailure;
  constructor(failure: BackendFailure) {
    super(`${failure.kind}: ${failure.detail}`);
    this.failure = failure;
  }
}
