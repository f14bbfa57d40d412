// A raw line-oriented client over a real socket (or TLS), for protocol-level assertions.
import { connect, type Socket } from 'node:net';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';

/** How long a wait for the peer may take before it counts as a hang. */
export const WAIT_MS = 60_000;

export class Wire {
  private buf = '';
  private waiters: (() => void)[] = [];
  closed = false;
  sock: Socket | TLSSocket;
  constructor(sock: Socket | TLSSocket) {
    this.sock = sock;
    this.attach(sock);
  }
  private attach(sock: Socket | TLSSocket): void {
    sock.setEncoding('latin1');
    sock.on('data', (d: string) => {
      this.buf += d;
      this.wake();
    });
    sock.on('close', () => {
      this.closed = true;
      this.wake();
    });
    sock.on('error', () => {});
  }
  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }
  static async open(port: number): Promise<Wire> {
    const s = connect(port, '127.0.0.1');
    await new Promise<void>((res, rej) => {
      s.once('connect', () => res());
      s.once('error', rej);
    });
    return new Wire(s);
  }
  write(s: string | Buffer): void {
    this.sock.write(s);
  }
  /**
   * Wait until the received text matches `re` (or the socket closes); returns all text so far and
   * clears it. `ms` only stops a hang: under two suites at once on 2 cores a login through the
   * proxy and a backend start can take many seconds.
   */
  async until(re: RegExp, ms = WAIT_MS): Promise<string> {
    const deadline = Date.now() + ms;
    while (!re.test(this.buf)) {
      if (this.closed || Date.now() > deadline) break;
      await new Promise<void>((res) => {
        this.waiters.push(res);
        setTimeout(res, 100);
      });
    }
    const out = this.buf;
    this.buf = '';
    return out;
  }
  async waitClosed(ms = WAIT_MS): Promise<boolean> {
    const deadline = Date.now() + ms;
    while (!this.closed && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    return this.closed;
  }
  async starttls(ca: Buffer): Promise<void> {
    const old = this.sock;
    old.removeAllListeners('data');
    const s = tlsConnect({ socket: old as Socket, ca: [ca], servername: 'localhost' });
    await new Promise<void>((res, rej) => {
      s.once('secureConnect', () => res());
      s.once('error', rej);
    });
    this.sock = s;
    this.buf = '';
    this.attach(s);
  }
  close(): void {
    this.sock.destroy();
  }
}

/**
 * A Wire to `port` once something listens there (inetd or a daemon still starting): connect
 * attempts until one succeeds, a failure after `ms`.
 */
export async function waitPort(port: number, ms = WAIT_MS): Promise<Wire> {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      return await Wire.open(port);
    } catch (e) {
      if (Date.now() > deadline) throw e;
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

/** Wait until `read()` matches (log lines landing in a file or a socket); returns the last text read. */
export async function untilText(read: () => string, re: RegExp, ms = WAIT_MS): Promise<string> {
  const deadline = Date.now() + ms;
  let s = read();
  while (!re.test(s) && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 50));
    s = read();
  }
  return s;
}
