/**
 * NAME        src/delivery/env — the node-local delivery environment (shared by deliver and LMTP)
 * DESCRIPTION Built once per process from the instance: allocation context (store, node, mail
 *             root, mail user), the sendmail command, the host name used in Maildir file names,
 *             and a logger bound to a prefix (`deliver(user)` / `lmtp(user)` lines, Dovecot style).
 */
import { hostname } from 'node:os';
import type { Instance } from '../instance.js';
import type { Store } from '../store.js';
import type { Logger } from '../log.js';
import { resolveMailUser } from '../mailuser.js';
import type { DeliveryEnv } from './types.js';

export function makeDeliveryEnv(instance: Instance, store: Store, logger: Logger, service: 'deliver' | 'lmtp'): DeliveryEnv {
  const mailUser = resolveMailUser(instance.config.mail_user);
  return {
    alloc: { store, node: instance.config.node, mailRoot: instance.mailRoot, mailUser },
    sendmail: instance.config.sendmail,
    hostname: hostname() || 'localhost',
    log: (level, msg, fields) => {
      const user = fields?.['user'];
      logger.log(level, typeof user === 'string' ? `${service}(${user})` : service, msg, fields ? { ...fields, user: undefined } : undefined);
    },
  };
}

/** A logger that writes nothing (pipe mode without log.file: stdout/stderr belong to Postfix). */
export const silentLogger: Logger = { log: () => undefined };
