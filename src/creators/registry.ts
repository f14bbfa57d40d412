/**
 * NAME        src/creators/registry — the creator modules, by name (= mailstore.creator)
 * DESCRIPTION Static list, no directory scanning: adding a creator is its file and one line here
 *             (or, kept outside this tree, a line in pigeon.yaml `modules.creator`).
 */
import type { Creator } from './types.js';
import { Registry } from '../modules.js';
import lock from './lock.js';
import cas from './cas.js';
import none from './none.js';

export const CREATORS = new Registry<Creator>('creator', [lock, cas, none], (c) =>
  typeof c.creates !== 'boolean' || typeof c.exclusive !== 'function' ? ['needs creates (boolean) and exclusive()'] : [],
);
