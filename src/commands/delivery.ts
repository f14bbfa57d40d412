/**
 * NAME        src/commands/delivery — `pigeon deliver` (pipe(8) MDA) and `pigeon lmtp` (one session)
 * DESCRIPTION See src/delivery/deliver.ts and src/delivery/lmtp.ts. `deliver` owns its exit path:
 *             a usage error, a configuration error or any uncaught error exits 75 with one line
 *             beginning with an enhanced status code, because pipe(8) bounces mail on any other
 *             non-zero status. `lmtp` never writes anything but LMTP to stdout.
 */
import type { Command } from '@commander-js/extra-typings';
import { Option, CommanderError } from '@commander-js/extra-typings';
import { AppError, EX } from '../errors.js';
import { deliverCommand, answer } from '../delivery/deliver-cli.js';
import { statusLine } from '../delivery/outcome.js';
import { loadInstance } from '../instance.js';
import { openInstanceStore } from '../context.js';
import { deliveryLogger } from '../delivery/env.js';
import { remoteStore } from '../peer/remote-store.js';
import { FORKERS, oneShotForkers } from '../../forkers/registry.js';
import { isOneShot } from '../../forkers/types.js';
import { NodeDirectory } from '../nodes.js';

export function registerDelivery(program: Command, cfg: () => string | undefined): void {
  const collect = (v: string, acc: string[]): string[] => [...acc, v];
  const deliver = program
    .command('deliver')
    .description('deliver the message on stdin to RECIPIENTs (MDA for Postfix pipe; dovecot-lda compatible flags)')
    .option('-f, --from <sender>', 'envelope sender (empty or <> for the null sender; default: the Return-Path header)')
    .option('-a, --original <address>', 'original recipient (Postfix ${original_recipient})')
    .option('-d, --destination <address>', 'recipient (repeatable; same as a RECIPIENT argument)', collect, [] as string[])
    .option('-m, --mailbox <folder>', 'deliver into this folder when it exists (default INBOX, or +detail)')
    .option('-p, --path <file>', 'read the message from FILE instead of stdin')
    .addOption(new Option('-e', 'accepted for dovecot-lda compatibility (errors are always reported, never bounced by us)').hideHelp())
    .argument('[recipients...]', 'envelope recipients')
    .addHelpText(
      'after',
      `
Exit status (sysexits): 0 delivered, 67 unknown user, 65 unusable input, 73 over quota,
75 temporary failure of any kind (Postfix retries). On failure one line is printed, starting
with the enhanced status code, e.g. "5.1.1 <bob@example.org>: user unknown".
master.cf:  pigeon unix - n n - - pipe flags=Rq user=mail argv=/usr/local/bin/pigeon -c /etc/pigeon deliver -f \${sender} -a \${original_recipient} -- \${recipient}`,
    )
    .configureOutput({ writeErr: () => undefined, outputError: () => undefined })
    .exitOverride((err: CommanderError) => {
      if (err.code === 'commander.helpDisplayed' || err.code === 'commander.help' || err.code === 'commander.version') throw err;
      answer(EX.TEMPFAIL, statusLine({ dsn: '4.3.5', text: `bad deliver command line: ${err.message.replace(/^error: /, '')}` }));
      process.exit(EX.TEMPFAIL);
    })
    .action(async (recipients, o) => {
      await deliverCommand({ config: cfg(), from: o.from, original: o.original, mailbox: o.mailbox, path: o.path, recipients: [...o.destination, ...recipients] });
    });
  void deliver;

  program
    .command('lmtp')
    .description('serve one LMTP session on stdin/stdout (Postfix spawn, inetd, swaks --pipe)')
    .addOption(
      new Option('--forker <forker>', `how the session arrives: ${oneShotForkers().map((f) => `${f.name} (${f.summary})`).join('; ')}`)
        .choices(oneShotForkers().map((f) => f.name))
        .default('stdio'),
    )
    .action(async (o) => {
      // one session, then exit: nobody could read this process's metrics
      (await import('../metrics.js')).countNothing();
      // loaded here only: keeps smtp-server off the start-up path of every `pigeon deliver`
      const { createLmtpServer, handleLmtpSocket } = await import('../delivery/lmtp.js');
      const { loadModules } = await import('../module-files.js');
      const forker = FORKERS.get(o.forker);
      if (!forker || !isOneShot(forker)) throw new AppError('USAGE', `unknown forker ${JSON.stringify(o.forker)}`);
      const socket = forker.transport().stream;
      const instance = loadInstance(cfg());
      await loadModules(instance);
      // stdout (and under spawn/inetd stderr) is the protocol: log.file, syslog or log.fallback_file
      const logger = deliveryLogger(instance);
      const store = await openInstanceStore(instance, { log: (level, m) => logger.log(level, 'database', m) });
      const nodes = new NodeDirectory(store);
      const server = createLmtpServer({ instance, store, logger, remote: remoteStore(instance, store, nodes), nodes });
      await new Promise<void>((resolve) => {
        socket.once('close', () => resolve());
        handleLmtpSocket(server, socket);
      });
      await store.close();
    });
}
