/**
 * NAME        src/settings — how a module declares its per-user settings
 * DESCRIPTION A module lists its keys once: type, default, which scopes may set it, and a one-line
 *             description. The CLI validates `config set` against it (a typo is refused with the
 *             list of valid keys); the resolver fills defaults from it. A key whose value names a
 *             module of another kind (`mailstore.format` an MDA, `imap.backend` a backend) is
 *             declared `{ type: 'module', kind }`: the settings catalog (src/catalog.ts) turns it
 *             into the list of the names registered now.
 */
import { AppError } from './errors.js';
import type { Kind } from './modules.js';

export type Json = null | boolean | number | string | Json[] | { [k: string]: Json };

export type KeyType =
  | { readonly type: 'boolean' }
  | { readonly type: 'integer'; readonly min?: number; readonly max?: number }
  | { readonly type: 'string'; readonly pattern?: RegExp }
  | { readonly type: 'enum'; readonly values: readonly string[] }
  | { readonly type: 'string-list' };

export type Scope = 'global' | 'domain' | 'user';

export type KeySpec = KeyType & {
  readonly default: Json;
  readonly doc: string;
  /** scopes allowed to set this key; default all three */
  readonly scopes?: readonly Scope[];
};

export interface SettingsSpec {
  readonly module: string;
  readonly summary: string;
  readonly keys: Readonly<Record<string, KeySpec>>;
}

/** A key as a module declares it: a KeySpec, or the name of a registered module of `kind`. */
export type KeyDecl = KeySpec | ({ readonly type: 'module'; readonly kind: Kind } & Omit<KeySpec, 'type'>);

/** A module's settings as it declares them (src/catalog.ts makes a SettingsSpec of them). */
export interface SettingsDecl {
  readonly module: string;
  readonly summary: string;
  readonly keys: Readonly<Record<string, KeyDecl>>;
}

/** What is wrong with a module's declared keys (the registries' self-check). */
export function declProblems(keys: Readonly<Record<string, KeyDecl>> | undefined): string[] {
  if (keys === null || typeof keys !== 'object') return ['declares no settings'];
  const out: string[] = [];
  const enabled = keys['enabled'];
  if (!enabled || enabled.type !== 'boolean') out.push('its settings have no boolean key "enabled" (it would never run)');
  for (const [k, spec] of Object.entries(keys)) {
    if (!/^[a-z][a-z0-9_]{0,40}$/.test(k)) out.push(`setting ${JSON.stringify(k)}: a key is lower-case letters, digits and underscores`);
    else if (spec === null || typeof spec !== 'object' || typeof spec.doc !== 'string') out.push(`setting ${k}: no doc`);
    else if (spec.type !== 'module' && !checkValue(spec, spec.default)) out.push(`setting ${k}: default ${JSON.stringify(spec.default)} is not a ${typeName(spec)}`);
  }
  return out;
}

function typeName(k: KeyType): string {
  switch (k.type) {
    case 'enum':
      return k.values.join('|');
    case 'string-list':
      return 'list of strings';
    default:
      return k.type;
  }
}

/** Parse a CLI value for `key` ("true", "42", "a,b", or JSON) into its typed JSON value. */
export function parseValue(name: string, spec: KeySpec, raw: string): Json {
  const bad = (why: string): never => {
    throw new AppError('INVALID_VALUE', `${name}: invalid value ${JSON.stringify(raw)}: expected ${typeName(spec)}${why ? ` (${why})` : ''}`);
  };
  switch (spec.type) {
    case 'boolean': {
      const v = raw.trim().toLowerCase();
      if (['true', 'yes', 'on', '1'].includes(v)) return true;
      if (['false', 'no', 'off', '0'].includes(v)) return false;
      return bad('');
    }
    case 'integer': {
      if (!/^-?\d+$/.test(raw.trim())) return bad('');
      const n = Number(raw.trim());
      if (!Number.isSafeInteger(n)) return bad('out of range');
      if (spec.min !== undefined && n < spec.min) return bad(`minimum ${spec.min}`);
      if (spec.max !== undefined && n > spec.max) return bad(`maximum ${spec.max}`);
      return n;
    }
    case 'string':
      if (/[\r\n\0]/.test(raw)) return bad('no CR, LF or NUL');
      if (spec.pattern && !spec.pattern.test(raw)) return bad(`must match ${spec.pattern.source}`);
      return raw;
    case 'enum':
      if (!spec.values.includes(raw)) return bad('');
      return raw;
    case 'string-list': {
      let list: unknown;
      if (raw.trim().startsWith('[')) {
        try {
          list = JSON.parse(raw);
        } catch {
          return bad('not valid JSON');
        }
      } else {
        list = raw.split(',').map((s) => s.trim()).filter((s) => s !== '');
      }
      if (!Array.isArray(list) || !list.every((s): s is string => typeof s === 'string' && !/[\r\n\0]/.test(s))) {
        return bad('');
      }
      return list;
    }
  }
}

/** Check a stored JSON value against its spec (database rows written by other tools). */
export function checkValue(spec: KeySpec, v: Json): boolean {
  switch (spec.type) {
    case 'boolean':
      return typeof v === 'boolean';
    case 'integer':
      return typeof v === 'number' && Number.isSafeInteger(v);
    case 'string':
      return typeof v === 'string';
    case 'enum':
      return typeof v === 'string' && spec.values.includes(v);
    case 'string-list':
      return Array.isArray(v) && v.every((s) => typeof s === 'string');
  }
}

export function describeType(spec: KeySpec): string {
  return typeName(spec);
}
