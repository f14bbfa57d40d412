/**
 * NAME        forkers/stdio — one session on stdin/stdout pipes
 * SYNOPSIS    pigeon imap --forker stdio ; ssh host pigeon pop3 --forker stdio ; tests
 * DESCRIPTION The client is local (a pipe): plaintext login allowed unless login.plaintext=never;
 *             no STARTTLS (there is no socket to wrap). The client address comes from SSH_CLIENT
 *             when set (parsed; anything else counts as a local pipe, exempt from the per-IP limit).
 *             Logs never go to stdout.
 */
import { Duplex } from 'node:stream';
import { ClientConn } from '../src/proxy/conn.js';
import { parseIp } from '../src/ip.js';
import type { OneShotForker } from './types.js';

export default {
  kind: 'forker',
  name: 'stdio',
  summary: 'one session on stdin/stdout',
  stdioIsProtocol: true,
  connection(): ClientConn {
    const ssh = (process.env['SSH_CLIENT'] ?? '').split(' ');
    const input = Duplex.from({ readable: process.stdin, writable: process.stdout });
    return new ClientConn({
      input,
      output: process.stdout,
      // an address that does not parse is no address (it would key limits and penalties)
      peer: { rip: parseIp(ssh[0] ?? '')?.toString() ?? '', rport: Number(ssh[1] ?? 0) || 0, lip: '', lport: Number(ssh[2] ?? 0) || 0 },
      secure: false,
      local: true,
      canTls: false,
    });
  },
} satisfies OneShotForker;
