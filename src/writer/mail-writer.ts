/**
 * NAME        src/writer/mail-writer — who writes under the mail root: always the mail user
 * SYNOPSIS    mailWriter(mailUser).store(req, body) / .commit(handle) / .createMailbox(a, root) /
 *             .purgeMailbox(a, root) ...;  prestartMailWriter(mailUser)  (serve's LMTP workers)
 * DESCRIPTION When pigeon runs as the mail user already (pipe(8) user=mail, a non-root serve), the
 *             operations of src/writer/local-writer.ts run in this process. When it runs as root
 *             (`serve` doing LMTP, logins that allocate, the peer listener; `pigeon deliver` run
 *             by hand), they run in ONE child process per pigeon process, forked with the mail
 *             user's uid/gid (the way Postfix's local(8) switches users; never a process-wide
 *             seteuid), started on first use (or ahead of it: prestartMailWriter, for a `serve` worker
 *             with an lmtp listener), restarted on the next use if it died. Requests are
 *             multiplexed by id over the IPC channel (`serialization: 'advanced'`, so Buffers pass
 *             as bytes). A message body travels in chunks of at most CHUNK bytes, each sent when
 *             the child asks for it (`pull`); the parent reads one chunk ahead, so neither side
 *             holds more than two chunks of it, and the first chunk goes with the request marked
 *             as the last when it is: a message of one chunk costs one round trip to store and
 *             one to commit, or a single one with `storeAndCommit` (a delivery that has nothing
 *             else to do between the two). While the child holds a single operation and the
 *             parent's requests have not overlapped for a while (`solo`, wire.ts SOLO_MS: one
 *             connection delivering), its fsyncs are made in place, not on its thread pool
 *             (src/writer/safe-fs.ts syncInPlaceWhen); deliveries at once keep them in parallel.
 *             A fault step reached in the child (PIGEON_FAULT, tests) kills this process, as if the
 *             delivery had been killed there.
 * DIAGNOSTICS A child that cannot start or dies fails the requests in flight with an Error naming
 *             its exit status and its last stderr line; a message it held is then not delivered
 *             (4.3.0, Postfix retries); leftovers in tmp/ belong to the mail user and are removed
 *             after 36 hours (src/delivery/maildir.ts).
 * SECURITY    The child gets a fresh environment (PATH only), cwd /, no stdin/stdout, the mail
 *             user's uid and gid (libuv drops supplementary groups). Its paths are still checked
 *             (src/writer/safe-fs.ts): running as the mail user is what makes a race between check
 *             and use harmless.
 */
import type { ChildProcess } from 'node:child_process';
import { childProcess } from '../builtins.js';
import { fileURLToPath } from 'node:url';
import type { Readable } from 'node:stream';
import type { MailUser } from '../mailuser.js';
import type { DeliveryResult } from '../delivery/types.js';
import type { StoreRequest } from '../delivery/mda.js';
import { LocalWriter, type Delivered, type MailWriter, type MailboxRef, type Stored } from './local-writer.js';
import { notice } from '../delivery/notice.js';
import { hotFlags } from '../hot-flags.js';
import { SOLO_MS, toChunks, type ChildMessage, type ParentMessage, type WireError } from './wire.js';

export type { Delivered, MailWriter, MailboxRef, Stored } from './local-writer.js';

// the child's entry beside this module; when this module runs from source (tests load src/*.ts
// through a TypeScript loader) the compiled one in dist/, which plain node can run as the mail user
const MAIN = fileURLToPath(new URL(import.meta.url.endsWith('.ts') ? '../../dist/src/writer/writer-main.js' : './writer-main.js', import.meta.url));

interface Pending {
  readonly resolve: (v: unknown) => void;
  readonly reject: (e: Error) => void;
  readonly body: AsyncIterator<Buffer> | null;
  /** the child the request went to */
  readonly child: ChildProcess;
}

function errorOf(w: WireError): Error {
  const e = Object.assign(new Error(w.message), { code: w.code });
  return e;
}

/** `rest` with `first` in front of it. */
function prepend(first: Buffer, rest: AsyncIterator<Buffer>): AsyncIterator<Buffer> {
  let given = false;
  return {
    next: () => {
      if (given) return rest.next();
      given = true;
      return Promise.resolve({ done: false, value: first });
    },
  };
}

/** The operations, forwarded to a child running as the mail user. */
class ChildWriter implements MailWriter {
  private child: ChildProcess | null = null;
  private generation = 0;
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private stderrTail = '';
  // handle given to callers → (child generation, the child's handle)
  private readonly handles = new Map<number, { gen: number; handle: number }>();
  private nextHandle = 1;
  /** when a request was last sent while another was open */
  private overlapAt = 0;

