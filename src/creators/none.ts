/**
 * NAME        src/creators/none — creator module `none`: mailboxes are provisioned beforehand
 * DESCRIPTION Nothing is created: a user without an allocated mailbox gets NO_SUCH_USER (a login
 *             answers [UNAVAILABLE], a delivery 4.2.1 and the MTA retries).
 */
import type { Creator } from './types.js';
import { AppError } from '../errors.js';

export default {
  kind: 'creator',
  name: 'none',
  summary: 'nothing is created: an unallocated user is an error (pre-provisioned mailboxes)',
  creates: false,
  exclusive: (_ctx, user) => Promise.reject(new AppError('NO_SUCH_USER', `mailbox of ${user.address} is not allocated and mailstore.creator is none`)),
} satisfies Creator;
