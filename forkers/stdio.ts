/**
 * NAME        forkers/stdio — one session on stdin/stdout
 * SYNOPSIS    pigeon imap --forker stdio ; ssh host pigeon pop3 --forker stdio ; pigeon lmtp --forker stdio ; tests
 * DESCRIPTION The client is local: plaintext login allowed unless login.plaintext=never; no
 *             STARTTLS (there is no socket to wrap). fd 0 may be a socket shared with fd 1 (as
 *             spawn(8) and inetd give) or two pipes (ssh, `swaks --pipe`, a parent process): both
 *             become one duplex stream, half-open (a client that stops sending still gets every
 *             answer). The client address comes from SSH_CLIENT when set (parsed; anything else
 *             counts as a local pipe, exempt from the per-IP limit). Logs never go to stdout.
 */
import { netModule, streamModule } from '../src/builtins.js';
import type { OneShotForker, Transport } from './types.js';
import { parseIp } from '../src/ip.js';
import { stdinIsConnection } from './inetd.js';

/**
 * stdin + stdout as one duplex. It also answers what smtp-server asks of a socket (readyState,
 * setTimeout, addresses), so LMTP runs on it as on a TCP connection. The class is made on the
 * first session: node:stream is loaded then (src/builtins.ts), not by every process that
 * imports the forker registry, an in-process `pigeon deliver` among them.
 */
const stdioDuplexClass = () =>
  class StdioDuplex extends streamModule().Duplex {
    private timer: NodeJS.Timeout | null = null;
    private timeoutMs = 0;
    readonly remoteAddress = '127.0.0.1';
    readonly remotePort = 0;
    readonly localAddress = '127.0.0.1';
    readonly localPort = 0;
    /** smtp-server writes only to a socket whose readyState is 'open' */
    get readyState(): string {
      return this.destroyed ? 'closed' : 'open';
    }
    constructor() {
      super({ allowHalfOpen: true });
      process.stdin.on('data', (d: Buffer) => {
        this.touch();
        if (!this.push(d)) process.stdin.pause();
      });
      process.stdin.on('end', () => this.push(null));
      process.stdin.on('error', (e) => this.destroy(e));
      process.stdout.on('error', (e) => this.destroy(e));
    }
    override _read(): void {
      process.stdin.resume();
    }
    override _write(chunk: Buffer, _enc: BufferEncoding, cb: (e?: Error | null) => void): void {
      this.touch();
      process.stdout.write(chunk, (e) => cb(e ?? null));
    }
    override _final(cb: (e?: Error | null) => void): void {
      process.stdout.end(() => cb());
    }
    override _destroy(e: Error | null, cb: (e: Error | null) => void): void {
      if (this.timer) clearTimeout(this.timer);
      process.stdin.destroy();
      cb(e);
    }
    private touch(): void {
      if (this.timeoutMs <= 0) return;
      if (this.timer) clearTimeout(this.timer);
      this.timer = setTimeout(() => this.emit('timeout'), this.timeoutMs);
    }
    setTimeout(ms: number, cb?: () => void): this {
      this.timeoutMs = ms;
      if (cb) this.once('timeout', cb);
      this.touch();
      return this;
    }
    setNoDelay(): this {
      return this;
    }
    setKeepAlive(): this {
      return this;
    }
  };

let StdioDuplex: ReturnType<typeof stdioDuplexClass> | undefined;

export default {
  kind: 'forker',
  name: 'stdio',
  summary: 'one session on stdin/stdout (a socket shared by both, or two pipes)',
  stdioIsProtocol: true,
  transport(): Transport {
    const ssh = (process.env['SSH_CLIENT'] ?? '').split(' ');
    return {
      stream: stdinIsConnection() ? new (netModule().Socket)({ fd: 0, readable: true, writable: true, allowHalfOpen: true }) : new (StdioDuplex ??= stdioDuplexClass())(),
      // an address that does not parse is no address (it would key limits and penalties)
      peer: { rip: parseIp(ssh[0] ?? '')?.toString() ?? '', rport: Number(ssh[1] ?? 0) || 0, lip: '', lport: Number(ssh[2] ?? 0) || 0 },
      local: true,
      canTls: false,
    };
  },
} satisfies OneShotForker;
