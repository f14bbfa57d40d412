/**
 * NAME        auth/registry — the auth sources, by name (the names of `auth.chain`)
 * DESCRIPTION Static list, no directory scanning: adding a source is its file and one line here.
 *             Sources kept outside this tree are named in pigeon.yaml instead:
 *               auth: { chain: [database, ldap], modules: { ldap: /usr/local/lib/pigeon/ldap.js }, ldap: {...} }
 *             `auth.modules` maps a name to an ES module file whose default export is an
 *             AuthSource of that name; its settings are the `auth.NAME` key. Such a file must be
 *             a regular file owned by root (or the user pigeon runs as) and writable by no one
 *             else, like its directory: pigeon loads code from it.
 *             `checkAuthSection` validates the section at configuration load: every name of the
 *             chain known, every key owned by a source, each built-in source's keys parsed by the
 *             source itself.
 * DIAGNOSTICS CONFIG_INVALID naming the key: `auth.chain: unknown auth source "x"; known: …`.
 * SECURITY    A module file anyone else could change is refused before it is imported.
 */
import { statSync } from 'node:fs';
import { dirname, isAbsolute, join } from 'node:path';
import { pathToFileURL } from 'node:url';
import type { AuthSource } from './types.js';
import { AppError } from '../src/errors.js';
import database from './database.js';
import passwdFile from './passwd-file.js';

export const AUTH_SOURCES: ReadonlyMap<string, AuthSource> = new Map<string, AuthSource>([
  [database.name, database],
  [passwdFile.name, passwdFile],
]);

const RESERVED = new Set(['chain', 'modules']);
export const SOURCE_NAME = /^[a-z][a-z0-9-]{0,30}$/;

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
  const known = [...AUTH_SOURCES.keys(), ...Object.keys(modules)];
  chain.forEach((n, i) => {
    if (typeof n !== 'string' || !known.includes(n)) problems.push([['chain', i], `unknown auth source ${JSON.stringify(n)}; known: ${known.join(', ')}`]);
    else if (chain.indexOf(n) !== i) problems.push([['chain', i], `${n} appears twice`]);
  });
  const owned = new Set([...RESERVED, ...Object.keys(modules), ...[...AUTH_SOURCES.values()].flatMap((s) => s.configKeys)]);
  for (const k of Object.keys(auth)) if (!owned.has(k)) problems.push([[k], `unknown key (no auth source uses it; sources: ${known.join(', ')})`]);
  for (const s of AUTH_SOURCES.values()) {
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

/** A module file pigeon may load code from: a regular file nobody but root or us can change. */
function checkModuleFile(path: string, name: string): void {
  const me = process.getuid?.() ?? 0;
  for (const p of [path, dirname(path)]) {
    let st;
    try {
      st = statSync(p);
    } catch (e) {
      throw new AppError('CONFIG_MISSING', `auth.modules.${name}: ${p}: ${(e as NodeJS.ErrnoException).code ?? 'cannot read'}`);
    }
    if (p === path && !st.isFile()) throw new AppError('CONFIG_INVALID', `auth.modules.${name}: ${p} is not a regular file`);
    if ((st.uid !== 0 && st.uid !== me) || (st.mode & 0o022) !== 0) {
      throw new AppError('CONFIG_INVALID', `auth.modules.${name}: ${p} must be owned by root (or uid ${me}) and writable by no one else`);
    }
  }
}

/** The source of one chain name: built in, or loaded from its `auth.modules` file. */
export async function authSource(name: string, auth: Readonly<Record<string, unknown>>, dir: string): Promise<AuthSource> {
  const builtin = AUTH_SOURCES.get(name);
  if (builtin) return builtin;
  const file = declared(auth)[name];
  if (file === undefined) throw new AppError('CONFIG_INVALID', `auth.chain: unknown auth source ${JSON.stringify(name)}`);
  const path = isAbsolute(file) ? file : join(dir, file);
  checkModuleFile(path, name);
  let mod: { default?: unknown };
  try {
    mod = (await import(pathToFileURL(path).href)) as { default?: unknown };
  } catch (e) {
    throw new AppError('CONFIG_INVALID', `auth.modules.${name}: cannot load ${path}: ${e instanceof Error ? e.message.split('\n')[0] : String(e)}`);
  }
  const s = mod.default as Partial<AuthSource> | undefined;
  if (!s || s.kind !== 'auth' || s.name !== name || typeof s.parseConfig !== 'function' || typeof s.create !== 'function') {
    throw new AppError('CONFIG_INVALID', `auth.modules.${name}: ${path} does not export (default) an auth source named ${name}`);
  }
  return s as AuthSource;
}
