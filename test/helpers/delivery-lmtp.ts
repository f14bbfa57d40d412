/** A raw SMTP/LMTP client over any duplex: write a line, read one (possibly multi-line) reply. */
import type { Duplex, Readable, Writable } from 'node:stream';
import { connect, type Socket } from 'node:net';
import type { Test } from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import { owned } from './reaper.js';

export class Dialog {
  private buf = '';
  private waiters: (() => void)[] = [];
  private ended = false;
  private readonly output: Writable;
  constructor(input: Readable, output: Writable) {
    this.output = output;
    input.on('data', (d: Buffer) => {
      this.buf += d.toString('latin1');
      this.wake();
    });
    input.on('end', () => {
      this.ended = true;
      this.wake();
    });
    input.on('error', () => {
      this.ended = true;
      this.wake();
    });
  }
  static of(s: Duplex): Dialog {
    return new Dialog(s, s);
  }
  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }
  /** The next complete reply: its lines (the last one starts "NNN "). */
  async reply(timeoutMs = 60_000): Promise<string[]> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const lines = this.buf.split('\r\n');
      for (let i = 0; i < lines.length - 1; i++) {
        if (/^\d{3} /.test(lines[i] ?? '') || /^\d{3}$/.test(lines[i] ?? '')) {
          const out = lines.slice(0, i + 1);
          this.buf = lines.slice(i + 1).join('\r\n');
          return out;
        }
      }
      if (this.ended) throw new Error(`connection closed; pending: ${JSON.stringify(this.buf)}`);
      if (Date.now() > deadline) throw new Error(`no reply within ${timeoutMs} ms; pending: ${JSON.stringify(this.buf)}`);
      await new Promise<void>((r) => {
        const tm = setTimeout(r, 200);
        this.waiters.push(() => {
          clearTimeout(tm);
          r();
        });
      });
    }
  }
  /** Last line of the next reply. */
  async line(timeoutMs?: number): Promise<string> {
    const r = await this.reply(timeoutMs);
    return r[r.length - 1] ?? '';
  }
  /** The next raw line (any line, CRLF stripped), for line protocols such as IMAP. */
  async lineRaw(timeoutMs = 60_000): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const i = this.buf.indexOf('\r\n');
      if (i >= 0) {
        const l = this.buf.slice(0, i);
        this.buf = this.buf.slice(i + 2);
        return l;
      }
      if (this.ended) throw new Error(`connection closed; pending: ${JSON.stringify(this.buf)}`);
      if (Date.now() > deadline) throw new Error(`no line within ${timeoutMs} ms`);
      await new Promise<void>((r) => {
        const tm = setTimeout(r, 200);
        this.waiters.push(() => {
          clearTimeout(tm);
          r();
        });
      });
    }
  }
  send(s: string | Buffer): void {
    this.output.write(typeof s === 'string' ? Buffer.from(s, 'latin1') : s);
  }
  async cmd(s: string): Promise<string> {
    this.send(`${s}\r\n`);
    return this.line();
  }
  pending(): string {
    return this.buf;
  }
}

/** SMTP DATA encoding: CRLF line ends, leading dots doubled, final dot line. */
export function dataOf(msg: string): string {
  const crlf = msg.replace(/\r?\n/g, '\r\n');
  const body = crlf.endsWith('\r\n') ? crlf : `${crlf}\r\n`;
  return `${body.replace(/^\./gm, '..')}.\r\n`;
}

/**
 * An LMTP session with a listening `pigeon serve` at host:port, past its greeting (220) and LHLO;
 * the socket is destroyed at the test's teardown.
 */
export async function lmtpDialog(t: Test, port: number, host = '127.0.0.1'): Promise<{ d: Dialog; greeting: string }> {
  const s = await new Promise<Socket>((res, rej) => {
    const c = connect({ host, port }, () => res(c));
    c.once('error', rej);
  });
  t.teardown(() => s.destroy());
  const d = Dialog.of(s);
  const greeting = await d.line();
  d.send('LHLO mx.test\r\n');
  await d.reply();
  return { d, greeting };
}

/** The pipelined MAIL, RCPT, DATA of one transaction (as Postfix's lmtp client sends them), up to the 354. */
export async function upToData(t: Test, d: Dialog, rcpt: string, sender = 'bob@remote.test'): Promise<void> {
  d.send(`MAIL FROM:<${sender}>\r\nRCPT TO:<${rcpt}>\r\nDATA\r\n`);
  t.match(await d.line(), /^250 /);
  t.match(await d.line(), /^250 /);
  t.match(await d.line(), /^354 /);
}

/**
 * `pigeon serve --workers 1` (or `workers`) of the instance `inst` with an lmtp listener on
 * 127.0.0.1:0, node started with `nodeArgs`, run by `wrap` (e.g. strace and its options) when
 * given; resolves with its port once it is ready.
 * Killed (its whole process group) at the test's teardown if still running.
 */
export async function serveLmtp(
  t: Test,
  cliPath: string,
  inst: string,
  o: { wrap?: readonly string[]; env?: NodeJS.ProcessEnv; workers?: number; nodeArgs?: readonly string[] } = {},
): Promise<{ child: ChildProcess; port: number; exited: Promise<void> }> {
  const wrap = o.wrap ?? [];
  const argv = [process.execPath, ...(o.nodeArgs ?? []), cliPath, '-c', inst, 'serve', '--workers', String(o.workers ?? 1)];
  const child = owned(
    spawn(wrap[0] ?? process.execPath, [...wrap.slice(1), ...(wrap.length > 0 ? argv : argv.slice(1))], {
      stdio: ['ignore', 'ignore', 'pipe'],
      detached: true,
      ...(o.env ? { env: o.env } : {}),
    }),
  );
  const exited = new Promise<void>((res) => child.once('exit', () => res()));
  t.teardown(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  let err = '';
  const port = await new Promise<number>((res, rej) => {
    child.stderr?.setEncoding('utf8');
    child.stderr?.on('data', (s: string) => {
      err += s;
      const m = /listening lmtp 127\.0\.0\.1:(\d+)\n[\s\S]*pigeon: ready/.exec(err);
      if (m) res(Number(m[1]));
    });
    child.once('exit', (c) => rej(new Error(`serve exited ${c}: ${err}`)));
  });
  return { child, port, exited };
}
