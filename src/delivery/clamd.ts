/**
 * NAME        src/delivery/clamd — scan a byte stream with ClamAV's clamd (INSTREAM)
 * SYNOPSIS    const r = await clamdScan({ address: '/run/clamav/clamd.ctl', timeoutMs: 30_000 }, chunks);
 * DESCRIPTION The documented protocol (clamd(8)): `zINSTREAM\0`, then the data as chunks, each
 *             preceded by its length as 4 bytes big-endian, then a zero length; clamd answers one
 *             NUL-terminated line: `stream: OK`, `stream: NAME FOUND`, or `... ERROR` (e.g. its
 *             StreamMaxLength was exceeded). `address` is a unix socket path (begins with `/`)
 *             or HOST:PORT (`[v6]:PORT`). The whole exchange — connect, send, answer — is bounded
 *             by `timeoutMs`; writes wait for the socket to drain, so a slow clamd slows us down
 *             rather than filling memory.
 * DIAGNOSTICS Never throws: clamd unreachable, slow, closing before its answer, or answering
 *             anything but the three forms above is `{ kind: 'error', reason }`, the reason naming
 *             what happened (the caller names the address). A signature name is reduced to
 *             printable ASCII, at most SIGNATURE_MAX characters.
 * SECURITY    clamd's answer is data: read at most ANSWER_MAX bytes, never put in a file name.
 * SEE ALSO    src/delivery/antivirus.ts
 */
import type net from 'node:net';
import { netModule } from '../builtins.js';
import { drained } from '../drain.js';

/** Longest answer read from clamd (a signature name is well under this). */
export const ANSWER_MAX = 1024;
/** Largest INSTREAM chunk we send (clamd reads chunks of any size up to StreamMaxLength). */
export const CHUNK_MAX = 64 * 1024;
export const SIGNATURE_MAX = 200;

export interface ClamdTarget {
  /** unix socket path or HOST:PORT */
  readonly address: string;
  readonly timeoutMs: number;
}

export type ScanResult = { readonly kind: 'clean' } | { readonly kind: 'infected'; readonly name: string } | { readonly kind: 'error'; readonly reason: string };

/** Where to connect for `address`; null when it is neither a path nor HOST:PORT. */
export function connectOptionsOf(address: string): net.NetConnectOpts | null {
  if (address.startsWith('/')) return { path: address };
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([A-Za-z0-9.-]+)):(\d{1,5})$/.exec(address);
  if (!m) return null;
  const port = Number(m[3]);
  if (port < 1 || port > 65535) return null;
  return { host: m[1] ?? m[2] ?? '', port };
}

/** clamd's answer line (without the NUL) as a result. */
export function parseAnswer(line: string): ScanResult {
  const l = line.replace(/\r?\n$/, '');
  if (l === 'stream: OK') return { kind: 'clean' };
  const found = /^stream: ([\s\S]+) FOUND$/.exec(l);
  if (found) {
    const name = (found[1] ?? '').replace(/[^\x21-\x7e]/g, '_').slice(0, SIGNATURE_MAX);
    return name === '' ? { kind: 'error', reason: 'answered FOUND without a name' } : { kind: 'infected', name };
  }
  const shown = JSON.stringify(l.replace(/[^\x20-\x7e]/g, '?').slice(0, 120));
  if (/ ERROR$/.test(l)) return { kind: 'error', reason: `answered ${shown}` };
  return { kind: 'error', reason: `answered garbage: ${shown}` };
}

/** Scan `data` (the bytes in order) with the clamd at `target`. Never throws. */
export function clamdScan(target: ClamdTarget, data: AsyncIterable<Buffer>): Promise<ScanResult> {
  const opts = connectOptionsOf(target.address);
  if (opts === null) return Promise.resolve({ kind: 'error', reason: 'clamd.address is neither a socket path nor HOST:PORT' });
  return new Promise<ScanResult>((resolve) => {
    let settled = false;
    let answer = Buffer.alloc(0);
    let connected = false;
    const sock = netModule().connect(opts);
    const done = (r: ScanResult): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      sock.destroy();
      resolve(r);
    };
    const timer = setTimeout(() => done({ kind: 'error', reason: `no answer within ${Math.round(target.timeoutMs / 1000)} s` }), target.timeoutMs);
    sock.on('error', (e: NodeJS.ErrnoException) => {
      // a clamd that goes away while we still send: the write fails before the read sees the end
      const gone = connected && (e.code === 'EPIPE' || e.code === 'ECONNRESET');
      done({ kind: 'error', reason: gone ? `closed the connection before answering (${e.code})` : `${e.code ?? 'error'}: ${e.message}` });
    });
    sock.on('data', (d: Buffer) => {
      answer = Buffer.concat([answer, d]);
      const nul = answer.indexOf(0);
      if (nul >= 0) done(parseAnswer(answer.subarray(0, nul).toString('latin1')));
      else if (answer.length > ANSWER_MAX) done({ kind: 'error', reason: `answered more than ${ANSWER_MAX} bytes without ending its line` });
    });
    sock.on('end', () => {
      const part = answer.length > 0 ? ` (partial answer ${JSON.stringify(answer.toString('latin1').replace(/[^\x20-\x7e]/g, '?').slice(0, 120))})` : '';
      done({ kind: 'error', reason: `closed the connection before answering${part}` });
    });
    sock.on('close', () => done({ kind: 'error', reason: 'closed the connection before answering' }));
    const write = (b: Buffer): Promise<void> =>
      new Promise<void>((res) => {
        if (settled || sock.destroyed) return res();
        if (sock.write(b)) return res();
        void drained(sock).then(res);
      });
    sock.once('connect', () => {
      connected = true;
      void (async () => {
        try {
          await write(Buffer.from('zINSTREAM\0', 'latin1'));
          for await (const chunk of data) {
            for (let off = 0; off < chunk.length && !settled; off += CHUNK_MAX) {
              const part = chunk.subarray(off, off + CHUNK_MAX);
              const len = Buffer.alloc(4);
              len.writeUInt32BE(part.length, 0);
              await write(Buffer.concat([len, part]));
            }
            if (settled) return;
          }
          await write(Buffer.alloc(4));
        } catch (e) {
          done({ kind: 'error', reason: `reading the message to scan failed: ${e instanceof Error ? e.message : String(e)}` });
        }
      })();
    });
  });
}
