/**
 * NAME        src/anvil/client — how a process of the node reaches the node state service
 * DESCRIPTION One client per process (a serve worker, or a one-shot inetd / Postfix spawn / stdio
 *             session). Connects to RUN_DIR/anvil.sock on first use; when nobody serves it and
 *             this process owns the run directory, starts the service detached
 *             (src/anvil/main.ts; the gpg-agent way) and waits for its `ready`.
 *             If the service cannot be reached at all (run directory unusable, start failed, no
 *             answer within ANVIL_REQUEST_MS), requests are answered by a per-process copy of the
 *             same state (src/anvil/state.ts) and that is logged once; after ANVIL_RETRY_MS the
 *             next request tries again. The records this process holds are mirrored here and put
 *             back into whichever state answers next (service or local), so a reconnect loses no
 *             connection and no session. A limits service that is down never refuses a login.
 *             Events from the service (`end`: a connection evicted or kicked) go to the handler registered
 *             with that connection.
 */
import { connect, type Socket } from 'node:net';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { AnvilState, type ConnLimits, type LoginResult } from './state.js';
import { readLines, encode, parseReply, type Results, type RequestBody, type WireRecord } from './protocol.js';
import { answer } from './answer.js';
import { openRunDir, RunDirError, type RunDir } from './run-dir.js';
import { SOCKET_NAME } from './server.js';
import { hotFlags } from '../hot-flags.js';
import { ANVIL_IDLE_MS, ANVIL_MAX_LINE, ANVIL_REQUEST_MS, ANVIL_RETRY_MS, ANVIL_START_MS } from '../limits.js';

export type ClientLog = (level: 'info' | 'warn' | 'error', msg: string) => void;

export interface AnvilClientOptions {
  readonly runDir: string;
  /** what this process is, for the service's records: worker, inetd, postfix, stdio */
  readonly role: string;
  readonly log: ClientLog;
  /** start the service when none runs (one-shot processes and workers) */
  readonly autostart: boolean;
  /** the started service logs here (log.file), if set */
  readonly logFile?: string | null;
  /** the service's program (default: main.js beside this module) */
  readonly servicePath?: string;
}

export type OpenResult = { admitted: true } | { admitted: false; why: string };

/**
 * Who is told when the service ends a connection (`evicted`, `kicked`): an object (the
 * connection's slot, src/proxy/slots.ts), not a closure per connection: it is kept for the
 * connection's whole life, a handed-off session's included.
 */
export interface EndHandler {
  ended(reason: string): void;
}

interface Pending {
  readonly body: RequestBody;
  readonly resolve: (r: object) => void;
  /** Date.now() by which the answer must have come (ANVIL_REQUEST_MS after the request) */
  readonly due: number;
}

const MAIN = fileURLToPath(new URL('./main.js', import.meta.url));
/** the service's own record owner id in the per-process state */
const SELF = 0;

export class AnvilClient {
  private readonly opts: AnvilClientOptions;
  private sock: Socket | null = null;
  private dir: RunDir | null = null;
  private connecting: Promise<boolean> | null = null;
  private retryAt = 0;
  private downLogged = false;
  private nextId = 1;
  /** the socket whose writes of this tick are being gathered into one (see `call`) */
  private corked: Socket | null = null;
  private readonly pending = new Map<number, Pending>();
  /**
   * One timer watches every pending request (not one timer per request: a login sends four to
   * six): it fires when the oldest is due. Unreferenced while nothing is pending, so it never
   * keeps a one-shot process alive.
   */
  private watchdog: NodeJS.Timeout | null = null;
  private local = new AnvilState();
  /** the records this process holds, as the service should know them */
  private readonly mine = new Map<string, WireRecord>();
  private readonly ends = new Map<string, EndHandler>();
  private nextConn = 1;

  constructor(opts: AnvilClientOptions) {
    this.opts = opts;
  }

  /** true while requests go to the node's service (false: per-process state). */
  get shared(): boolean {
    return this.sock !== null;
  }

  /** A new connection id, unique in this process. */
  connId(): string {
    return String(this.nextConn++);
  }

  // ---- connections

  async open(conn: string, c: { ip: string; proto: string; trusted: boolean }, limits: ConnLimits, onEnd: EndHandler): Promise<OpenResult> {
    this.ends.set(conn, onEnd);
    const r = (await this.call({ op: 'conn.open', conn, ip: c.ip, proto: c.proto, trusted: c.trusted, max_per_ip: limits.perIp, max_total: limits.total })) as Results['conn.open'];
    if (r.admitted) {
      // a request answered later than the connection's end must not resurrect it
      if (this.ends.has(conn)) this.mine.set(conn, { conn, ip: c.ip, proto: c.proto, trusted: c.trusted, state: 'preauth', held: true, user: null, session: null, backend: null, since: Date.now() });
      else void this.call({ op: 'conn.close', conn });
      return { admitted: true };
    }
    this.ends.delete(conn);
    return { admitted: false, why: r.why };
  }

