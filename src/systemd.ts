/**
 * NAME        src/systemd — socket activation and readiness notification for `pigeon serve`
 * SYNOPSIS    contrib/systemd/pigeon.service (Type=notify), pigeon-imap.socket (FileDescriptorName=imap)
 *             systemd-socket-activate -l 0.0.0.0:143 --fdname=imap pigeon -c /etc/pigeon serve
 * DESCRIPTION Inherited sockets (sd_listen_fds(3)): when LISTEN_PID is this process, LISTEN_FDS
 *             sockets start at fd 3, named by LISTEN_FDNAMES (colon-separated, from the socket
 *             units' FileDescriptorName=). A name is a listener protocol as in `--listen`, with
 *             `,proxy` for a PROXY protocol listener: imap imaps pop3 pop3s lmtp metrics. An
 *             inherited socket replaces the pigeon.yaml listeners of its protocol (the socket
 *             unit owns that port now). The variables are removed from the environment, so no
 *             child (a worker, Dovecot) takes the sockets for its own; serve's primary hands
 *             workers the list in PIGEON_LISTEN_FDS and each worker listens on the primary's fd
 *             through node:cluster (the primary opens the handle and shares it).
 *             Notification (sd_notify(3)): READY=1 when every listener of every worker is open,
 *             RELOADING=1 (with MONOTONIC_USEC) when SIGHUP starts a reload and READY=1 when it
 *             finished, STOPPING=1 on SIGTERM: each one datagram to $NOTIFY_SOCKET, sent with
 *             unix-dgram (Node has no unix datagram sockets; systemd-notify(1) would send from
 *             its own short-lived pid, which systemd only accepts with NotifyAccess=all and then
 *             often cannot attribute). Without NOTIFY_SOCKET nothing is sent.
 * DIAGNOSTICS CONFIG_INVALID (exit 78): an inherited socket without a usable name.
 *             An abstract NOTIFY_SOCKET (@name) cannot be reached with unix-dgram: one warning.
 * SECURITY    The notification socket is named by the service manager; nothing from a client
 *             reaches a notification.
 */
import { createRequire } from 'node:module';
import { AppError } from './errors.js';
import { PROTOCOLS, type Protocol } from './instance.js';

/** An inherited listening socket: its fd (in serve's primary), protocol, and PROXY flag. */
export interface InheritedSocket {
  readonly fd: number;
  readonly protocol: Protocol;
  readonly proxy: boolean;
  /** the name as systemd gave it */
  readonly name: string;
}

const SD_LISTEN_FDS_START = 3;
/** Protocols a socket unit may hand over (the peer link's address is registered from pigeon.yaml). */
const INHERITABLE: readonly Protocol[] = PROTOCOLS.filter((p) => p !== 'peer');
/** How serve's primary passes the inherited sockets to its workers. */
const WORKER_VAR = 'PIGEON_LISTEN_FDS';

/** Parse one FileDescriptorName: `imap`, `imaps,proxy`, … */
function parseName(name: string, fd: number): Pick<InheritedSocket, 'protocol' | 'proxy'> {
  const proxy = name.endsWith(',proxy');
  const proto = proxy ? name.slice(0, -',proxy'.length) : name;
  if (!(INHERITABLE as readonly string[]).includes(proto) || (proxy && !['imap', 'imaps', 'pop3', 'pop3s', 'lmtp'].includes(proto))) {
    throw new AppError(
      'CONFIG_INVALID',
      `LISTEN_FDNAMES: inherited socket fd ${fd} is named ${JSON.stringify(name)}: expected one of ${INHERITABLE.join(', ')} (imap, imaps, pop3, pop3s, lmtp may end in ",proxy"); set FileDescriptorName= in its socket unit, or --fdname= for systemd-socket-activate`,
    );
  }
  return { protocol: proto as Protocol, proxy };
}

