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
import type { FileConfig } from '../src/instance.js';

export interface BackendRequest {
  readonly protocol: 'imap' | 'pop3';
  readonly address: string;
  readonly allocation: Allocation;
  readonly mailUser: MailUser;
  readonly peer: Peer;
  readonly sessionId: string;
  /** IMAP: the tag of the client's LOGIN/AUTHENTICATE, answered by the backend itself */
  readonly tag: string | null;
  /** this backend's binary paths, from its own section of pigeon.yaml (Backend.binaries) */
  readonly binaries: BackendBinaries;
  /** the user's effective Maildir++ quota in bytes (mailstore.quota), 0 = unlimited */
  readonly quota: number;
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

export interface BackendBinaries {
  readonly imap: string;
  readonly pop3: string;
}

export interface Backend {
  readonly kind: 'backend';
  readonly name: string;
  readonly summary: string;
  /** the binary paths of this backend, read from its own section of the node's file config */
  binaries(config: FileConfig): BackendBinaries;
  /**
   * Can this backend take the plain client socket itself, given the bytes the proxy already read
   * after the login command? false = the router relays through pipes.
   */
  acceptsHandoff(protocol: 'imap' | 'pop3', input: Buffer): boolean;
  start(req: BackendRequest): Promise<BackendSession>;
}

export class BackendError extends Error {
  readonly failure: BackendFailure;
  constructor(failure: BackendFailure) {
    super(`${failure.kind}: ${failure.detail}`);
    this.failure = failure;
  }
}

/** A backend's stderr, line by line, into the proxy's log (`suffix` appended to each line). */
export function pipeStderr(req: BackendRequest, child: ChildProcess, suffix = ''): void {
  let errBuf = '';
  child.stderr?.setEncoding('utf8');
  child.stderr?.on('data', (s: string) => {
    errBuf += s;
    let nl;
    while ((nl = errBuf.indexOf('\n')) >= 0) {
      req.logLine(`${errBuf.slice(0, nl)}${suffix}`);
      errBuf = errBuf.slice(nl + 1);
    }
  });
}
