/**
 * NAME        src/commands/proxy — pigeon serve | imap | pop3
 * DESCRIPTION `serve` runs the standalone daemon (forkers/listen.ts). `imap`/`pop3` run one session
 *             on what the process inherited, chosen with --forker stdio|inetd|postfix.
 *             In the one-session modes stdout (and, for inetd/postfix, stderr) is the protocol:
 *             a startup failure is answered in protocol (`* BYE [UNAVAILABLE]`, `-ERR [SYS/TEMP]`)
 *             and logged to log.file or syslog, never printed.
 */
import type { Command } from '@commander-js/extra-typings';
import { Option } from '@commander-js/extra-typings';
import { createProxyEnv, type ProxyEnv } from '../proxy/env.js';
import { ImapSession } from '../proxy/imap-session.js';
import { Pop3Session } from '../proxy/pop3-session.js';
import { serve, type ExtraListener } from '../../forkers/listen.js';
import stdio from '../../forkers/stdio.js';
import inetd from '../../forkers/inetd.js';
import postfix from '../../forkers/postfix.js';
import type { OneShotForker } from '../../forkers/types.js';
import { AppError, EX, isAppError } from '../errors.js';
import { syslogSink, createLogger } from '../log.js';

export const FORKERS: ReadonlyMap<string, OneShotForker> = new Map<string, OneShotForker>([
  [stdio.name, stdio],
  [inetd.name, inetd],
  [postfix.name, postfix],
]);

let extraListener: ExtraListener | null = null;
/** The delivery agent registers its LMTP listener for `serve` here. */
export function setExtraListener(f: ExtraListener): void {
  extraListener = f;
}

async function oneSession(proto: 'imap' | 'pop3', forkerName: string, implicitTls: boolean, cfg: string | undefined): Promise<number> {
  const forker = FORKERS.get(forkerName);
  if (!forker) throw new AppError('USAGE', `unknown forker ${JSON.stringify(forkerName)}; one of: ${[...FORKERS.keys()].join(', ')}`);
  let env: ProxyEnv;
  try {
    env = createProxyEnv(cfg, { logToStderr: !forker.stdioIsProtocol });
  } catch (e) {
    const msg = isAppError(e) ? e.message : String(e);
    const line = proto === 'imap' ? '* BYE [UNAVAILABLE] Server configuration error, see the server log.\r\n' : '-ERR [SYS/TEMP] Server configuration error, see the server log.\r\n';
    process.stdout.write(line);
    createLogger({ level: 'info', sink: syslogSink() ?? (() => {}) }).log('error', `${proto}-login`, `fatal: ${msg}`);
    if (forker.name === 'stdio') process.stderr.write(`pigeon: error: ${msg}\n`);
    return isAppError(e) ? e.exit : EX.CONFIG;
  }
  const conn = forker.connection();
  if (implicitTls) {
    if (!env.tls) throw new AppError('CONFIG_INVALID', 'no TLS certificate configured');
    try {
      await conn.startTls(env.tls);
    } catch (e) {
      env.log.log('info', `${proto}-login`, `Disconnected (TLS handshaking: ${(e as Error).message}):`, { rip: conn.peer.rip });
      return EX.OK;
    }
  }
  const session = proto === 'imap' ? new ImapSession(env, conn) : new Pop3Session(env, conn);
  await session.run();
  return EX.OK;
}

export function registerProxy(program: Command, cfg: () => string | undefined): void {
  program
    .command('serve')
    .option('--workers <n>', 'worker processes sharing the ports (default: one per core)', (v) => {
      if (!/^\d+$/.test(v) || Number(v) > 256) throw new AppError('USAGE', `--workers: expected a number 0-256, got ${JSON.stringify(v)}`);
      return Number(v);
    })
    .description('standalone daemon: every imap/imaps/pop3/pop3s/lmtp listener in the config (foreground)')
    .action(async (o) => {
      const code = await serve(() => createProxyEnv(cfg(), { logToStderr: true }), cfg(), o.workers ?? 0, extraListener);
      process.exit(code);
    });
  for (const proto of ['imap', 'pop3'] as const) {
    program
      .command(proto)
      .addOption(new Option('--forker <name>', 'what the session runs on').choices(['stdio', 'inetd', 'postfix']).default('stdio'))
      .option('--tls', `implicit TLS on the inherited socket (${proto}s)`)
      .description(`one ${proto.toUpperCase()} session on the inherited stdin/stdout (inetd.conf, master.cf spawn, ssh, tests)`)
      .action(async (o) => {
        const code = await oneSession(proto, o.forker, o.tls ?? false, cfg());
        // let the last bytes reach the client, then exit even if a handle lingers
        process.stdout.write('', () => process.exit(code));
        setTimeout(() => process.exit(code), 2000).unref();
      });
  }
}
