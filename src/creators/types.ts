/**
 * NAME        src/creators/types — the contract of a creator module (mailstore.creator)
 * DESCRIPTION A creator decides how a user's first mailbox is allocated when several processes
 *             or nodes may try at once (src/allocation.ts placeUser, shared by the proxy and the
 *             delivery agent). placeUser makes the attempt — create the mailbox, compare-and-set
 *             the allocation in the database, discard it when the race was lost — and the creator
 *             runs it under its own exclusion: a lock (`lock`), none beyond the compare-and-set
 *             (`cas`), or it creates nothing at all (`none`: `creates` false). Whoever loses a
 *             race re-reads the row and uses the winner's allocation.
 *             Registered by name in src/creators/registry.ts (or named in pigeon.yaml
 *             `modules.creator`).
 */
import type { ModuleBase } from '../modules.js';
import type { AllocationContext } from '../allocation.js';
import type { UserRecord } from '../store.js';

export interface Creator extends ModuleBase<'creator'> {
  /** false: a user without a mailbox is an error (pre-provisioned mailboxes); `exclusive` is never called */
  readonly creates: boolean;
  /**
   * Run `attempt` (null: lost the race, try again) under this creator's exclusion. `settled`,
   * asked before every try, is another allocator's finished answer (then return it instead of
   * waiting any longer); throws AppError TEMPFAIL when the exclusion cannot be had in time.
   */
  exclusive<T>(ctx: AllocationContext, user: UserRecord, attempt: () => Promise<T | null>, settled: () => Promise<T | null>): Promise<T | null>;
}
