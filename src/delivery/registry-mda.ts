/**
 * NAME        src/delivery/registry-mda — the mailstore's MDA modules, by name (= mailstore.format)
 * DESCRIPTION Static list, no directory scanning: adding a format is its file and one line here.
 *             An MDA module runs inside the mail writer (src/writer/writer-main.ts), as the mail
 *             user; it is therefore always built in, never loaded from a file named in
 *             pigeon.yaml (the writer child would have to load code as the mail user).
 */
import type { MdaModule } from './mda.js';
import { Registry } from '../modules.js';
import maildir from './maildir.js';
import mbox from './mbox.js';

export const MDA_MODULES = new Registry<MdaModule>('mda', [maildir, mbox], (m) =>
  typeof m.store !== 'function' || typeof m.isAllocated !== 'function' ? ['needs isAllocated() and store()'] : [],
);
