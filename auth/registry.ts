/**
 * NAME        auth/registry — the auth sources, by name (the names of `auth.chain`)
 * DESCRIPTION Static list, no directory scanning: adding a source is its file and one line here.
 *             Sources kept outside this tree are named in pigeon.yaml instead:
 *               auth: { chain: [database, ldap], modules: { ldap: /usr/local/lib/pigeon/ldap.js }, ldap: {...} }
 *             `auth.modules` maps a name to an ES module file whose default export is an
 *             AuthSource of that name; its settings are the `auth.NAME` key. Such a file must be
 *             a regular file owned by root (or the user pigeon runs as) and writable by no one
 *             else, like its directory: pigeon loads code from it (src/module-files.ts, the
 *             loader every kind shares; the other kinds are named in `modules:`).
 *             `checkAuthSection` validates the section at configuration load: every name of the
 *             chain known, every key owned by a source, each built-in source's keys parsed by the
 *             source itself.
 * DIAGNOSTICS CONFIG_INVALID naming the key: `auth.chain: unknown auth source "x"; known: …`.
 * SECURITY    A module file anyone else could change is refused before it is imported.
 */
import type { AuthSource } from './types.js';
import { AppError } from '../src/errors.js';
import { Registry, MODULE_NAME } from '../src/modules.js';
import { importModuleFile } from '../src/module-files.js';
import database from './database.js';
import passwdFile from './passwd-file.js';

const RESERVED = new Set(['chain', 'modules']);

export const AUTH_SOURCES = new Registry<AuthSource>('auth', [database, passwdFile] as AuthSource[], (s, reg) => {
  const out: string[] = [];
  if (typeof s.parseConfig !== 'function' || typeof s.create !== 'function') out.push('needs parseConfig() and create()');
  if (!Array.isArray(s.configKeys)) out.push('needs configKeys (its keys of the auth: section)');
  else {
    for (const k of s.configKeys) {
      if (RESERVED.has(k)) out.push(`auth.${k} is not a key a source may own`);
      const owner = reg.all().find((o) => o !== s && Array.isArray(o.configKeys) && o.configKeys.includes(k));
      if (owner) out.push(`auth.${k} is auth source ${owner.name}'s`);
    }
  }
  return out;
});

export const SOURCE_NAME = MODULE_NAME;

/** The names `auth.modules` declares (already type-checked as a map of strings, or absent). */
function declared(auth: Readonly<Record<string, unknown>>): Record<string, string> {
  const m = auth['modules'];
  return m !== null && typeof m === 'object' && !Array.isArray(m) ? (m as Record<string, string>) : {};
}

/** Problems in the `auth:` section, each as [key path below auth, message]. */
export function checkAuthSection(auth: Readonly<Record<string, unknown>>): [(string | number)[], string][] {
  const problems: [(string | number)[], string][] = [];
  const chain = Array.isArray(auth['chain']) ? (auth['chain'] as unknown[]) : ['database'];
  const modules = declared(auth);
  for (const name of Object.keys(modules)) {
    if (AUTH_SOURCES.has(name)) problems.push([['modules', name], `${name} is a built-in auth source`]);
    else if (!SOURCE_NAME.test(name) || RESERVED.has(name)) problems.push([['modules', name], 'an auth source name is lower-case letters, digits and hyphens']);
  }
  const known = [...AUTH_SOURCES.names(), ...Object.keys(modules)];
  chain.forEach((n, i) => {
    if (typeof n !== 'string' || !known.includes(n)) problems.push([['chain', i], `unknown auth source ${JSON.stringify(n)}; known: ${known.join(', ')}`]);
    else if (chain.indexOf(n) !== i) problems.push([['chain', i], `${n} appears twice`]);
  });
  const owned = new Set([...RESERVED, ...Object.keys(modules), ...AUTH_SOURCES.all().flatMap((s) => s.configKeys)]);
  for (const k of Object.keys(auth)) if (!owned.has(k)) problems.push([[k], `unknown key (no auth source uses it; sources: ${known.join(', ')})`]);
  for (const s of AUTH_SOURCES.all()) {
    try {
      s.parseConfig(auth, chain.includes(s.name));
    } catch (e) {
      const msg = e instanceof Error ? e.message : String(e);
      const key = s.configKeys.find((k) => msg.startsWith(`${k}:`));
      problems.push([key === undefined ? [] : [key], key === undefined ? msg : msg.slice(key.length + 1).trim()]);
    }
  }
  return problems;
}

/** The source of one chain name: built in, or loaded from its `auth.modules` file. */
export async function authSource(name: string, auth: Readonly<Record<string, unknown>>, dir: string): Promise<AuthSource> {
  const builtin = AUTH_SOURCES.get(name);
  if (builtin) return builtin;
  const file = declared(auth)[name];
  if (file === undefined) throw new AppError('CONFIG_INVALID', `auth.chain: unknown auth source ${JSON.stringify(name)}`);
  const { module, path } = await importModuleFile(file, dir, `auth.modules.${name}`, 'auth', name);
  const s = module as Partial<AuthSource>;
  if (typeof s.parseConfig !== 'function' || typeof s.create !== 'function') {
    throw new AppError('CONFIG_INVALID', `auth.modules.${name}: ${path} does not export (default) an auth source named ${name}`);
  }
  return module as AuthSource;
}
