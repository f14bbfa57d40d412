/**
 * NAME        backends/types — the contract of a backend: where an authenticated session goes
 * DESCRIPTION A backend takes a session after the proxy authenticated it and returns a running
 *             session: the first bytes the client must see (`<tag> OK [CAPABILITY …] Logged in`
 *             or `+OK Logged in.`) and the two byte streams the relay (src/proxy/relay.ts) joins
 *             with the client — or, handed off, the client socket itself. It never authenticates.
 *             `serves: 'local'`: it starts the user's own server on this node (dovecot, courier;
 *             the names `imap.backend` / `pop3.backend` accept). `serves: 'remote'`: it reaches
 *             the node that holds the mailbox (peer: the router uses it when the mailbox lives on
 *             another node). Registered by name in backends/registry.ts (or named in pigeon.yaml
 *             `modules.backend`). A backend's node-local settings are its own section of
 *             pigeon.yaml (`section`: the dovecot: and courier: binary paths), parsed by it.
 *             `create` runs once per process with what the process shares (BackendContext).
 * DIAGNOSTICS A start that fails throws AppError BACKEND_START / BACKEND_TIMEOUT /
 *             BACKEND_PROTOCOL (`backendError`), PEER_UNAVAILABLE / PEER_REFUSED, or any AppError:
 *             its message goes to the log (`Backend failure: start-failed: …`), the client gets
 *             `NO [UNAVAILABLE]` / `-ERR [SYS/TEMP]`.
 */
import type { ChildProcess } from 'node:child_process';
import type { Duplex, Readable, Writable } from 'node:stream';
import { accessSync, statSync, constants } from 'node:fs';
import { z } from 'zod';
import type { Allocation, Store } from '../src/store.js';
import type { MailUser } from '../src/mailuser.js';
import type { Instance } from '../src/instance.js';
import type { NodeDirectory } from '../src/nodes.js';
import type { ModuleBase, ResolvedUser } from '../src/modules.js';
import type { Peer } from '../src/proxy/conn.js';
import type { SettingsDecl } from '../src/settings.js';
import { AppError } from '../src/errors.js';
import { LineBuffer } from '../src/lines.js';
import { RELAY_GRACE_MS } from '../src/limits.js';
import type { Spawned, SpawnedEnd, Spawner } from '../src/proxy/spawner.js';

export type MailProtocol = 'imap' | 'pop3';

/** What a process shares with its backends (given once, to `create`). */
export interface BackendContext {
  readonly instance: Instance;
  readonly store: Store;
  /** the cluster's nodes (a cached view; the daemon refreshes it) */
  readonly nodes: NodeDirectory;
  readonly mailUser: MailUser;
  /** a long-running daemon (`pigeon serve`): may keep warm resources (spare peer links) */
  readonly daemon: boolean;
  /**
   * `pigeon serve` workers: the spawner process (src/proxy/spawner.ts) that starts handed-off
   * backends on the client socket, so the worker never forks; absent in one-shot processes
   * (inetd, Postfix spawn, stdio: one session each), which start their backend themselves
   */
  readonly spawner?: Spawner;
}

export interface BackendRequest {
  readonly protocol: MailProtocol;
  /** the user and the effective configuration from the login's one read */
  readonly user: ResolvedUser;
  readonly address: string;
  /** the node that holds the mailbox (this node for a local backend) */
  readonly node: string;
  /** the mailbox on this node, for a local backend (null when it lives on another node) */
  readonly allocation: Allocation | null;
  readonly client: { readonly peer: Peer; readonly secure: boolean };
  readonly sessionId: string;
  /** IMAP: the tag of the client's LOGIN/AUTHENTICATE, answered by the backend itself */
  readonly tag: string | null;
  /** the user's effective Maildir++ quota in bytes (mailstore.quota), 0 = unlimited */
  readonly quota: number;
  /**
   * Plain-TCP client socket to give to the backend as its stdin/stdout (no copy), with the bytes
   * the proxy already read after the login command; null = relay. (For a TLS client it is one end
   * of a local socket pair, which the router closes once start() has resolved: the backend's
   * process holds its own copy by then.)
   */
  readonly handoff: { readonly socket: Duplex; readonly input: Buffer } | null;
  /** where the backend's own log lines go */
  readonly logLine: (line: string) => void;
  /**
   * The client's login, as the bytes it sent: given to an `external` backend only (it logs in
   * to the server that holds the mailbox with them), never to any other; never logged.
   */
  readonly credentials?: { readonly user: Uint8Array; readonly password: Uint8Array };
}

/** How a backend session ended. */
export interface BackendEnd {
  /** the child's exit code, when it was one */
  readonly exit: number | null;
  /** a handed-off backend that died without a word to the client: the proxy's last line to it */
  readonly lastWords?: string;
  /** the connection to the backend broke while the client was still there (logged as a warning) */
  readonly lost?: string;
}

