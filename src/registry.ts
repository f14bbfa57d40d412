/**
 * NAME        src/registry — modules by name (static map; no directory scanning)
 * DESCRIPTION Adding a backend is adding one file and one line here. An unknown name in the
 *             configuration is refused at the point of use with the list of known names.
 */
import type { Backend } from '../backends/types.js';
import dovecot from '../backends/dovecot.js';
import courier from '../backends/courier.js';

export const BACKENDS: ReadonlyMap<string, Backend> = new Map<string, Backend>([
  [dovecot.name, dovecot],
  [courier.name, courier],
]);
