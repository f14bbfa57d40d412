/**
 * NAME        src/creators/cas — creator module `cas`: compare-and-set on the user's version only
 * DESCRIPTION For nodes on several hosts without a shared lock: every racer creates its mailbox
 *             and tries the compare-and-set; the loser discards its empty mailbox and uses the
 *             winner's (src/allocation.ts).
 */
import type { Creator } from './types.js';

export default {
  kind: 'creator',
  name: 'cas',
  summary: "compare-and-set on the user's version column only (nodes on several hosts)",
  creates: true,
  exclusive: (_ctx, _user, attempt) => attempt(),
} satisfies Creator;
