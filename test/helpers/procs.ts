// Processes and their descriptors, from /proc: who started whom, who holds which socket.
import { readFileSync, readdirSync, readlinkSync } from 'node:fs';

/** ppid and command line of `pid`, or null when it is gone */
export function proc(pid: number): { ppid: number; cmd: string } | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
    return { ppid, cmd: readFileSync(`/proc/${pid}/cmdline`, 'utf8').replace(/\0/g, ' ').trim() };
  } catch {
    return null;
  }
}

/** The processes whose command line starts with `cmd` and that descend from `root`. */
export function descendants(root: number, cmd: string): number[] {
  const out: number[] = [];
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    const p = proc(Number(d));
    if (!p?.cmd.startsWith(cmd)) continue;
    for (let a = p.ppid, i = 0; a > 1 && i < 10; a = proc(a)?.ppid ?? 0, i++) {
      if (a === root) {
        out.push(Number(d));
        break;
      }
    }
  }
  return out;
}

/** Does `pid` hold the socket with inode `inode`? */
export function holds(pid: number, inode: string): boolean {
  try {
    return readdirSync(`/proc/${pid}/fd`).some((fd) => {
      try {
        return readlinkSync(`/proc/${pid}/fd/${fd}`) === `socket:[${inode}]`;
      } catch {
        return false;
      }
    });
  } catch {
    return false;
  }
}

/** The inode of the socket `pid` has as descriptor `fd`, or null. */
export function socketInode(pid: number, fd: number): string | null {
  try {
    return /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`))?.[1] ?? null;
  } catch {
    return null;
  }
}
