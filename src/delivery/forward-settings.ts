/** Settings of the forward delivery module. */
import type { SettingsSpec } from '../settings.js';

export const forwardSettings = {
  module: 'forward',
  summary: 'forwards incoming mail to other addresses',
  keys: {
    enabled: { type: 'boolean', default: false, doc: 'forward incoming mail' },
    to: { type: 'string-list', default: [], doc: 'addresses to forward to (comma-separated or JSON list)' },
    keep: { type: 'boolean', default: true, doc: 'also keep a copy in the mailbox' },
  },
} as const satisfies SettingsSpec;
