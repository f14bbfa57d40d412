/** Settings of the mailstore delivery module (where and how a mailbox lives). */
import type { SettingsSpec } from '../settings.js';

export const mailstoreSettings = {
  module: 'mailstore',
  summary: 'stores mail in the user\'s mailbox',
  keys: {
    enabled: { type: 'boolean', default: true, doc: 'store incoming mail in the mailbox' },
    format: { type: 'enum', values: ['maildir', 'mbox'], default: 'maildir', doc: 'MDA module: mailbox format' },
    creator: { type: 'enum', values: ['lock', 'cas', 'none'], default: 'lock', doc: 'creator module: how a new mailbox is allocated (lock, cas, or none = must exist)' },
    quota: { type: 'integer', min: 0, default: 0, doc: 'mailbox quota in bytes (Maildir++ maildirsize); 0 = unlimited' },
    detail: { type: 'boolean', default: true, doc: 'deliver user+folder@domain into folder when it exists' },
  },
} as const satisfies SettingsSpec;
