// Separate machines on one host, for partitions: each host is a network namespace of its own,
// joined to the others by three networks (bridges in a "switch" namespace of their own):
//   db    10.77.1.0/24  the nodes and the PostgreSQL server
//   peer  10.77.2.0/24  the nodes' peer links
//   cl    10.77.3.0/24  the clients (IMAP, POP3, LMTP) and the nodes' listeners
// The subnets exist only inside these namespaces (127.0.0.0/8 does not route over veth), and the
// test's own namespace has no route to them, so nothing leaves them. A link is cut by taking the
// host's port on that network's bridge down, and healed by bringing it up again: cutting a node
// from the database leaves its peer and client networks as they were.
// Names carry this test process's pid; namespaces of a test process that is gone are removed at
// the next start, and the reaper removes this process's ones if tap kills it.
import { execFileSync, spawnSync } from 'node:child_process';
import type { Test } from 'tap';
import { hold, release } from './reaper.js';
import { pidAlive } from '../../src/pid.js';

export const NETS = { db: '10.77.1', peer: '10.77.2', cl: '10.77.3' } as const;
export type Net = keyof typeof NETS;

export interface Host {
  /** the namespace's name (for `ip netns exec`) */
  readonly ns: string;
  /** the host's address on each network it is on */
  readonly addr: Partial<Record<Net, string>>;
}

export interface Lab {
  host(name: string, octet: number, nets: readonly Net[]): Host;
  /** take the host's port on `net` down (the host itself keeps its address) */
  cut(h: Host, net: Net): void;
  heal(h: Host, net: Net): void;
  /** argv that runs `argv` inside the host's namespace */
  exec(h: Host, argv: readonly string[]): string[];
}

const PREFIX = 'pdlab';

function ip(args: readonly string[]): void {
  execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

/** Remove the namespaces of earlier test processes that are gone (killed before their teardown). */
function reapStale(): void {
  const out = spawnSync('ip', ['netns', 'list'], { encoding: 'utf8' }).stdout ?? '';
  for (const line of out.split('\n')) {
    const m = new RegExp(`^(${PREFIX}(\\d+)-\\S+)`).exec(line);
    if (m && !pidAlive(Number(m[2]))) spawnSync('ip', ['netns', 'del', m[1] ?? '']);
  }
}

/** Whether this machine can make namespaces and veth pairs (root, iproute2, a kernel with veth). */
export function canMakeLabs(): string | null {
  const probe = `${PREFIX}${process.pid}-probe`;
  const r = spawnSync('ip', ['netns', 'add', probe], { encoding: 'utf8' });
  if (r.error || r.status !== 0) return `ip netns add: ${r.error?.message ?? r.stderr.trim()}`;
  const v = spawnSync('ip', ['-n', probe, 'link', 'add', 'p0', 'type', 'veth', 'peer', 'name', 'p1'], { encoding: 'utf8' });
  spawnSync('ip', ['netns', 'del', probe]);
  return v.status === 0 ? null : `veth: ${v.stderr.trim()}`;
}

export function makeLab(t: Test): Lab {
  reapStale();
  const made: string[] = [];
  const add = (ns: string): void => {
    ip(['netns', 'add', ns]);
    hold('netns', ns);
    made.push(ns);
    ip(['-n', ns, 'link', 'set', 'lo', 'up']);
  };
  t.teardown(() => {
    for (const ns of made.reverse()) {
      spawnSync('ip', ['netns', 'del', ns]);
      release('netns', ns);
    }
  });
  const sw = `${PREFIX}${process.pid}-sw`;
  add(sw);
  for (const net of Object.keys(NETS)) {
    ip(['-n', sw, 'link', 'add', `br-${net}`, 'type', 'bridge']);
    ip(['-n', sw, 'link', 'set', `br-${net}`, 'up']);
  }
  const port = (h: Host, net: Net): string => `${h.ns.slice(h.ns.lastIndexOf('-') + 1)}-${net}`.slice(0, 15);
  return {
    host(name, octet, nets) {
      const ns = `${PREFIX}${process.pid}-${name}`;
      add(ns);
      const addr: Partial<Record<Net, string>> = {};
      const h: Host = { ns, addr };
      for (const net of nets) {
        const outside = port(h, net);
        // the host's end is created in the switch namespace, then moved into the host's
        ip(['-n', sw, 'link', 'add', outside, 'type', 'veth', 'peer', 'name', `in-${net}`]);
        ip(['-n', sw, 'link', 'set', `in-${net}`, 'netns', ns]);
        ip(['-n', sw, 'link', 'set', outside, 'master', `br-${net}`]);
        ip(['-n', sw, 'link', 'set', outside, 'up']);
        addr[net] = `${NETS[net]}.${octet}`;
        ip(['-n', ns, 'addr', 'add', `${addr[net]}/24`, 'dev', `in-${net}`]);
        ip(['-n', ns, 'link', 'set', `in-${net}`, 'up']);
      }
      return h;
    },
    cut(h, net) {
      ip(['-n', sw, 'link', 'set', port(h, net), 'down']);
    },
    heal(h, net) {
      ip(['-n', sw, 'link', 'set', port(h, net), 'up']);
    },
    exec(h, argv) {
      return ['ip', 'netns', 'exec', h.ns, ...argv];
    },
  };
}
