/**
 * NAME        src/catalog — every per-user setting, derived from the registries
 * DESCRIPTION The settings modules are the proxy's own (login, imap, pop3), one per delivery
 *             module (src/delivery/registry.ts), whose keys each module declares in its own file,
 *             those of a backend that declares its own (backends/upstream.ts: upstream.*) and
 *             those an MDA program declares (dovecot-lda: sieve.*).
 *             A key declared `{ type: 'module', kind }` becomes an enum of the names registered
 *             now (mailstore.format: the MDA modules, mailstore.creator: the creators,
 *             imap.backend / pop3.backend: the local backends). Rebuilt when a registry gains a
 *             module from a file (src/module-files.ts), so `config set`, `config keys` and the
 *             resolver always see what this process can run.
 */
import type { SettingsDecl, SettingsSpec, KeySpec, KeyDecl } from './settings.js';
import type { Kind } from './modules.js';
import { AppError } from './errors.js';
import { loginSettings } from './login-settings.js';
import { imapSettings, pop3Settings } from './backend-settings.js';
import { DELIVERY_MODULES } from './delivery/registry.js';
import { MDA_MODULES, MDA_PROGRAMS } from './delivery/registry-mda.js';
import { CREATORS } from './creators/registry.js';
import { BACKENDS, localBackends } from '../backends/registry.js';

/** the settings modules that are not delivery modules */
export const CORE_SETTINGS: readonly SettingsDecl[] = [loginSettings, imapSettings, pop3Settings];

/** The names a `{ type: 'module', kind }` key accepts now. */
export function choicesOf(kind: Kind): string[] {
  switch (kind) {
    case 'mda':
      return MDA_MODULES.names();
    case 'creator':
      return CREATORS.names();
    case 'backend':
      return localBackends().map((b) => b.name);
    case 'delivery':
      return DELIVERY_MODULES.names();
    default:
      return [];
  }
}

function specOf(k: KeyDecl): KeySpec {
  if (k.type !== 'module') return k;
  const { kind, ...rest } = k;
  return { ...rest, type: 'enum', values: choicesOf(kind) };
}

/** Every settings declaration: the core's, the delivery modules', the backends' own. */
function declarations(): SettingsDecl[] {
  return [
    ...CORE_SETTINGS,
    // a backend's own per-user settings (upstream.host, …)
    ...BACKENDS.all().flatMap((b) => (b.settings !== undefined ? [b.settings] : [])),
    ...DELIVERY_MODULES.all().map((m) => ({ module: m.name, summary: m.summary, keys: m.settings })),
    ...MDA_PROGRAMS.all().flatMap((p) => (p.settings ? [p.settings] : [])),
  ];
}

function build(): ReadonlyMap<string, SettingsSpec> {
  const out = new Map<string, SettingsSpec>();
  for (const d of declarations()) {
    // a second declaration of a name is a problem (catalogProblems): the first one stays
    if (!out.has(d.module)) out.set(d.module, { module: d.module, summary: d.summary, keys: Object.fromEntries(Object.entries(d.keys).map(([k, v]) => [k, specOf(v)])) });
  }
  return out;
}

let cached: ReadonlyMap<string, SettingsSpec> | null = null;
for (const r of [DELIVERY_MODULES, MDA_MODULES, CREATORS, BACKENDS]) r.onChange(() => (cached = null));

/** Every settings module by name, with its keys. */
export function catalog(): ReadonlyMap<string, SettingsSpec> {
  cached ??= build();
  return cached;
}

/** What is wrong with the catalog: a settings module declared twice, a key whose default names no registered module. */
export function catalogProblems(): string[] {
  const out: string[] = [];
  const seen = new Set<string>();
  for (const d of declarations()) {
    if (seen.has(d.module)) out.push(`settings module ${d.module} is declared twice (a delivery module and a backend, or a core module, share the name)`);
    seen.add(d.module);
  }
  for (const s of catalog().values()) {
    for (const [k, spec] of Object.entries(s.keys)) {
      if (spec.type === 'enum' && typeof spec.default === 'string' && !spec.values.includes(spec.default)) {
        out.push(`setting ${s.module}.${k}: default ${JSON.stringify(spec.default)} is none of ${spec.values.join(', ') || '(no module registered)'}`);
      }
    }
  }
  return out;
}

export function moduleNames(): string[] {
  return [...catalog().keys()];
}

export function allKeys(): string[] {
  const out: string[] = [];
  for (const s of catalog().values()) for (const k of Object.keys(s.keys)) out.push(`${s.module}.${k}`);
  return out;
}

/** Look up `module.key` (or `module.*` when allowStar); unknown names are refused with the valid list. */
export function lookupKey(name: string, allowStar = false): { module: string; key: string; spec: KeySpec | null } {
  const dot = name.indexOf('.');
  const module = dot < 0 ? name : name.slice(0, dot);
  const key = dot < 0 ? '' : name.slice(dot + 1);
  const mod = catalog().get(module);
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