export interface BackendSession {
  /**
   * bytes to send to the client before relaying (the backend's tagged OK, or +OK); empty when
   * handedOff: then start() wrote what the client had to see first before the backend got the socket
   */
  readonly greeting: Buffer;
  /** the backend owns the client socket: nothing to relay, wait for `ended` */
  readonly handedOff: boolean;
  /** client → backend bytes (unused when handed off) */
  readonly input: Writable;
  /** backend → client bytes (unused when handed off) */
  readonly output: Readable;
  /** resolves once the backend is gone (the child exited, the link closed) */
  readonly ended: Promise<BackendEnd>;
  /**
   * Handed off through the spawner: the proxy's copy of the client socket is closed already (the
   * child and the spawner hold theirs; the spawner says the last words): keep nothing of it
   */
  readonly releasedClient?: true;
  /** the client stopped sending: let the backend see EOF, and make sure it goes */
  clientEnded(): void;
  /** end it now (the user's mailbox is being moved, shutdown) */
  stop(): void;
}

export interface BackendInstance {
  /**
   * Can this backend take the plain client socket itself, given the bytes the proxy already read
   * after the login command? false = the router relays.
   */
  acceptsHandoff(protocol: MailProtocol, input: Buffer): boolean;
  start(req: BackendRequest): Promise<BackendSession>;
}

/** A backend's section of pigeon.yaml (node-local settings such as binary paths). */
export interface BackendSection<C> {
  /** the top-level key */
  readonly key: string;
  /** its value in the merged files (undefined when absent), defaults applied; throws an Error whose message starts with the key below the section (`imap: …`) */
  parse(raw: unknown): C;
  /** the commented YAML `pigeon init` writes for it (from `key:` on) */
  template(): string;
}

/** How `pigeon config test` checks that a local backend's binary can start (no user, no mailbox). */
export interface BinaryProbe<C> {
  /** the pigeon.yaml key of this binary's path */
  readonly setting: string;
  /** the path, from the backend's parsed section */
  path(config: C): string;
  /** run it with these arguments (empty environment, stdin /dev/null, cwd /, as the mail user) ... */
  readonly args: readonly string[];
  /** ... and what it prints (stdout and stderr) must match this */
  readonly expect: RegExp;
  /** what the binary is, for messages (with the Debian package) */
  readonly what: string;
}

export interface Backend<C = unknown> extends ModuleBase<'backend'> {
  readonly serves: 'local' | 'remote';
  /** the mailbox formats a local backend serves (absent: every one); `config set` warns before a user is switched to one that cannot serve their mailbox */
  readonly formats?: readonly Allocation['format'][];
  readonly section: BackendSection<C> | null;
  /**
   * The mailbox lives on a server outside PigeonDeliver (upstream): the router allocates nothing
   * and never forwards to another node; the backend gets the client's credentials
   * (BackendRequest.credentials) and may refuse the login (AppError AUTH_FAILED: answered as a
   * wrong password). It has no binary to probe.
   */
  readonly external?: true;
  /** its per-user settings (`module.key` rows), when it has any: part of the settings catalog (src/catalog.ts) */
  readonly settings?: SettingsDecl;
  /** local backends: how `pigeon config test` checks their binaries, per protocol (null: nothing to check) */
  readonly probe: Readonly<Record<MailProtocol, BinaryProbe<C>>> | null;
  create(config: C, ctx: BackendContext): BackendInstance;
}

/** A backend start that failed, in the categories the log names (Dovecot's proxy wording). */
export function backendError(kind: 'start-failed' | 'timeout' | 'protocol', detail: string): AppError {
  return new AppError(kind === 'timeout' ? 'BACKEND_TIMEOUT' : kind === 'protocol' ? 'BACKEND_PROTOCOL' : 'BACKEND_START', `${kind}: ${detail}`);
}

/** Client data for a backend's environment: refused when it holds CR, LF or NUL. */
export function safeParam(v: string): string {
  if (/[\r\n\0]/.test(v)) throw backendError('protocol', 'refusing CR/LF/NUL in backend parameters');
  return v;
}

/** The mailbox a local backend serves; start-failed when the session has none here. */
export function localMailbox(req: BackendRequest): Allocation {
  if (req.allocation === null) throw backendError('start-failed', `mailbox of ${req.address} is on node ${req.node}, not here`);
  return req.allocation;
}

/** A backend's stderr, line by line, into the proxy's log (`suffix` appended to each line). */
export function pipeStderr(req: BackendRequest, child: ChildProcess, suffix = ''): void {
  const lines = new LineBuffer();
  child.stderr?.on('data', (c: Buffer) => {
    lines.push(c);
    for (let r = lines.line(); r !== null; r = lines.line()) if (r.kind === 'line') req.logLine(`${r.line.toString('utf8')}${suffix}`);
  });
}

/**
 * A session on a child process: stdin/stdout are the streams to relay; when the client stops
 * sending the child sees EOF and gets RELAY_GRACE_MS to leave before SIGTERM. `lastWords`: what
 * the client gets from the proxy when a handed-off child exits with that code without a word.
 */
