/**
 * A private ClamAV clamd for the antivirus tests (backends.md, "ClamAV's clamd"): its own
 * clamd.conf, a database directory holding only the local EICAR hash signature (no signature
 * download), a unix socket in a short temporary directory (socket paths are limited to 108 bytes).
 * Started once per test file; ready when its socket appears (fs.watch, an event) and answers
 * zPING with PONG; its process group is held by the reaper and stopped in teardown.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, mkdirSync, writeFileSync, watch, existsSync, readFileSync, rmSync, chmodSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import type { Test } from 'tap';
import { requireProgram } from './programs.js';
import { owned, stopGroup, hold, release } from './reaper.js';

export const CLAMD = '/usr/sbin/clamd';
/** The EICAR test file (68 bytes): the one signature the private clamd knows. */
export const EICAR = 'X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*';
/** What clamd calls it (a local .hdb signature gets the .UNOFFICIAL suffix). */
export const EICAR_NAME = 'Eicar-Test-Signature-Local.UNOFFICIAL';
/** clamd's StreamMaxLength here: a larger stream gets "INSTREAM size limit exceeded. ERROR". */
export const CLAMD_STREAM_MAX = 1024 * 1024;

export interface Clamd {
  readonly socket: string;
  readonly log: () => string;
  /** resolves once the log has `n` lines matching `re` (clamd logs a FOUND after answering) */
  waitLog(re: RegExp, n: number): Promise<void>;
  stop(): Promise<void>;
}

function ping(socket: string): Promise<boolean> {
  return new Promise((res) => {
    let got = '';
    const s = net.connect({ path: socket }, () => s.write('zPING\0'));
    s.on('data', (d: Buffer) => {
      got += d.toString('latin1');
      if (got.includes('\0')) {
        s.destroy();
        res(got === 'PONG\0');
      }
    });
    s.on('error', () => res(false));
    s.on('close', () => res(got === 'PONG\0'));
  });
}

/** Start clamd; null when it is missing (requireProgram has failed or skipped the test). */
export async function startClamd(t: Test): Promise<Clamd | null> {
  if (!requireProgram(t, CLAMD, 'clamav-daemon')) return null;
  const dir = mkdtempSync('/tmp/clamd-');
  chmodSync(dir, 0o755);
  hold('dir', dir);
  mkdirSync(join(dir, 'db'));
  writeFileSync(join(dir, 'db', 'test.hdb'), '44d88612fea8a8f36de82e1278abb02f:68:Eicar-Test-Signature-Local\n');
  const socket = join(dir, 'clamd.sock');
  const logFile = join(dir, 'clamd.log');
  writeFileSync(
    join(dir, 'clamd.conf'),
    `DatabaseDirectory ${join(dir, 'db')}
LocalSocket ${socket}
Foreground yes
LogFile ${logFile}
User root
StreamMaxLength ${CLAMD_STREAM_MAX}
`,
  );
  const child: ChildProcess = owned(spawn(CLAMD, ['-c', join(dir, 'clamd.conf')], { detached: true, stdio: ['ignore', 'ignore', 'pipe'] }));
  let stderr = '';
  child.stderr?.setEncoding('utf8');
  child.stderr?.on('data', (s: string) => {
    stderr = (stderr + s).slice(-4000);
  });
  const log = (): string => (existsSync(logFile) ? readFileSync(logFile, 'utf8') : '');
  const stop = async (): Promise<void> => {
    await stopGroup(child);
    rmSync(dir, { recursive: true, force: true });
    release('dir', dir);
  };
  t.teardown(stop);
  // ready: the socket appears (a directory event), then it answers PING
  await new Promise<void>((res, rej) => {
    let over = false;
    const w = watch(dir);
    const finish = (e?: Error): void => {
      if (over) return;
      over = true;
      w.close();
      clearTimeout(timer);
      child.off('exit', exited);
      if (e) rej(e);
      else res();
    };
    const check = (): void => {
      if (over || !existsSync(socket)) return;
      // bound but not yet listening: ask again shortly (each try is a real connect)
      void ping(socket).then((ok) => (ok ? finish() : setTimeout(check, 100)));
    };
    const exited = (code: number | null): void => finish(new Error(`clamd exited (${code}) before its socket was ready: ${stderr.slice(-1000)} ${log().slice(-1000)}`));
    const timer = setTimeout(() => finish(new Error(`clamd: no socket within 120 s: ${log().slice(-1000)}`)), 120_000);
    w.on('change', check);
    child.once('exit', exited);
    check();
  });
  const count = (re: RegExp): number => log().split('\n').filter((l) => re.test(l)).length;
  const waitLog = (re: RegExp, n: number): Promise<void> =>
    new Promise<void>((res, rej) => {
      if (count(re) >= n) return res();
      const w = watch(logFile);
      const timer = setTimeout(() => {
        w.close();
        rej(new Error(`clamd log: ${count(re)} of ${n} lines ${re} within 60 s`));
      }, 60_000);
      w.on('change', () => {
        if (count(re) < n) return;
        clearTimeout(timer);
        w.close();
        res();
      });
    });
  return { socket, log, waitLog, stop };
}
