/** Node-wide login policy (global scope only): who may send a password without TLS. */
import type { SettingsDecl } from './settings.js';

export const loginSettings = {
  module: 'login',
  summary: 'login policy of the IMAP/POP3 proxy',
  keys: {
    plaintext: {
      type: 'enum',
      values: ['never', 'loopback', 'always'],
      default: 'loopback',
      scopes: ['global'],
      doc: 'password logins without TLS: never, only from loopback clients (default), or always',
    },
    enabled: { type: 'boolean', default: true, doc: 'whether this user or domain may log in at all' },
  },
} as const satisfies SettingsDecl;
