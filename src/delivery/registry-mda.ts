/**
 * NAME        src/delivery/registry-mda — the mailstore's MDA modules, by name (= mailstore.format)
 * DESCRIPTION Static map, no directory scanning. The creator modules (lock, cas, none) live in
 *             the shared src/allocation.ts, because the proxy allocates with them too.
 */
import type { MdaModule } from './mda.js';
import maildir from './maildir.js';
import mbox from './mbox.js';

export const MDA_MODULES: ReadonlyMap<string, MdaModule> = new Map([maildir, mbox].map((m) => [m.name, m]));
