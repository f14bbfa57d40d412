/**
 * NAME        src/commands/sessions — pigeon who | kick: the sessions of this node
 * SYNOPSIS    pigeon who [USER] [--json]
 *             pigeon kick USER [--ip IP]
 * DESCRIPTION Both ask the node state service (src/anvil; README "The node state service") that
 *             every serve worker and every one-shot inetd / Postfix spawn session of this
 *             instance registers with, so they cover every process of the node, as Dovecot's
 *             `doveadm who` / `doveadm kick` do through its anvil.
 *             `who` lists the logged-in sessions: user, protocol, client IP, backend (dovecot,
 *             courier) or home node (peer:NODE), since, session id, pid of the process that
 *             holds it; a table, or with --json an array of objects with those keys.
 *             `kick` ends the sessions of USER (from IP only, with --ip): the service removes
 *             them and tells each owning process, which stops the backend (the client's
 *             connection closes) and logs `Disconnected: Kicked`. Prints how many were kicked
 *             and lists them. Records of a process that died without closing its link are
 *             dropped before either answers.
 * DIAGNOSTICS No service running in run_dir: `who` says so on stderr and lists nothing (no
 *             session can be running), `kick` kicks nothing; both exit 0. A malformed USER
 *             (INVALID_ADDRESS) or --ip (USAGE, 64): one line.
 */
import type { Command } from '@commander-js/extra-typings';
import { AppError } from '../errors.js';
import { printJson } from '../io.js';
import type { ListedRecord } from '../anvil/protocol.js';

type ConfigOpt = () => string | undefined;

export interface WhoEntry {
  readonly user: string;
  readonly protocol: string;
  readonly ip: string;
  readonly backend: string | null;
  readonly since: string;
  readonly session: string | null;
  readonly pid: number;
}

function entry(r: ListedRecord): WhoEntry {
  return { user: r.user ?? '', protocol: r.proto, ip: r.ip, backend: r.backend, since: new Date(r.since).toISOString(), session: r.session, pid: r.pid };
}

/** Sessions as doveadm-who-like columns. */
export function whoTable(es: readonly WhoEntry[]): string {
  const head = ['username', 'proto', 'ip', 'backend', 'since', 'session', 'pid'];
  const rows = es.map((e) => [e.user, e.protocol, e.ip === '' ? '(local)' : e.ip, e.backend ?? '-', e.since, e.session ?? '-', String(e.pid)]);
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  return [head, ...rows].map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i] ?? 0))).join('  ')).join('\n') + '\n';
}

/** A client of this instance's node state service (never starts one: `shared` false when none runs). */
async function nodeService(cfg: ConfigOpt): Promise<{ client: import('../anvil/client.js').AnvilClient; runDir: string }> {
  const [{ loadInstance }, { AnvilClient }] = await Promise.all([import('../instance.js'), import('../anvil/client.js')]);
  const inst = loadInstance(cfg());
  const client = new AnvilClient({ runDir: inst.runDir, role: 'admin', log: () => undefined, autostart: false });
  return { client, runDir: inst.runDir };
}

function notRunning(runDir: string): void {
  process.stderr.write(`pigeon: no node state service runs in ${runDir} (no pigeon serve and no session on this node)\n`);
}

export function registerSessions(program: Command, cfg: ConfigOpt): void {
  program
    .command('who')
    .argument('[user]', 'only this user\'s sessions')
    .option('--json', 'an array of {user, protocol, ip, backend, since, session, pid}')
    .description('logged-in IMAP/POP3 sessions on this node, across all processes (like doveadm who)')
    .action(async (user, o) => {
      const { normaliseAddress } = await import('../address.js');
      const who = user === undefined ? undefined : normaliseAddress(user).address;
      const { client, runDir } = await nodeService(cfg);
      try {
        const l = await client.list(who);
        if (!client.shared) notRunning(runDir);
        const es = (client.shared ? l.conns : []).filter((r) => r.state === 'session' && r.user !== null).sort((a, b) => a.since - b.since).map(entry);
        if (o.json) printJson(es);
        else process.stdout.write(whoTable(es));
      } finally {
        client.shutdown();
      }
    });
  program
    .command('kick')
    .argument('<user>', 'whose sessions end')
    .option('--ip <ip>', 'only the sessions from this client address')
    .description('end a user\'s IMAP/POP3 sessions on this node (backend stopped, connection closed; like doveadm kick)')
    .action(async (user, o) => {
      const [{ normaliseAddress }, { parseIp }] = await Promise.all([import('../address.js'), import('../ip.js')]);
      const who = normaliseAddress(user).address;
      let ip: string | undefined;
      if (o.ip !== undefined) {
        const a = parseIp(o.ip);
        if (a === null) throw new AppError('USAGE', `--ip: not an IP address: ${JSON.stringify(o.ip)}`);
        ip = a.toString();
      }
      const { client, runDir } = await nodeService(cfg);
      try {
        const r = await client.kick(who, ip);
        if (!client.shared) notRunning(runDir);
        const es = client.shared ? r.kicked.map(entry) : [];
        process.stdout.write(`kicked ${es.length} session(s) of ${who}${ip === undefined ? '' : ` from ${ip}`}\n`);
        if (es.length > 0) process.stdout.write(whoTable(es));
      } finally {
        client.shutdown();
      }
    });
}
