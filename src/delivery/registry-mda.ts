/**
 * NAME        src/delivery/registry-mda — the mailstore's MDA modules, by name (= mailstore.format)
 * DESCRIPTION Static list, no directory scanning: adding a format is its file and one line here.
 *             An MDA module runs inside the mail writer (src/writer/writer-main.ts), as the mail
 *             user; it is therefore always built in, never loaded from a file named in
 *             pigeon.yaml (the writer child would have to load code as the mail user).
 *             MDA_PROGRAMS: the values of `mailstore.mda` besides `builtin` (another server's
 *             delivery program run for the mailbox: src/delivery/dovecot-lda.ts).
 */
import type { MdaModule, MdaProgram } from './mda.js';
import { Registry } from '../modules.js';
import maildir from './maildir.js';
import mbox from './mbox.js';
import dovecotLda from './dovecot-lda.js';

export const MDA_MODULES = new Registry<MdaModule>('mda', [maildir, mbox], (m) =>
  typeof m.store !== 'function' || typeof m.isAllocated !== 'function' ? ['needs isAllocated() and store()'] : [],
);

/** `mailstore.mda builtin`: the format's own MDA module above, in the mail writer */
export const BUILTIN_MDA = 'builtin';

export const MDA_PROGRAMS = new Registry<MdaProgram>('mda', [dovecotLda], (m) => {
  const out: string[] = [];
  if (m.name === BUILTIN_MDA) out.push(`"${BUILTIN_MDA}" is the built-in MDA's name`);
  if (typeof m.deliver !== 'function') out.push('needs deliver()');
  if (!Array.isArray(m.formats) || m.formats.length === 0) out.push('needs formats');
  return out;
});
