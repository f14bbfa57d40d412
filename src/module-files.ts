/**
 * NAME        src/module-files — modules kept outside this tree, named in pigeon.yaml
 * SYNOPSIS    modules:
 *               delivery: { add-header: /usr/local/lib/pigeon/add-header.mjs }
 *               backend:  { upstream: /usr/local/lib/pigeon/upstream.mjs }
 *               creator:  { ... }   trust: { ... }
 *             auth: { modules: { ldap: /usr/local/lib/pigeon/ldap.mjs } }   (auth sources, auth/registry.ts)
 * DESCRIPTION One way for every kind that can be loaded from a file: a name and an ES module file
 *             whose default export is a module of that kind with that name. `loadModules` loads
 *             an instance's files once per process, before anything uses the registries, and adds
 *             each module to its kind's registry after the kind's self-check (src/modules.ts);
 *             then the registries' own checks run (src/registries.ts), so a module whose settings
 *             or section are wrong stops the process at start with one clear line. A delivery
 *             module's settings join the catalog; a backend's name joins the values of
 *             imap.backend / pop3.backend, and it may own the section of its name in pigeon.yaml.
 *             MDA modules (they run inside the mail writer child) and forkers (they run before
 *             the configuration is read) are built in only.
 * DIAGNOSTICS CONFIG_MISSING / CONFIG_INVALID (exit 78) naming the key:
 *             `modules.delivery.add-header: /x.mjs: ENOENT`, `… does not export (default) a
 *             delivery module named add-header`, `… its settings have no boolean key "enabled"`.
 * SECURITY    pigeon loads code from these files: each must be a regular file owned by root (or
 *             the user pigeon runs as) and writable by no one else, like its directory; a file
 *             anyone else could change is refused before it is imported.
 */
import { statSync } from 'node:fs';
import { dirname, isAbsolute, join } from 'node:path';
import { pathToFileURL } from 'node:url';
import type { Instance } from './instance.js';
import { FILE_MODULE_KINDS } from './modules.js';
import type { ModuleBase } from './modules.js';
import { AppError } from './errors.js';

/** A module file pigeon may load code from: a regular file nobody but root or us can change. `key`: the setting that names it. */
export function checkModuleFile(path: string, key: string): void {
  const me = process.getuid?.() ?? 0;
  for (const p of [path, dirname(path)]) {
    let st;
    try {
      st = statSync(p);
    } catch (e) {
      throw new AppError('CONFIG_MISSING', `${key}: ${p}: ${(e as NodeJS.ErrnoException).code ?? 'cannot read'}`);
    }
    if (p === path && !st.isFile()) throw new AppError('CONFIG_INVALID', `${key}: ${p} is not a regular file`);
    if ((st.uid !== 0 && st.uid !== me) || (st.mode & 0o022) !== 0) {
      throw new AppError('CONFIG_INVALID', `${key}: ${p} must be owned by root (or uid ${me}) and writable by no one else`);
    }
  }
}

/**
 * The default export of the module file `file` (relative to the instance directory `dir`), after
 * the file check; it must be an object of `kind` named `name`.
 */
export async function importModuleFile(file: string, dir: string, key: string, kind: string, name: string): Promise<{ module: ModuleBase; path: string }> {
  const path = isAbsolute(file) ? file : join(dir, file);
  checkModuleFile(path, key);
  let mod: { default?: unknown };
  try {
    mod = (await import(pathToFileURL(path).href)) as { default?: unknown };
  } catch (e) {
    throw new AppError('CONFIG_INVALID', `${key}: cannot load ${path}: ${e instanceof Error ? e.message.split('\n')[0] : String(e)}`);
  }
  const m = mod.default as Partial<ModuleBase> | undefined;
  if (!m || typeof m !== 'object' || m.kind !== kind || m.name !== name) {
    throw new AppError('CONFIG_INVALID', `${key}: ${path} does not export (default) ${kind === 'auth' ? 'an' : 'a'} ${kind === 'auth' ? 'auth source' : `${kind} module`} named ${name}`);
  }
  return { module: m as ModuleBase, path };
}

const loaded = new Map<string, string>();

/**
 * Load the modules `instance` names in `modules:` into their registries (once per process; a
 * second call for the same files does nothing), then run every registry's self-check.
 */
export async function loadModules(instance: Instance): Promise<void> {
  const { FILE_REGISTRIES: regs, registryProblems } = await import('./registries.js');
  for (const kind of FILE_MODULE_KINDS) {
    for (const [name, file] of Object.entries(instance.config.modules[kind])) {
      const key = `modules.${kind}.${name}`;
      const path = isAbsolute(file) ? file : join(instance.dir, file);
      if (loaded.get(key) === path) continue;
      if (loaded.has(key)) throw new AppError('CONFIG_INVALID', `${key}: already loaded from ${loaded.get(key) ?? ''}; restart to load ${path}`);
      const { module } = await importModuleFile(file, instance.dir, key, kind, name);
      try {
        regs[kind].add(module, path);
      } catch (e) {
        throw new AppError('CONFIG_INVALID', `${key}: ${path}: ${e instanceof Error ? e.message : String(e)}`);
      }
      loaded.set(key, path);
    }
  }
  const problems = registryProblems(instance);
  if (problems.length > 0) throw new AppError('CONFIG_INVALID', `${problems[0] ?? ''}${problems.length > 1 ? ` (and ${problems.length - 1} more)` : ''}`);
}
