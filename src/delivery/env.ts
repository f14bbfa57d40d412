/**
 * NAME        src/delivery/env — the node-local delivery environment (shared by deliver and LMTP)
 * DESCRIPTION Built once per process from the instance: allocation context (store, node, mail
 *             root, mail user), the sendmail command, the host name used in Maildir file names,
 *             and a logger bound to a prefix (`deliver(user)` / `lmtp(user)` lines, Dovecot style);
 *             notices of the MDA modules (src/delivery/notice.ts) go to the same log.
 */
import { hostname } from 'node:os';
import type { Instance } from '../instance.js';
import type { Store } from '../store.js';
import { createLogger, syslogOrFileSink, type Logger } from '../log.js';
import { resolveMailUser } from '../mailuser.js';
import type { DeliveryEnv } from './types.js';
import { onNotice } from './notice.js';
import { createPeerContext, type PeerContext } from '../peer/context.js';

/**
 * `peer`: links to other nodes for users homed there (default: a context of its own, loaded on first
 * use); null where mail must never be forwarded again (a delivery received over a peer link).
 */
export function makeDeliveryEnv(instance: Instance, store: Store, logger: Logger, service: 'deliver' | 'lmtp', peer?: PeerContext | null): DeliveryEnv {
  const mailUser = resolveMailUser(instance.config.mail_user);
  const p = peer === undefined ? createPeerContext(instance, store) : peer;
  onNotice((msg, fields) => logger.log('info', service, msg, fields));
  return {
    peer: p,
    alloc: { store, node: instance.config.node, mailRoot: instance.mailRoot, mailUser, ...(p ? { nodes: p.nodes } : {}) },
    sendmail: instance.config.sendmail,
    hostname: hostname() || 'localhost',
    lockWaitMs: instance.config.limits.mda_lock_wait_s * 1000,
    log: (level, msg, fields) => {
      const user = fields?.['user'];
      logger.log(level, typeof user === 'string' ? `${service}(${user})` : service, msg, fields ? { ...fields, user: undefined } : undefined);
    },
  };
}

/**
 * The log of `pigeon deliver` and `pigeon lmtp`: log.file, else syslog, else log.fallback_file
 * (src/log.ts syslogOrFileSink, as the one-session IMAP/POP3 modes). Never stdout or stderr:
 * pipe(8) reads them as the delivery status, and under spawn(8) or inetd they are the client.
 */
export function deliveryLogger(instance: Instance): Logger {
  const level = instance.config.log.level;
  if (instance.logFile !== null) return createLogger({ level, file: instance.logFile });
  return createLogger({ level, sink: syslogOrFileSink(instance.config.log.syslog_socket, instance.logFallback) });
}