  async login(conn: string, user: string, session: string, maxUserIp: number): Promise<LoginResult> {
    const r = (await this.call({ op: 'conn.login', conn, user, session, max_userip: maxUserIp })) as Results['conn.login'];
    const m = this.mine.get(conn);
    if (r.ok && m) Object.assign(m, { state: 'session', user, session });
    return r;
  }

  async logout(conn: string): Promise<void> {
    const m = this.mine.get(conn);
    if (m) Object.assign(m, { state: 'preauth', user: null, session: null, backend: null });
    await this.call({ op: 'conn.logout', conn });
  }

  async held(conn: string, held: boolean): Promise<void> {
    const m = this.mine.get(conn);
    if (m) m.held = held;
    await this.call({ op: 'conn.held', conn, held });
  }

  /** The session runs on `backend` (dovecot, courier, peer:NODE): for `pigeon who`. */
  async backend(conn: string, backend: string): Promise<void> {
    const m = this.mine.get(conn);
    if (m) m.backend = backend;
    await this.call({ op: 'conn.backend', conn, backend });
  }

  async close(conn: string): Promise<void> {
    this.ends.delete(conn);
    if (!this.mine.delete(conn)) return;
    await this.call({ op: 'conn.close', conn });
  }

  // ---- penalties

  async penaltyGet(key: string): Promise<{ count: number; ageMs: number }> {
    const r = (await this.call({ op: 'penalty.get', key })) as Results['penalty.get'];
    return { count: r.count, ageMs: r.age_ms };
  }

  async penaltyFail(key: string): Promise<number> {
    return ((await this.call({ op: 'penalty.fail', key })) as Results['penalty.fail']).count;
  }

  async penaltyClear(key: string): Promise<void> {
    await this.call({ op: 'penalty.clear', key });
  }

  async list(user?: string): Promise<Results['list']> {
    return (await this.call(user === undefined ? { op: 'list' } : { op: 'list', user })) as Results['list'];
  }

  /** End the sessions of `user` (from `ip` only, if given) wherever they run on this node. */
  async kick(user: string, ip?: string): Promise<Results['kick']> {
    return (await this.call(ip === undefined ? { op: 'kick', user } : { op: 'kick', user, ip })) as Results['kick'];
  }

  /** Close the link to the service (the process is ending). */
  shutdown(): void {
    this.sock?.destroy();
    this.dir?.close();
    this.dir = null;
  }

  // ---- transport

  private async call(body: RequestBody): Promise<object> {
    if (await this.ensure()) {
      const sock = this.sock;
      if (sock) {
        return new Promise<object>((resolve) => {
          const id = this.nextId++;
          this.pending.set(id, { body, resolve, due: Date.now() + ANVIL_REQUEST_MS });
          if (this.watchdog === null) this.watchdog = setTimeout(() => this.watch(), ANVIL_REQUEST_MS);
          else if (this.pending.size === 1) this.watchdog.ref();
          // the requests of one tick leave in one write (a login sends two or three at once):
          // one wake-up of the service and one answer batch, not one per request
          if (this.corked !== sock) {
            this.corked = sock;
            sock.cork();
            process.nextTick(() => {
              this.corked = null;
              sock.uncork();
            });
          }
          sock.write(encode({ id, ...body }));
        });
      }
    }
    return this.runLocal(body);
  }

  /** The watchdog fired: the link is lost when the oldest pending request is due, else wait for it. */
  private watch(): void {
    this.watchdog = null;
    // the first pending request (a Map keeps the order they were sent in) is the oldest
    const oldest = this.pending.values().next();
    if (oldest.done === true) return;
    const left = oldest.value.due - Date.now();
    if (left <= 0) this.lost(`no answer within ${ANVIL_REQUEST_MS} ms`);
    else this.watchdog = setTimeout(() => this.watch(), left);
  }

  /** Answer a request from the per-process state. */
  private runLocal(body: RequestBody): object {
    // evicting here is evicting one of our own connections: after this request returns
    return answer(this.local, SELF, process.pid, body, Date.now(), (ev, reason) => setImmediate(() => this.ended(ev.conn, reason)));
  }

  private ended(conn: string, reason: string): void {
    this.mine.delete(conn);
    const h = this.ends.get(conn);
    this.ends.delete(conn);
    h?.ended(reason);
  }

  private ensure(): Promise<boolean> {
    if (this.sock) return Promise.resolve(true);
    if (Date.now() < this.retryAt) return Promise.resolve(false);
    this.connecting ??= this.connect().finally(() => {
      this.connecting = null;
    });
    return this.connecting;
  }

