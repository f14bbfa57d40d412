/**
 * NAME        src/delivery/registry — the delivery modules, by name (= their settings module)
 * DESCRIPTION Static list, no directory scanning. Modules run in phase order (scan, store,
 *             notify); within a phase in the order listed here, then those loaded from files
 *             (pigeon.yaml `modules.delivery`) in the order they were declared. forward comes
 *             before mailstore so that `forward.keep = false` can skip the store, and so that its
 *             sendmail commit runs before the mailbox rename (see src/delivery/types.ts).
 *             Adding a module: its file (settings included) and one line here. The self-check
 *             refuses a module without a boolean `enabled` key (it would never run), an unknown
 *             phase, or a name another settings module uses.
 */
import type { DeliveryModule } from './types.js';
import { PHASES } from './types.js';
import { Registry } from '../modules.js';
import { declProblems } from '../settings.js';
import forward from './forward.js';
import mailstore from './mailstore.js';
import vacation from './vacation.js';
import { MDA_PROGRAMS } from './registry-mda.js';
import antivirus from './antivirus.js';

/** settings modules that are not delivery modules (src/catalog.ts): a delivery module may not take their name */
export const RESERVED_SETTINGS = ['login', 'imap', 'pop3'];

export const DELIVERY_MODULES = new Registry<DeliveryModule>('delivery', [antivirus, forward, mailstore, vacation], (m) => {
  const out = declProblems(m.settings);
  if (!PHASES.includes(m.phase)) out.push(`phase ${JSON.stringify(m.phase)} is not one of ${PHASES.join(', ')}`);
  if (typeof m.run !== 'function') out.push('no run()');
  if (RESERVED_SETTINGS.includes(m.name)) out.push(`${m.name} is the name of a settings module that is not a delivery module`);
  // an MDA program's settings module (dovecot-lda: sieve)
  if (MDA_PROGRAMS.all().some((p) => p.settings?.module === m.name)) out.push(`${m.name} is the name of the settings module of an MDA program`);
  return out;
});

/** Every module in run order. */
export function runOrder(): readonly DeliveryModule[] {
  const all = DELIVERY_MODULES.all();
  return PHASES.flatMap((p) => all.filter((m) => m.phase === p));
}
