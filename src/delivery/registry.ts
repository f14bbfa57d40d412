/**
 * NAME        src/delivery/registry — the delivery modules, by name (= settings module name)
 * DESCRIPTION Static list, no directory scanning. Modules run in phase order (scan, store,
 *             notify); within a phase in the order listed here. forward comes before mailstore
 *             so that `forward.keep = false` can skip the store, and so that its sendmail commit
 *             runs before the mailbox rename (see src/delivery/types.ts).
 *             Adding a module: one file, one line here, its settings in src/catalog.ts.
 */
import type { DeliveryModule } from './types.js';
import { PHASES } from './types.js';
import forward from './forward.js';
import mailstore from './mailstore.js';
import vacation from './vacation.js';

const LIST: readonly DeliveryModule[] = [forward, mailstore, vacation];

export const DELIVERY_MODULES: ReadonlyMap<string, DeliveryModule> = new Map(LIST.map((m) => [m.name, m]));

/** Every module in run order. */
export const RUN_ORDER: readonly DeliveryModule[] = PHASES.flatMap((p) => LIST.filter((m) => m.phase === p));
