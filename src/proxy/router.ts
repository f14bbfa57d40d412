/**
 * NAME        src/proxy/router — after login: find the mailbox, start its backend, relay bytes
 * DESCRIPTION Reads nothing from the database itself: the caller passes the user and effective
 *             config from the one auth read. Allocation goes through src/allocation.ts, the same
 *             function delivery uses, so a first login creates exactly the mailbox the first mail
 *             would. Relay joins client and backend with stream.pipeline both ways (backpressure
 *             and errors propagate); when either side ends the other is closed and no child is
 *             left behind.
 */
import { pipeline } from 'node:stream';
import type { ResolvedUser } from '../modules.js';
import type { ProxyEnv } from './env.js';
import type { ClientConn } from './conn.js';
import { placeUser } from '../allocation.js';
import { BACKENDS } from '../registry.js';
import { BackendError, type BackendSession } from '../../backends/types.js';
import { isAppError } from '../errors.js';

export type RouteResult = { ok: true; session: BackendSession; backend: string } | { ok: false; reason: string };

const HANDOFF_MAX_INPUT = 16 * 1024;

function quotaOf(u: ResolvedUser): number {
  const q = u.config['mailstore.quota']?.value;
  return typeof q === 'number' && Number.isFinite(q) && q > 0 ? Math.floor(q) : 0;
}

export async function route(env: ProxyEnv, protocol: 'imap' | 'pop3', u: ResolvedUser, conn: ClientConn, sid: string, tag: string | null, leftover: () => Buffer): Promise<RouteResult> {
  const backendName = String(u.config[`${protocol}.backend`]?.value ?? 'dovecot');
  const backend = BACKENDS.get(backendName);
  if (!backend) return { ok: false, reason: `backend ${backendName} is not available on this node (known: ${[...BACKENDS.keys()].join(', ')})` };
  let placement;
  try {
    placement = await placeUser({ store: env.store, node: env.instance.config.node, mailRoot: env.instance.mailRoot, mailUser: env.mailUser }, u.user, u.config);
  } catch (e) {
    return { ok: false, reason: isAppError(e) ? e.message : `allocation failed: ${String(e)}` };
  }
  if (placement.kind === 'remote') return { ok: false, reason: `mailbox is on node ${placement.node}; no peer link to it is configured` };
  let handoff: { socket: import('node:stream').Duplex; input: Buffer } | null = null;
  const sock = conn.handoffSocket();
  if (sock && env.instance.config.handoff) {
    const { pending } = conn.detach();
    const input = Buffer.concat([leftover(), ...pending]);
    if (input.length <= HANDOFF_MAX_INPUT && backend.acceptsHandoff(protocol, input)) handoff = { socket: sock, input };
    else conn.reattach(input);
  }
  try {
    const session = await backend.start({
      handoff,
      protocol,
      address: u.user.address,
      allocation: placement.allocation,
      mailUser: env.mailUser,
      peer: conn.peer,
      sessionId: sid,
      tag,
      binaries: backend.binaries(env.instance.config),
      quota: quotaOf(u),
      logLine: backendLogLine(env, `${protocol}(${u.user.address})`),
    });
    return { ok: true, session, backend: backendName };
  } catch (e) {
    if (handoff) conn.reattach(handoff.input);
    return { ok: false, reason: e instanceof BackendError ? e.message : String(e) };
  }
}

/** Relay until either side ends. Resolves with byte counts when both are closed. */
export function relay(conn: ClientConn, s: BackendSession, leftover: Buffer): Promise<{ in: number; out: number; exit: number | null }> {
  if (s.handedOff) return waitHandedOff(conn, s);
  const { input, output, pending } = conn.detach();
  const child = s.child;
  let bytesIn = 0;
  let bytesOut = 0;
  return new Promise((resolve) => {
    let exitCode: number | null = null;
    let finished = false;
    const finish = (): void => {
      if (finished) return;
      finished = true;
      resolve({ in: bytesIn, out: bytesOut, exit: exitCode });
    };
    output.write(s.greeting);
    if (leftover.length > 0) {
      bytesIn += leftover.length;
      child.stdin?.write(leftover);
    }
    for (const p of pending) {
      bytesIn += p.length;
      child.stdin?.write(p);
    }
    input.on('data', (c: Buffer) => {
      bytesIn += c.length;
    });
    child.stdout?.on('data', (c: Buffer) => {
      bytesOut += c.length;
    });
    if (child.stdin) pipeline(input, child.stdin, () => child.stdin?.destroy());
    if (child.stdout) {
      pipeline(child.stdout, output as NodeJS.WritableStream, () => {
        input.destroy();
      });
    }
    input.resume();
    child.once('exit', (code) => {
      exitCode = code;
      setTimeout(() => {
        input.destroy();
        finish();
      }, 50);
    });
    input.once('close', () => {
      // client gone: give the backend a moment to see EOF, then make sure it is gone
      const t = setTimeout(() => child.kill('SIGTERM'), 2000);
      t.unref();
      child.once('exit', () => {
        clearTimeout(t);
        finish();
      });
      if (child.exitCode !== null || child.signalCode !== null) finish();
    });
  });
}

/** The backend owns the socket: send our greeting (POP3), wait for it to exit, then close ours. */
function waitHandedOff(conn: ClientConn, s: BackendSession): Promise<{ in: number; out: number; exit: number | null }> {
  const sock = conn.raw;
  if (s.greeting.length > 0) sock.write(s.greeting);
  return new Promise((resolve) => {
    const done = (code: number | null): void => {
      // Dovecot exits 89 on a fatal init error without a word to the client (imap)
      if (code === 89 && !sock.destroyed) sock.end('* BYE [UNAVAILABLE] Internal error occurred. Refer to server log for more information.\r\n');
      sock.destroy();
      resolve({ in: -1, out: -1, exit: code });
    };
    if (s.child.exitCode !== null) done(s.child.exitCode);
    else s.child.once('exit', (code) => done(code));
  });
}

/** Dovecot/Courier stderr → our log. Holds only the prefix string, not the user record (idle memory). */
function backendLogLine(env: ProxyEnv, prefix: string): (line: string) => void {
  return (line) => env.log.log('info', prefix, line.replace(/^[^:]*\([^)]*\)(<[^>]*>)*: /, ''));
}
