/**
 * NAME        backends/types — the contract of a local backend (dovecot, courier)
 * DESCRIPTION A backend starts the user's own IMAP/POP3 server already logged in and returns the
 *             running child with the first bytes the client must see (`<tag> OK [CAPABILITY …]
 *             Logged in` or `+OK Logged in.`). It never authenticates anything itself.
 */
import type { ChildProcess } from 'node:child_process';
import type { Duplex } from 'node:stream';
import { accessSync, statSync, constants } from 'node:fs';
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
  /**
   * bytes to send to the client before relaying (the backend's tagged OK, or +OK); empty when
   * handedOff: then start() wrote what the client had to see first before the backend got the socket
   */
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
  /**
   * How `pigeon config test` checks that this node's binary can start, with no user and no
   * mailbox: run it with these arguments (empty environment, stdin /dev/null, cwd /, as the
   * mail user); what it prints (stdout and stderr) must match `expect`. A binary whose libraries
   * do not load, or another program at that path, fails the match.
   */
  readonly probe: Readonly<Record<'imap' | 'pop3', BinaryProbe>>;
}

export interface BinaryProbe {
  /** the pigeon.yaml key of this binary's path */
  readonly setting: string;
  readonly args: readonly string[];
  readonly expect: RegExp;
  /** what the binary is, for messages (with the Debian package) */
  readonly what: string;
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

/**
 * Before a backend is given the client socket itself (hand-off): write `first` (what the client
 * must see before any byte of the backend, e.g. POP3's `+OK Logged in.`; may be empty) and wait
 * until it, and everything written to the socket before it, is in the kernel. Only then may the
 * backend be spawned on the socket: it writes to the same file descriptor, past Node's write
 * queue, so anything still queued there would reach the client after the backend's answers.
 * Returns the bytes the client sent while we waited (Node kept reading the paused socket); the
 * caller must replay them to the backend, or put them back with `socket.unshift()` and relay.
 * Spawn the backend right after this resolves, in the same tick: from then on Node must not read.
 */
export async function prepareHandoff(socket: Duplex, first: Buffer, timeoutMs: number): Promise<Buffer> {
  if (first.length > 0 || socket.writableLength > 0) {
    await new Promise<void>((resolve, reject) => {
      const t = setTimeout(() => reject(new BackendError({ kind: 'timeout', detail: `the client did not take our ${first.length > 0 ? 'login answer' : 'replies'} within ${timeoutMs / 1000}s` })), timeoutMs);
      socket.write(first, (e) => {
        clearTimeout(t);
        if (e) reject(new BackendError({ kind: 'start-failed', detail: `client connection lost before the hand-off: ${e.message}` }));
        else resolve();
      });
    });
  }
  const late: Buffer[] = [];
  for (let c: unknown = socket.read(); c !== null; c = socket.read()) {
    if (Buffer.isBuffer(c)) late.push(c);
  }
  return Buffer.concat(late);
}

/** Most bytes a hand-off replays to the backend (CLIENT_INPUT is one environment string). */
export const HANDOFF_MAX_REPLAY = 64 * 1024;

/**
 * Throw start-failed unless `bin` is an executable file: checked before anything is said to the
 * client on the backend's behalf (a hand-off cannot take back a `+OK Logged in.`).
 */
export function checkExecutable(bin: string, what: string): void {
  try {
    accessSync(bin, constants.X_OK);
    if (!statSync(bin).isFile()) throw Object.assign(new Error('not a file'), { code: 'EISDIR' });
  } catch (e) {
    throw new BackendError({ kind: 'start-failed', detail: `cannot start ${what} (${bin}): ${(e as NodeJS.ErrnoException).code ?? 'error'}` });
  }
}
