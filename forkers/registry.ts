/**
 * NAME        forkers/registry — the forkers, by name (static list; no directory scanning)
 * DESCRIPTION Adding a forker is its file and one line here. The one-shot forkers are the CLI's
 *             `--forker` choices (`pigeon imap|pop3|lmtp --forker NAME`); `listen` is the daemon
 *             of `pigeon serve`. Forkers run before pigeon.yaml is read, so none is loaded from a
 *             file.
 */
import type { Forker, OneShotForker } from './types.js';
import { isOneShot } from './types.js';
import { Registry } from '../src/modules.js';
import stdio from './stdio.js';
import inetd from './inetd.js';
import postfix from './postfix.js';
import listen from './listen-forker.js';

export const FORKERS = new Registry<Forker>('forker', [stdio, inetd, postfix, listen], (f) => (typeof f.stdioIsProtocol !== 'boolean' ? ['needs stdioIsProtocol (boolean)'] : []));

/** The forkers of one-session commands (`--forker` choices). */
export function oneShotForkers(): OneShotForker[] {
  return FORKERS.all().filter(isOneShot);
}
