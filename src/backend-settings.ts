/** Which local server a user's IMAP or POP3 session is handed to after login. */
import type { SettingsSpec } from './settings.js';

export const imapSettings = {
  module: 'imap',
  summary: 'IMAP access',
  keys: {
    enabled: { type: 'boolean', default: true, doc: 'whether the user may use IMAP' },
    backend: { type: 'enum', values: ['dovecot', 'courier'], default: 'dovecot', doc: 'local IMAP server started for the user' },
  },
} as const satisfies SettingsSpec;

export const pop3Settings = {
  module: 'pop3',
  summary: 'POP3 access',
  keys: {
    enabled: { type: 'boolean', default: true, doc: 'whether the user may use POP3' },
    backend: { type: 'enum', values: ['dovecot', 'courier'], default: 'dovecot', doc: 'local POP3 server started for the user' },
  },
} as const satisfies SettingsSpec;