  private readonly mu: MailUser;

  constructor(mu: MailUser) {
    this.mu = mu;
  }

  /** Start the child now unless one runs: a daemon that is about to deliver (prestartMailWriter). */
  warm(): void {
    if (this.child?.connected !== true) this.start();
  }

  private start(): ChildProcess {
    const env: NodeJS.ProcessEnv = { PATH: '/usr/bin:/bin' };
    const f = process.env['PIGEON_FAULT'];
    if (f !== undefined) env['PIGEON_FAULT'] = f;
    const child = childProcess().fork(MAIN, [], {
      uid: this.mu.uid,
      gid: this.mu.gid,
      cwd: '/',
      env,
      execArgv: hotFlags(),
      serialization: 'advanced',
      stdio: ['ignore', 'ignore', 'pipe', 'ipc'],
    });
    this.generation++;
    this.stderrTail = '';
    // neither the pipe nor the process may keep pigeon alive (`pigeon deliver` exits when done)
    (child.stderr as (Readable & { unref?: () => void }) | null)?.unref?.();
    child.stderr?.setEncoding('utf8');
    child.stderr?.on('data', (s: string) => {
      this.stderrTail = (this.stderrTail + s).slice(-2000);
    });
    child.on('message', (m: ChildMessage) => this.onMessage(m));
    let over = false;
    const gone = (why: string): void => {
      if (over) return;
      over = true;
      if (this.child === child) this.child = null;
      const lines = this.stderrTail.split('\n').filter((l) => l.trim() !== '');
      const last = lines.find((l) => /Error|refusing|not started/.test(l)) ?? lines.pop();
      const text = `mail writer (uid ${this.mu.uid}, pid ${child.pid ?? '?'}) ${why}${last ? `: ${last.slice(0, 300)}` : ''}`;
      notice(`${text}; a new one starts with the next write`, {});
      const err = new Error(text);
      for (const [id, p] of this.pending) {
        if (p.child !== child) continue;
        this.pending.delete(id);
        p.reject(err);
      }
      this.updateRef();
    };
    child.on('exit', (code, sig) => gone(`exited with ${sig ?? code}`));
    child.on('disconnect', () => gone('closed its channel'));
    child.on('error', (e) => gone(`failed: ${e.message}`));
    child.unref();
    this.child = child;
    this.updateRef();
    return child;
  }

  private updateRef(): void {
    const ch = this.child?.channel;
    if (!ch) return;
    if (this.pending.size > 0) ch.ref();
    else ch.unref();
  }

  private onMessage(m: ChildMessage): void {
    if (m.t === 'fault') {
      process.kill(process.pid, 'SIGKILL');
      return;
    }
    if (m.t === 'notice') {
      notice(m.msg, m.fields);
      return;
    }
    const p = this.pending.get(m.id);
    if (!p) return;
    if (m.t === 'pull') {
      void this.pump(m.id, p);
      return;
    }
    this.pending.delete(m.id);
    this.updateRef();
    if (m.t === 'done') p.resolve(m.value);
    else p.reject(errorOf(m.error));
  }

  private send(child: ChildProcess, m: ParentMessage): void {
    const fail = (e: Error): void => {
      const p = this.pending.get(m.id);
      if (!p) return;
      this.pending.delete(m.id);
      this.updateRef();
      p.reject(e);
    };
    if (!child.connected) {
      fail(new Error(`mail writer (uid ${this.mu.uid}) is not running`));
      return;
    }
    child.send(m, (e: Error | null) => {
      if (e) fail(e);
    });
  }

  private async pump(id: number, p: Pending): Promise<void> {
    if (!p.body) return;
    try {
      const n = await p.body.next();
      this.send(p.child, n.done ? { t: 'data', id, data: null, end: true } : { t: 'data', id, data: n.value, end: false });
    } catch (e) {
      this.send(p.child, { t: 'data', id, data: null, end: true, error: (e as NodeJS.ErrnoException).code ?? (e instanceof Error ? e.message : 'read error') });
    }
  }

