/**
 * NAME        src/registries — every kind's registry in one place, and their self-check
 * DESCRIPTION `registryProblems` is what the process checks at start (src/module-files.ts
 *             loadModules, after loading an instance's module files) and what the fast test
 *             tier checks for the built-in modules: every module passes its kind's self-check
 *             (src/modules.ts Registry), every setting's default names a registered module, the
 *             defaults of pigeon.yaml and of the CLI name registered modules, and a backend loaded
 *             from a file owns only the section of its own name. Any problem stops the process
 *             with one line naming the module.
 */
import type { Instance } from './instance.js';
import type { ModuleBase, FileModuleKind } from './modules.js';
import { DELIVERY_MODULES } from './delivery/registry.js';
import { MDA_MODULES } from './delivery/registry-mda.js';
import { CREATORS } from './creators/registry.js';
import { BACKENDS, remoteBackend } from '../backends/registry.js';
import { FORKERS, oneShotForkers } from '../forkers/registry.js';
import { AUTH_SOURCES } from '../auth/registry.js';
import { TRUST } from '../certs/trust.js';
import { catalogProblems } from './catalog.js';

/** What a module loaded from a file is added to (src/module-files.ts). */
export interface LoadableRegistry {
  add(m: ModuleBase, file: string): void;
}

export const FILE_REGISTRIES: Readonly<Record<FileModuleKind, LoadableRegistry>> = {
  delivery: DELIVERY_MODULES,
  creator: CREATORS,
  backend: BACKENDS,
  trust: TRUST,
};

export const ALL_REGISTRIES = [DELIVERY_MODULES, MDA_MODULES, CREATORS, BACKENDS, FORKERS, AUTH_SOURCES, TRUST] as const;

/** What is wrong with the registries (and, given an instance, with the modules it loaded). */
export function registryProblems(instance?: Instance): string[] {
  const out: string[] = [];
  for (const r of ALL_REGISTRIES) out.push(...r.problems());
  out.push(...catalogProblems());
  if (!AUTH_SOURCES.has('database')) out.push('auth: the default auth.chain source "database" is not registered');
  if (!TRUST.has('registry')) out.push('trust: the default peer.trust module "registry" is not registered');
  if (!oneShotForkers().some((f) => f.name === 'stdio')) out.push('forker: the default --forker "stdio" is not registered');
  if (remoteBackend() === null) out.push('backend: no remote backend (mailboxes on other nodes could not be reached)');
  for (const b of BACKENDS.all()) {
    const file = BACKENDS.origin(b.name);
    if (file === null || instance === undefined) continue;
    const where = `backend module ${b.name} (${file})`;
    if (b.section !== null && b.section.key !== b.name) out.push(`${where}: its pigeon.yaml section must be named ${b.name}, not ${b.section.key}`);
    else if (b.section === null && instance.raw[b.name] !== undefined) out.push(`${b.name}: unknown key (backend module ${b.name} has no settings)`);
    else if (b.section !== null) {
      try {
        b.section.parse(instance.raw[b.section.key]);
      } catch (e) {
        out.push(`${b.section.key}.${e instanceof Error ? e.message : String(e)}`);
      }
    }
  }
  return out;
}
