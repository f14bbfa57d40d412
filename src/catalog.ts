/**
 * NAME        src/catalog — every module that has per-user settings, registered by name
 * DESCRIPTION Static map, no directory scanning. Each module's keys live in that module's own file;
 *             this file only lists them. Adding a module is adding one file and one line here.
 */
import type { SettingsSpec, KeySpec } from './settings.js';
import { AppError } from './errors.js';
import { loginSettings } from './login-settings.js';
import { imapSettings, pop3Settings } from './backend-settings.js';
import { mailstoreSettings } from './delivery/mailstore-settings.js';
import { forwardSettings } from './delivery/forward-settings.js';
import { vacationSettings } from './delivery/vacation-settings.js';

export const CATALOG: ReadonlyMap<string, SettingsSpec> = new Map(
  [loginSettings, imapSettings, pop3Settings, mailstoreSettings, forwardSettings, vacationSettings].map((s) => [s.module, s]),
);

export function moduleNames(): string[] {
  return [...CATALOG.keys()];
}

export function allKeys(): string[] {
  const out: string[] = [];
  for (const s of CATALOG.values()) for (const k of Object.keys(s.keys)) out.push(`${s.module}.${k}`);
  return out;
}

/** Look up `module.key` (or `module.*` when allowStar); unknown names are refused with the valid list. */
export function lookupKey(name: string, allowStar = false): { module: string; key: string; spec: KeySpec | null } {
  const dot = name.indexOf('.');
  const module = dot < 0 ? name : name.slice(0, dot);
  const key = dot < 0 ? '' : name.slice(dot + 1);
  const mod = CATALOG.get(module);
  if (!mod) {
    throw new AppError('UNKNOWN_KEY', `unknown module "${module}" in ${JSON.stringify(name)}; modules: ${moduleNames().join(', ')}`);
  }
  if (key === '*' && allowStar) return { module, key, spec: null };
  const spec = mod.keys[key];
  if (!spec) {
    const valid = Object.keys(mod.keys).map((k) => `${module}.${k}`);
    throw new AppError('UNKNOWN_KEY', `unknown key ${JSON.stringify(name)}; valid keys of ${module}: ${valid.join(', ')}${allowStar ? `, ${module}.*` : ''}`);
  }
  return { module, key, spec };
}