  private async call<T>(op: string, args: readonly unknown[], body?: AsyncIterable<Buffer>): Promise<T> {
    const child = this.child?.connected === true ? this.child : this.start();
    const id = this.nextId++;
    let it: AsyncIterator<Buffer> | null = body ? toChunks(body)[Symbol.asyncIterator]() : null;
    // the first chunk goes with the request, marked as the last when it is (one chunk ahead is
    // read to know): a message of one chunk is then one round trip, with no `pull` for its end
    let first: { data: Buffer | null; end: boolean } | null = null;
    if (it) {
      const n = await it.next();
      if (n.done) first = { data: null, end: true };
      else {
        const ahead = await it.next();
        first = { data: n.value, end: ahead.done === true };
        if (ahead.done !== true) it = prepend(ahead.value, it);
      }
    }
    // requests that overlap (several deliveries at once) keep the child's syncs on its thread pool
    // for SOLO_MS: one blocking fsync would hold up all of them
    const now = Date.now();
    if (this.pending.size > 0) this.overlapAt = now;
    const solo = now - this.overlapAt > SOLO_MS;
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject, body: it, child });
      this.updateRef();
      this.send(child, { t: 'call', id, op, args: [...args], solo, ...(first ? { data: first.data, end: first.end } : {}) });
    });
  }

  createMailbox(a: MailboxRef, mailRoot: string): Promise<void> {
    return this.call('createMailbox', [{ format: a.format, path: a.path }, mailRoot]);
  }
  discardEmpty(a: MailboxRef, mailRoot: string): Promise<void> {
    return this.call('discardEmpty', [{ format: a.format, path: a.path }, mailRoot]);
  }
  async store(req: StoreRequest, body: AsyncIterable<Buffer>): Promise<Stored | DeliveryResult> {
    const r = await this.call<Stored | DeliveryResult>('store', [req], body);
    if ('dsn' in r) return r;
    const handle = this.nextHandle++;
    this.handles.set(handle, { gen: this.generation, handle: r.handle });
    return { ...r, handle };
  }
  storeAndCommit(req: StoreRequest, body: AsyncIterable<Buffer>): Promise<Delivered | DeliveryResult> {
    return this.call('storeAndCommit', [req], body);
  }
  async commit(handle: number): Promise<DeliveryResult | null> {
    const h = this.handles.get(handle);
    this.handles.delete(handle);
    if (!h || h.gen !== this.generation || this.child === null) return { dsn: '4.3.0', text: 'mail writer exited before the message was committed; try again later' };
    return this.call('commit', [h.handle]);
  }
  async abort(handle: number): Promise<void> {
    const h = this.handles.get(handle);
    this.handles.delete(handle);
    if (!h || h.gen !== this.generation || this.child === null) return;
    await this.call('abort', [h.handle]);
  }
  vacationDue(mailRoot: string, rel: readonly string[], sender: string, days: number): Promise<boolean> {
    return this.call('vacationDue', [mailRoot, [...rel], sender, days]);
  }
  ensureDir(base: string, dir: string): Promise<void> {
    return this.call('ensureDir', [base, dir]);
  }
  takeLock(base: string, path: string, staleMs: number): Promise<boolean> {
    return this.call('takeLock', [base, path, staleMs]);
  }
  removeFile(base: string, path: string): Promise<void> {
    return this.call('removeFile', [base, path]);
  }
  putFile(base: string, path: string, body: AsyncIterable<Buffer>): Promise<void> {
    return this.call('putFile', [base, path], body);
  }
  syncDir(base: string, dir: string): Promise<void> {
    return this.call('syncDir', [base, dir]);
  }
  purgeMailbox(a: MailboxRef, mailRoot: string): Promise<boolean> {
    return this.call('purgeMailbox', [{ format: a.format, path: a.path }, mailRoot]);
  }
}

const writers = new Map<string, MailWriter>();

/**
 * Start the writer child for `mu` now when this process needs one (it runs as root), so that the
 * first message does not wait for a Node process to start (fork, exec, module loading: tens of ms
 * on an idle machine, far more on a loaded one). `pigeon serve` calls it for each worker with an
 * lmtp listener. Nothing changes when the process is the mail user already. A child that dies
 * later is started again by the next write, as before.
 */
export function prestartMailWriter(mu: MailUser): void {
  const w = mailWriter(mu);
  if (w instanceof ChildWriter) w.warm();
}

/** The writer of this process for `mu`: in-process when we are the mail user, else the child. */
export function mailWriter(mu: MailUser): MailWriter {
  const key = `${mu.switchTo ? 'child' : 'local'}:${mu.uid}:${mu.gid}`;
  let w = writers.get(key);
  if (!w) {
    w = mu.switchTo ? new ChildWriter(mu) : new LocalWriter();
    writers.set(key, w);
  }
  return w;
}
