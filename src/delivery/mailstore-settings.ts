/** Settings of the mailstore delivery module (where and how a mailbox lives). */
import type { SettingsSpec } from '../settings.js';

export const mailstoreSettings = {
  module: 'mailstore',
  summary: 'stores mail in the user\'s mailbox',
  keys: {
    enabled: { type: 'boolean', default: true, doc: 'store incoming mail in the mailbox' },
    format: { type: 'enum', values: ['maildir', 'mbox'], default: 'maildir', doc: 'MDA module: mailbox format' },
    creator: { type: 'enum', values: ['lock', 'cas', 'none'], default: 'lock', doc: 'creator module: how a new mailbox is allocated (lock, cas, or none = must exist)' },
    placement: {
      type: 'enum',
      values: ['local', 'fewest'],
      default: 'local',
      doc: 'where a new mailbox is allocated: on the node that first needs it (local), or on the running node with the fewest users (fewest)',
    },
    quota: { type: 'integer', min: 0, default: 0, doc: 'mailbox quota in bytes (Maildir++ maildirsize); 0 = unlimited' },
    quota_full: { type: 'enum', values: ['bounce', 'defer'], default: 'bounce', doc: 'over quota: bounce (552 5.2.2) or defer and retry later (452 4.2.2)' },
    max_size: { type: 'integer', min: 0, default: 67108864, doc: 'largest message accepted in bytes (552 5.3.4 above it); 0 = unlimited' },
    detail: { type: 'boolean', default: true, doc: 'deliver user+folder@domain into folder when it exists' },
  },
} as const satisfies SettingsSpec;
