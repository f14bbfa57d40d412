// An imapflow client whose connection comes from `from` (a loopback address of this host, as the
// bench's idle rows use): per-IP limits and `pigeon who` see each client's own address.
import { connect } from 'node:net';
import { ImapFlow } from 'imapflow';

export function imapFrom(port: number, user: string, pass: string, from: string): ImapFlow {
  const c = new ImapFlow({
    host: '127.0.0.1',
    port,
    secure: false,
    doSTARTTLS: false,
    auth: { user, pass },
    logger: false,
    emitLogs: false,
    connectionTimeout: 60_000,
    transport: { connect: (o: { host: string; port: number }, onConnect: () => void) => connect({ host: o.host, port: o.port, localAddress: from }, onConnect) },
  } as ConstructorParameters<typeof ImapFlow>[0]);
  c.on('error', () => undefined);
  return c;
}
