/** Settings of the vacation (auto-reply) delivery module. */
import type { SettingsSpec } from '../settings.js';

export const vacationSettings = {
  module: 'vacation',
  summary: 'answers incoming mail with an absence notice',
  keys: {
    enabled: { type: 'boolean', default: false, doc: 'send an auto-reply' },
    subject: { type: 'string', default: 'Out of office', doc: 'subject of the reply' },
    body: { type: 'string', default: 'I am away and will read your message when I return.', doc: 'text of the reply' },
    days: { type: 'integer', min: 1, max: 365, default: 7, doc: 'reply at most once per sender in this many days' },
  },
} as const satisfies SettingsSpec;
