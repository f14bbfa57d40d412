#!/usr/bin/env node
/**
 * NAME        pigeon — IMAP/POP3 proxy and delivery agent on one configuration layer
 * SYNOPSIS    pigeon [-c DIR|FILE] COMMAND ...   (pigeon --help, pigeon COMMAND --help)
 * DIAGNOSTICS sysexits: 0 ok, 64 usage, 65 bad data, 67 no such user/domain, 73 exists,
 *             75 temporary (database locked: retry), 77 auth failed, 78 configuration.
 *             Errors are one line on stderr: "pigeon: error: ...".
 */
import type { Command } from '@commander-js/extra-typings';
import module from 'node:module';
import { realpathSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { deliverCommand, parseDeliverArgv } from './delivery/deliver-cli.js';

// commander, the command tree, the password schemes, even src/errors.ts load on demand (dynamic
// imports below): a `pigeon deliver` under pipe(8) runs once per message. Its entry point
// (src/delivery/deliver-cli.ts, node built-ins and a few small modules) is imported statically
// because `npm run build` inlines it into dist/src/cli.js (scripts/bundle-deliver.mjs): a hand-off
// to `pigeon serve` then loads this one file of pigeon's, as on Node 20 the ES module loader's
// cost is per file. Node's compile cache exists from Node 22.1 on: src/compile-cache.ts loads
// only there (on Node 20 it would do nothing).
if (typeof (module as { enableCompileCache?: unknown }).enableCompileCache === 'function') (await import('./compile-cache.js')).enableCompileCache();

/** sysexits(3) values this file answers before src/errors.ts is loaded (EX there) */
const EX_OK = 0;
const EX_SOFTWARE = 70;

export const VERSION = '0.1.0';

/** Commands that load the modules of pigeon.yaml themselves, or run before there is an instance. */
const SELF_LOADING = new Set(['init', 'deliver', 'lmtp', 'imap', 'pop3', 'serve']);

/** The command word of argv (after global options), to load only what that command needs. */
function commandOf(argv: readonly string[]): string | null {
  for (let i = 2; i < argv.length; i++) {
    const a = argv[i] ?? '';
    if (a === '-c' || a === '--config') i++;
    else if (!a.startsWith('-')) return a;
  }
  return null;
}

export async function buildProgram(argv: readonly string[]): Promise<Command<[], { config?: string }>> {
  const { Command, Option } = await import('@commander-js/extra-typings');
  const program = new Command()
    .name('pigeon')
    .description('PigeonDeliver: IMAP/POP3 modular proxy with an embedded delivery agent')
    .version(VERSION)
    .option('-c, --config <path>', 'instance directory or pigeon.yaml (default $PIGEON_CONFIG, then /etc/pigeon)')
    .showSuggestionAfterError(true)
    .exitOverride()
    .configureOutput({ writeErr: (s) => process.stderr.write(s) });
  const cfg = (): string | undefined => program.opts().config;

  program
    .command('init')
    .argument('<dir>', 'new instance directory (must not exist or be empty)')
    .option('--node <name>', 'this node\'s name', 'node1')
    .option('--listen <proto=host:port>', 'listener (repeatable): imap imaps pop3 pop3s lmtp peer metrics; PROTO=HOST:PORT,proxy expects a PROXY header (from limits.trusted_proxies)', (v: string, acc: string[]) => [...acc, v], [] as string[])
    .option('--db <url>', 'database: sqlite:PATH or PATH (default sqlite:pigeon.db inside DIR), or a PostgreSQL server shared by nodes on several hosts: postgres://USER@HOST[,HOST2]/DB[?sslmode=…&target_session_attrs=read-write] (written into pigeon.yaml, then mode 0600)')
    .option('--db-password-file <file>', 'the database server\'s password is this file\'s first line (mode 0600 or 0640; written as database_password_file), instead of the URL or ~/.pgpass')
    .option('--ca-from <dir>', 'join an existing cluster CA: a directory from "pigeon cert issue NODE --out DIR" (its node.crt becomes this node\'s), or another instance holding certs/ca.key (a certificate is issued here)')
    .addOption(new Option('--key <type>', 'key of the new host certificate (and of a new cluster CA): ec (ECDSA P-256) or rsa (RSA-2048)').choices(['ec', 'rsa'] as const).default('ec' as const))
    .option('--demo', 'also add domain example.test and user demo@example.test with a printed password')
    .description('create an instance: config file, database, cluster CA and host certificate, mail root')
    .action(async (dir, o) => {
      const { initInstance } = await import('./init.js');
      const r = await initInstance({ dir, node: o.node, listen: o.listen, db: o.db, dbPasswordFile: o.dbPasswordFile, caFrom: o.caFrom, key: o.key });
      console.log(`instance created in ${r.dir}\n  config:   ${r.dir}/pigeon.yaml\n  database: ${r.dbPath}\n  certs:    ${r.dir}/certs/\n  mail:     ${r.dir}/mail/`);
      if (o.demo) {
        // node:crypto on demand: importing it loads webcrypto too (≈ 30 ms of every `pigeon deliver`)
        const [{ loadInstance }, { openInstanceStore }, { hashPassword }, { randomBytes }] = await Promise.all([import('./instance.js'), import('./context.js'), import('../auth/schemes.js'), import('node:crypto')]);
        const store = await openInstanceStore(loadInstance(r.dir));
        const pw = randomBytes(9).toString('base64url');
        try {
          await store.addDomain('example.test');
          await store.addUser('demo@example.test', await hashPassword(Buffer.from(pw)), null);
        } finally {
          await store.close();
        }
        console.log(`demo user: demo@example.test  password: ${pw}`);
      }
      console.log(`next: pigeon -c ${r.dir} domain add example.org; pigeon -c ${r.dir} user add alice@example.org`);
    });

  // `deliver` runs once per message under Postfix: load only the delivery commands for it
  // The modules pigeon.yaml names (`modules:`, src/module-files.ts) join the registries, and every
  // registry passes its self-check, before any command uses them (the settings catalog, the values
  // of imap.backend): a broken module stops the command with one line. init makes the instance;
  // the one-session, delivery and daemon commands load them themselves (each answers a broken
  // module in its own protocol). Files that do not load are the command's own error to report.
  program.hook('preAction', async (_program, action) => {
    let top: { name(): string; parent: unknown } = action;
    while (top.parent !== program && top.parent !== null) top = top.parent as typeof top;
    if (SELF_LOADING.has(top.name())) return;
    const { loadInstance } = await import('./instance.js');
    let instance;
    try {
      instance = loadInstance(cfg());
    } catch {
      return;
    }
    await (await import('./module-files.js')).loadModules(instance);
  });

  const cmd = commandOf(argv);
  const deliveryOnly = cmd === 'deliver' || cmd === 'lmtp';
  if (!deliveryOnly) (await import('./commands/admin.js')).registerAdmin(program as unknown as Command, cfg);
  if (!deliveryOnly) (await import('./commands/cluster.js')).registerCluster(program as unknown as Command, cfg);
  if (!deliveryOnly) (await import('./commands/db.js')).registerDb(program as unknown as Command, cfg);
  if (!deliveryOnly) (await import('./commands/proxy.js')).registerProxy(program as unknown as Command, cfg);
  if (!deliveryOnly) (await import('./commands/sessions.js')).registerSessions(program as unknown as Command, cfg);
  (await import('./commands/delivery.js')).registerDelivery(program as unknown as Command, cfg);
  return program;
}

export async function main(argv: readonly string[]): Promise<number> {
  // a plain `deliver` command line: the delivery entry point alone (src/delivery/deliver-cli.ts)
  if (commandOf(argv) === 'deliver') {
    const o = parseDeliverArgv(argv);
    if (o !== null) {
      // never throws: a delivery code that does not load is its 75 and one line
      await deliverCommand(o);
      return typeof process.exitCode === 'number' ? process.exitCode : EX_OK;
    }
  }
  const { EX, isAppError } = await import('./errors.js');
  const program = await buildProgram(argv);
  const { CommanderError } = await import('@commander-js/extra-typings');
  try {
    await program.parseAsync(argv as string[]);
    return typeof process.exitCode === 'number' ? process.exitCode : EX.OK;
  } catch (e) {
    if (e instanceof CommanderError) {
      if (e.code === 'commander.helpDisplayed' || e.code === 'commander.version') return EX.OK;
      if (e.code === 'commander.help') return EX.USAGE; // a command group without its subcommand
      if (e.code === 'commander.executeSubCommandAsync') return EX.SOFTWARE;
      process.stderr.write("pigeon: see 'pigeon --help' or 'pigeon COMMAND --help'\n");
      return EX.USAGE;
    }
    if (isAppError(e)) {
      process.stderr.write(`pigeon: error: ${e.message}\n`);
      return e.exit;
    }
    process.stderr.write(`pigeon: internal error: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
    return EX.SOFTWARE;
  }
}

/** Run as the program (node dist/src/cli.js, or the bin link npm makes to it), not when imported (scripts/gen-man.mjs). */
function isEntry(): boolean {
  const arg = process.argv[1];
  if (arg === undefined) return false;
  try {
    return realpathSync(arg) === realpathSync(fileURLToPath(import.meta.url));
  } catch {
    return true;
  }
}

if (isEntry()) {
  main(process.argv).then(
    (code) => {
      process.exitCode = code;
    },
    (e: unknown) => {
      process.stderr.write(`pigeon: internal error: ${String(e)}\n`);
      process.exitCode = EX_SOFTWARE;
    },
  );
}
