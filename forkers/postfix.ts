/**
 * NAME        forkers/postfix — run under Postfix's master(8) with spawn(8)
 * SYNOPSIS    master.cf:
 *               127.0.0.1:143 inet n n n - 100 spawn
 *                 -o command_time_limit=86400s -o daemon_timeout=86400s
 *                 user=mail argv=/usr/local/bin/pigeon -c /etc/pigeon imap --forker postfix
 * DESCRIPTION spawn(8) gives the client socket on fds 0, 1 and 2, like inetd; the program runs as
 *             `user=` (never root). The environment holds only MAIL_CONFIG, LANG, TZ and PATH.
 *             Limits and failure delays are shared through the node state service in run_dir,
 *             which that user must own (or reach through its group) — see src/anvil/run-dir.ts.
 */
import type { OneShotForker } from './types.js';
import { socketTransport, inheritedSocket } from './inetd.js';

export default {
  kind: 'forker',
  name: 'postfix',
  summary: 'one session under Postfix spawn(8): the socket on fds 0/1/2',
  stdioIsProtocol: true,
  transport: () => socketTransport(inheritedSocket('postfix'), false),
} satisfies OneShotForker;