/**
 * The sockets systemd (or systemd-socket-activate) passed to this process, once: the LISTEN_*
 * variables are removed. In a serve worker: the primary's list (PIGEON_LISTEN_FDS).
 */
export function takeInheritedSockets(env: NodeJS.ProcessEnv = process.env, pid = process.pid): InheritedSocket[] {
  const fromPrimary = env[WORKER_VAR];
  if (fromPrimary !== undefined) {
    delete env[WORKER_VAR];
    return fromPrimary === '' ? [] : fromPrimary.split(' ').map((e) => {
      const eq = e.indexOf('=');
      const fd = Number(e.slice(0, eq));
      return { fd, name: e.slice(eq + 1), ...parseName(e.slice(eq + 1), fd) };
    });
  }
  const count = env['LISTEN_FDS'];
  const forPid = env['LISTEN_PID'];
  const names = env['LISTEN_FDNAMES'];
  delete env['LISTEN_FDS'];
  delete env['LISTEN_PID'];
  delete env['LISTEN_FDNAMES'];
  if (count === undefined || forPid === undefined || Number(forPid) !== pid) return [];
  const n = /^\d{1,4}$/.test(count) ? Number(count) : 0;
  const named = (names ?? '').split(':');
  const out: InheritedSocket[] = [];
  for (let i = 0; i < n; i++) {
    const fd = SD_LISTEN_FDS_START + i;
    const name = named[i] ?? '';
    out.push({ fd, name, ...parseName(name, fd) });
  }
  return out;
}

/** The environment a serve worker gets: the inherited sockets, by fd and name. */
export function workerEnv(sockets: readonly InheritedSocket[]): Record<string, string> {
  return { [WORKER_VAR]: sockets.map((s) => `${s.fd}=${s.name}`).join(' ') };
}

interface DgramSocket {
  send(buf: Buffer, offset: number, length: number, path: string, cb: (err?: Error) => void): void;
  on(event: 'error', f: (e: Error) => void): void;
  close(): void;
}
interface UnixDgram {
  createSocket(type: 'unix_dgram'): DgramSocket;
}

let dgram: UnixDgram | null = null;
let warned = false;

/**
 * Send one notification (`READY=1`, …) to $NOTIFY_SOCKET; resolves when it was sent (or could
 * not be: `warn` says why, once). A no-op without NOTIFY_SOCKET.
 */
export function sdNotify(state: string, warn: (msg: string) => void): Promise<void> {
  const target = process.env['NOTIFY_SOCKET'];
  if (target === undefined || target === '') return Promise.resolve();
  const once = (msg: string): void => {
    if (!warned) warn(msg);
    warned = true;
  };
  if (target.startsWith('@')) {
    once(`NOTIFY_SOCKET ${target} is an abstract socket, which this build cannot reach: no readiness notifications (use Type=exec)`);
    return Promise.resolve();
  }
  try {
    dgram ??= createRequire(import.meta.url)('unix-dgram') as UnixDgram;
  } catch (e) {
    once(`cannot load unix-dgram for NOTIFY_SOCKET: ${e instanceof Error ? e.message : String(e)}`);
    return Promise.resolve();
  }
  const d = dgram;
  return new Promise((resolve) => {
    let s: DgramSocket;
    try {
      s = d.createSocket('unix_dgram');
    } catch (e) {
      once(`NOTIFY_SOCKET: ${e instanceof Error ? e.message : String(e)}`);
      return resolve();
    }
    s.on('error', (e) => once(`NOTIFY_SOCKET ${target}: ${e.message}`));
    const buf = Buffer.from(state, 'utf8');
    s.send(buf, 0, buf.length, target, (err) => {
      if (err) once(`NOTIFY_SOCKET ${target}: ${err.message}`);
      s.close();
      resolve();
    });
  });
}

/** CLOCK_MONOTONIC in microseconds, as RELOADING=1 wants it in MONOTONIC_USEC. */
export function monotonicUsec(): bigint {
  return process.hrtime.bigint() / 1000n;
}
