/**
 * NAME        src/delivery/env — the node-local delivery environment (deliver, LMTP, peer receiver)
 * DESCRIPTION Built once per process from the instance: allocation context (store, node, mail
 *             root, mail user, the cluster's nodes), the sendmail command, dovecot-lda's path and
 *             time limit (pigeon.yaml `dovecot:`), the host name used in
 *             Maildir file names, how recipients homed on other nodes are stored (`remote`, given
 *             by the caller: the peer link, built on its first use; null where a message must
 *             never travel again), and a logger bound to a prefix (`deliver(user)` / `lmtp(user)`
 *             lines, Dovecot style); notices of the MDA modules (src/delivery/notice.ts) go to the
 *             same log.
 */
import { hostname } from 'node:os';
import type { Instance } from '../instance.js';
import type { Store } from '../store.js';
import { createLogger, syslogOrFileSink, type Logger } from '../log.js';
import type { NodeDirectory } from '../nodes.js';
import { resolveMailUser } from '../mailuser.js';
import type { DeliveryEnv, RemoteStore } from './types.js';
import { onNotice } from './notice.js';
import { dovecotSection } from '../../backends/dovecot.js';

export function makeDeliveryEnv(instance: Instance, store: Store, logger: Logger, service: 'deliver' | 'lmtp', remote: RemoteStore | null, nodes?: NodeDirectory): DeliveryEnv {
  const mailUser = resolveMailUser(instance.config.mail_user);
  onNotice((msg, fields) => logger.log('info', service, msg, fields));
  const dovecot = dovecotSection(instance.raw['dovecot']);
  return {
    remote,
    alloc: { store, node: instance.config.node, mailRoot: instance.mailRoot, mailUser, ...(nodes ? { nodes } : {}) },
    sendmail: instance.config.sendmail,
    hostname: hostname() || 'localhost',
    lockWaitMs: instance.config.limits.mda_lock_wait_s * 1000,
    dovecotLda: { path: dovecot.lda, timeoutMs: dovecot.lda_timeout_s * 1000 },
    clamd: { address: instance.config.clamd.address, timeoutMs: instance.config.clamd.timeout_s * 1000 },
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
