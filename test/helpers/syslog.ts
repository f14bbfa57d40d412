// A stand-in for syslogd: python3 binds a unix datagram socket and appends every datagram (and a
// newline) to a file, so a test reads what a program sent to syslog. The caller checks for
// /usr/bin/python3 first (requireProgram).
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Test } from 'tap';
import { owned } from './reaper.js';

const PY = `import socket,sys\ns=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM)\ns.bind(sys.argv[1])\nprint("ready",flush=True)\nwith open(sys.argv[2],"ab",buffering=0) as f:\n  while True: f.write(s.recv(65536)+b"\\n")\n`;

export interface SyslogStandIn {
  /** the socket to log to */
  readonly socket: string;
  /** the file every datagram is appended to */
  readonly out: string;
  /** whether it bound its socket (false: it exited first) */
  readonly up: boolean;
}

/**
 * Start the stand-in; `out` defaults to a file beside the socket. Resolves once it bound its
 * socket or exited; it is killed, and its directory removed, at `t`'s teardown.
 */
export async function syslogStandIn(t: Test, out?: string): Promise<SyslogStandIn> {
  // a unix socket path must be short (108 bytes): not inside the deep test directory
  const sdir = mkdtempSync(join(tmpdir(), 'pigeon-syslog-'));
  t.teardown(() => rmSync(sdir, { recursive: true, force: true }));
  const socket = join(sdir, 'log');
  const file = out ?? join(sdir, 'received');
  const rx = owned(spawn('/usr/bin/python3', ['-c', PY, socket, file], { stdio: ['ignore', 'pipe', 'inherit'], detached: true }));
  t.teardown(() => {
    rx.kill('SIGKILL');
  });
  const up = await new Promise<boolean>((res) => {
    rx.stdout.once('data', () => res(true));
    rx.once('exit', () => res(false));
  });
  return { socket, out: file, up };
}
