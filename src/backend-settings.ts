/**
 * NAME        src/backend-settings — per-user IMAP and POP3 access, and which backend serves it
 * DESCRIPTION `imap.backend` / `pop3.backend` name a local backend of backends/registry.ts
 *             (src/catalog.ts turns the declaration into the list of registered names).
 */
import type { SettingsDecl } from './settings.js';

export const imapSettings = {
  module: 'imap',
  summary: 'IMAP access',
  keys: {
    enabled: { type: 'boolean', default: true, doc: 'whether the user may use IMAP' },
    backend: { type: 'module', kind: 'backend', default: 'dovecot', doc: 'local IMAP server started for the user' },
  },
} as const satisfies SettingsDecl;

export const pop3Settings = {
  module: 'pop3',
  summary: 'POP3 access',
  keys: {
    enabled: { type: 'boolean', default: true, doc: 'whether the user may use POP3' },
    backend: { type: 'module', kind: 'backend', default: 'dovecot', doc: 'local POP3 server started for the user' },
  },
} as const satisfies SettingsDecl;
