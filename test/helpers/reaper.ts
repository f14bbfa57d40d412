// Nothing a test file starts may outlive it. tap kills a file that passes its timeout with
// SIGALRM/SIGKILL: its teardowns never run, and daemons it started (`pigeon serve` and its
// workers, inetd and the sessions it forked, Dovecot, a private Postfix, a syslog stand-in, a
// tmpfs mount) would stay. So every such resource is registered with a watchdog: a small process
// of its own (its own session, so no signal for the test reaches it) that holds a pipe from the
// test process. When that pipe ends — the test process exited or was killed, however — the
// watchdog stops what is still registered: process groups get SIGTERM, then SIGKILL after 3 s;
// a private Postfix is stopped with `postfix -c DIR stop`; mounts are unmounted; directories
// removed; network namespaces deleted. A teardown that stopped a resource itself unregisters it first.
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';

const WATCHDOG = String.raw`
const { execFileSync } = require('node:child_process');
const { rmSync } = require('node:fs');
const held = new Map();
let buf = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (d) => {
  buf += d;
  let i;
  while ((i = buf.indexOf('\n')) >= 0) {
    const line = buf.slice(0, i);
    buf = buf.slice(i + 1);
    const m = /^([+-])(\w+) (.*)$/.exec(line);
    if (!m) continue;
    const key = m[2] + ' ' + m[3];
    if (m[1] === '+') held.set(key, { kind: m[2], arg: m[3] });
    else held.delete(key);
  }
});
const quiet = (f) => { try { f(); } catch {} };
process.stdin.on('end', () => {
  const all = [...held.values()];
  const groups = all.filter((h) => h.kind === 'group').map((h) => Number(h.arg));
  for (const g of groups) quiet(() => process.kill(-g, 'SIGTERM'));
  for (const h of all) if (h.kind === 'postfix') quiet(() => execFileSync('/usr/sbin/postfix', ['-c', h.arg, 'stop'], { stdio: 'ignore', timeout: 30000 }));
  setTimeout(() => {
    for (const g of groups) quiet(() => process.kill(-g, 'SIGKILL'));
    for (const h of all) if (h.kind === 'mount') quiet(() => execFileSync('umount', ['-l', h.arg], { stdio: 'ignore' }));
    for (const h of all) if (h.kind === 'dir') quiet(() => rmSync(h.arg, { recursive: true, force: true }));
    for (const h of all) if (h.kind === 'netns') quiet(() => execFileSync('ip', ['netns', 'del', h.arg], { stdio: 'ignore' }));
    process.exit(0);
  }, groups.length > 0 ? 3000 : 0);
});
`;

let watchdog: ChildProcess | null = null;

function send(line: string): void {
  if (!watchdog) {
    watchdog = spawn(process.execPath, ['-e', WATCHDOG], { detached: true, stdio: ['pipe', 'ignore', 'ignore'] });
    watchdog.unref();
    const stdin = watchdog.stdin as (NodeJS.WritableStream & { unref?: () => void; on(e: 'error', f: () => void): unknown }) | null;
    stdin?.on('error', () => undefined);
    stdin?.unref?.();
  }
  watchdog.stdin?.write(`${line}\n`);
}

export type Held = 'group' | 'postfix' | 'mount' | 'dir' | 'netns';

/** Stop (or remove) this when the test process ends without having said `release`. */
export function hold(kind: Held, arg: string | number): void {
  send(`+${kind} ${arg}`);
}

/** The test stopped (or removed) it itself. */
export function release(kind: Held, arg: string | number): void {
  send(`-${kind} ${arg}`);
}

/**
 * Hold a child started with `detached: true` (a process group of its own): it and everything it
 * forks (workers, sessions, backends) are killed when this test process ends. When the child
 * exits, the rest of its group is killed too and the group released. Returns the child.
 */
export function owned<T extends ChildProcess>(child: T): T {
  const pid = child.pid;
  if (pid === undefined) return child;
  // field 5 of /proc/PID/stat is the process group: detached children lead their own
  const stat = readFileSync(`/proc/${pid}/stat`, 'latin1');
  const pgrp = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[2]);
  if (pgrp !== pid) throw new Error(`owned(): spawn ${child.spawnfile} with detached: true (its process group is ${pgrp})`);
  hold('group', pid);
  child.once('exit', () => {
    try {
      process.kill(-pid, 'SIGKILL');
    } catch {
      /* the group is empty */
    }
    release('group', pid);
  });
  return child;
}

/**
 * Stop an owned child and everything in its process group (inetd and the sessions it forked,
 * which outlive inetd itself), and resolve once the group is empty: a teardown that returned
 * earlier let tap remove the instance while a session still wrote its logout line there
 * (ENOTEMPTY). SIGKILL after `graceMs`.
 */
export function stopGroup(child: ChildProcess, graceMs = 5000): Promise<void> {
  const pid = child.pid;
  if (pid === undefined) return Promise.resolve();
  return terminate(-pid, graceMs); // -pid: the whole process group
}

/**
 * Stop the node state service of the instance in `dir` (run/anvil.lock holds its pid): it runs
 * detached, in a session of its own, so stopping serve's process group leaves it, and it still
 * writes in the instance directory while tap removes it (ENOTEMPTY). Resolves once it is gone.
 */
export function stopAnvil(dir: string, graceMs = 5000): Promise<void> {
  let pid = 0;
  try {
    pid = Number(readFileSync(`${dir}/run/anvil.lock`, 'utf8').trim());
  } catch {
    return Promise.resolve(); // none started
  }
  if (!Number.isInteger(pid) || pid <= 1) return Promise.resolve();
  return terminate(pid, graceMs);
}

/**
 * SIGTERM to `target` (a pid, or a negated process group id), then SIGKILL once `graceMs` have
 * passed; resolves when nothing is left to signal (at once when nothing was there).
 */
function terminate(target: number, graceMs: number): Promise<void> {
  const signal = (s: NodeJS.Signals | 0): boolean => {
    try {
      process.kill(target, s);
      return true;
    } catch {
      return false; // gone (the group is empty)
    }
  };
  if (!signal('SIGTERM')) return Promise.resolve();
  const killAt = Date.now() + graceMs;
  return new Promise<void>((res) => {
    const check = (): void => {
      if (!signal(0)) return res();
      if (Date.now() > killAt) signal('SIGKILL');
      setTimeout(check, 50);
    };
    check();
  });
}