export function childSession(child: ChildProcess, greeting: Buffer, handedOff: boolean, lastWords?: (code: number | null) => string | undefined): BackendSession {
  const ended = new Promise<BackendEnd>((resolve) => {
    const done = (code: number | null): void => {
      const words = lastWords?.(code);
      resolve({ exit: code, ...(words !== undefined ? { lastWords: words } : {}) });
    };
    if (child.exitCode !== null || child.signalCode !== null) done(child.exitCode);
    else child.once('exit', (code) => done(code));
  });
  const { stdin, stdout } = child;
  stdin?.on('error', () => undefined);
  return {
    greeting,
    handedOff,
    input: stdin as Writable,
    output: stdout as Readable,
    ended,
    clientEnded() {
      if (stdin && !stdin.writableEnded) stdin.destroy();
      if (child.exitCode === null && child.signalCode === null) {
        const t = setTimeout(() => child.kill('SIGTERM'), RELAY_GRACE_MS);
        t.unref();
        child.once('exit', () => clearTimeout(t));
      }
    },
    stop() {
      child.kill('SIGTERM');
    },
  };
}

const EMPTY = Buffer.alloc(0);

/** A spawned child's end as a backend session's (module level: no closure per session). */
function spawnedEnd(e: SpawnedEnd): BackendEnd {
  return e.lost !== undefined ? { exit: e.code, lost: e.lost } : { exit: e.code };
}

/**
 * A handed-off session started by the spawner (src/proxy/spawner.ts): the child owns the client
 * socket, the spawner its exit and last words; the proxy keeps this for the session's life: one
 * object with its methods on the prototype (no closures per session: idle memory).
 */
class SpawnedSession implements BackendSession {
  readonly greeting = EMPTY;
  readonly handedOff = true;
  readonly releasedClient = true;
  readonly ended: Promise<BackendEnd>;
  private readonly child: Spawned;

  constructor(child: Spawned) {
    this.child = child;
    this.ended = child.ended.then(spawnedEnd);
  }

  // unused when handed off (as a handed-off child's null stdin/stdout in childSession)
  get input(): Writable {
    return null as unknown as Writable;
  }

  get output(): Readable {
    return null as unknown as Readable;
  }

  clientEnded(): void {
    this.child.kill('SIGTERM');
  }

  stop(): void {
    this.child.kill('SIGTERM');
  }
}

export function spawnedSession(child: Spawned): BackendSession {
  return new SpawnedSession(child);
}

/** Start a handed-off backend through the spawner; a failure is start-failed, naming `what`. */
export async function spawnHandedOff(spawner: Spawner, what: string, o: Parameters<Spawner['spawn']>[0]): Promise<BackendSession> {
  try {
    return spawnedSession(await spawner.spawn(o));
  } catch (e) {
    throw backendError('start-failed', `cannot start ${what}: ${e instanceof Error ? e.message : String(e)}`);
  }
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
      const t = setTimeout(() => reject(backendError('timeout', `the client did not take our ${first.length > 0 ? 'login answer' : 'replies'} within ${timeoutMs / 1000}s`)), timeoutMs);
      socket.write(first, (e) => {
        clearTimeout(t);
        if (e) reject(backendError('start-failed', `client connection lost before the hand-off: ${e.message}`));
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

/**
 * Throw start-failed unless `bin` is an executable file: checked before anything is said to the
 * client on the backend's behalf (a hand-off cannot take back a `+OK Logged in.`).
 */
export function checkExecutable(bin: string, what: string): void {
  let code: string | null = null;
  try {
    accessSync(bin, constants.X_OK);
    if (!statSync(bin).isFile()) code = 'EISDIR';
  } catch (e) {
    code = (e as NodeJS.ErrnoException).code ?? 'error';
  }
  if (code !== null) throw backendError('start-failed', `cannot start ${what} (${bin}): ${code}`);
}

/** A path setting of a section: non-empty, no NUL or newline. */
export const pathSetting = z.string().min(1).refine((s) => !/[\0\n]/.test(s), 'no NUL or newline in paths');

/**
 * A section's parse() from a zod schema: defaults applied, an error names the key below the
 * section. zod's plain parser (jitless): a section is parsed a few times per process, where the
 * parser zod would otherwise write and compile for it (new Function) costs more than it saves
 * (src/instance.ts PARSE_ONCE).
 */
export function sectionParser<S extends z.ZodType>(schema: S): (raw: unknown) => z.output<S> {
  return (raw) => {
    const r = schema.safeParse(raw, { jitless: true });
    if (r.success) return r.data;
    const i = r.error.issues[0];
    const path = i?.code === 'unrecognized_keys' ? [...i.path, i.keys[0] ?? ''] : (i?.path ?? []);
    const msg = i?.code === 'unrecognized_keys' ? 'unknown key' : (i?.message ?? 'invalid');
    throw new Error(`${path.map(String).join('.')}${path.length > 0 ? ': ' : ''}${msg}`);
  };
}