  private async connect(): Promise<boolean> {
    try {
      this.dir ??= openRunDir(this.opts.runDir, { create: this.opts.autostart });
    } catch (e) {
      this.down(e instanceof RunDirError ? e.message : String(e));
      return false;
    }
    const dir = this.dir;
    const path = dir.at(SOCKET_NAME);
    let r = await attempt(path);
    if (typeof r === 'string' && (r === 'ENOENT' || r === 'ECONNREFUSED') && this.opts.autostart && dir.mine) {
      const started = await this.start();
      if (started !== null) {
        this.down(`the node state service did not start: ${started}`);
        return false;
      }
      r = await attempt(path);
    }
    if (typeof r === 'string') {
      this.down(`cannot reach the node state service at ${dir.path}/${SOCKET_NAME} (${r})`);
      return false;
    }
    this.attach(r);
    return true;
  }

  /** Start the service detached; null when it (or another one) is now serving, else why not. */
  private start(): Promise<string | null> {
    const args = [this.opts.servicePath ?? MAIN, this.opts.runDir, '--idle-ms', String(ANVIL_IDLE_MS)];
    if (this.opts.logFile) args.push('--log', this.opts.logFile);
    return new Promise((resolve) => {
      let child;
      try {
        child = spawn(process.execPath, [...hotFlags(), ...args], { detached: true, stdio: ['ignore', 'ignore', 'ignore', 'pipe'], cwd: '/', env: { PATH: process.env['PATH'] ?? '/usr/bin:/bin' } });
      } catch (e) {
        resolve(String(e));
        return;
      }
      const pipe = child.stdio[3] as Socket | null;
      let said = '';
      const done = (why: string | null): void => {
        clearTimeout(timer);
        pipe?.destroy();
        child.unref();
        resolve(why);
      };
      const timer = setTimeout(() => done(`no answer within ${ANVIL_START_MS} ms`), ANVIL_START_MS);
      child.once('error', (e) => done(e.message));
      pipe?.setEncoding('utf8');
      pipe?.on('data', (d: string) => {
        said += d;
        const nl = said.indexOf('\n');
        if (nl < 0) return;
        const line = said.slice(0, nl);
        done(line === 'ready' || line === 'taken' ? null : line.replace(/^error: /, ''));
      });
      pipe?.on('error', () => {});
      pipe?.on('close', () => {
        if (!said.includes('\n')) done('it exited without a word');
      });
    });
  }

  private attach(sock: Socket): void {
    this.sock = sock;
    sock.unref(); // the link never keeps a process alive
    readLines(
      sock,
      ANVIL_MAX_LINE,
      (lines) => {
        for (const line of lines) this.onLine(line);
      },
      (message) => this.lost(message),
    );
    sock.on('error', () => {});
    sock.on('close', () => this.lost('connection closed'));
    sock.write(encode({ id: this.nextId++, op: 'hello', pid: process.pid, role: this.opts.role }));
    // what this process holds goes to the service (held in the local state until now)
    for (const record of this.mine.values()) sock.write(encode({ id: this.nextId++, op: 'conn.restore', record }));
    this.local = new AnvilState();
    if (this.downLogged) this.opts.log('info', 'node state service reachable again; limits and failure delays are node-wide again');
    this.downLogged = false;
  }

  private onLine(line: string): void {
    let msg;
    try {
      msg = parseReply(JSON.parse(line));
    } catch {
      this.lost('malformed reply');
      return;
    }
    if ('ev' in msg) {
      this.ended(msg.conn, msg.reason);
      return;
    }
    const p = this.pending.get(msg.id);
    if (!p) return; // hello and restores are not waited for
    this.pending.delete(msg.id);
    if (this.pending.size === 0) this.watchdog?.unref();
    if ('error' in msg) p.resolve(this.runLocal(p.body));
    else p.resolve(msg.result);
  }

  /** The link broke: per-process state from now on (with our records), until the next retry. */
  private lost(why: string): void {
    const sock = this.sock;
    if (sock === null) return;
    this.sock = null;
    sock.destroy();
    this.down(`lost the node state service (${why})`);
    this.local = new AnvilState();
    for (const record of this.mine.values()) this.local.restore({ ...record, owner: SELF, pid: process.pid });
    const waiting = [...this.pending.values()];
    this.pending.clear();
    if (this.watchdog !== null) clearTimeout(this.watchdog);
    this.watchdog = null;
    for (const p of waiting) p.resolve(this.runLocal(p.body));
  }

  private down(why: string): void {
    this.retryAt = Date.now() + ANVIL_RETRY_MS;
    if (this.downLogged) return;
    this.downLogged = true;
    this.opts.log('warn', `${why}; limits and failure delays are per process until it is back`);
  }
}

/** Connect to the socket: the socket, or the error code. */
function attempt(path: string): Promise<Socket | string> {
  return new Promise((resolve) => {
    const s = connect(path);
    s.once('connect', () => {
      s.removeAllListeners('error');
      resolve(s);
    });
    s.once('error', (e: NodeJS.ErrnoException) => resolve(e.code ?? e.message));
  });
}
