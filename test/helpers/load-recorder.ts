// What a Node process loads: files for `node --import REGISTER` (a resolve hook registered with
// node:module's register) that append every URL the process resolves to `loaded`, and at exit
// every node built-in it loaded as `builtin:NAME`. The files go in `dir`; `loaded` must be
// writable by whoever the process runs as.
import { chmodSync, chownSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Test } from 'tap';

/**
 * A directory everyone may read, holding empty files `names` that `uid`:`gid` (the mail user a
 * deliver runs as) may write: where a process records what it loaded. Removed at the test's end.
 */
export function recordDir(t: Test, names: readonly string[], uid: number, gid: number): { rec: string; files: string[] } {
  const rec = mkdtempSync('/tmp/pigeon-rec-');
  t.teardown(() => rmSync(rec, { recursive: true, force: true }));
  chmodSync(rec, 0o755);
  const files = names.map((n) => join(rec, n));
  for (const f of files) {
    writeFileSync(f, '');
    chownSync(f, uid, gid);
  }
  return { rec, files };
}

/** Write the hook and its registration into `dir`; the path to give `--import`. */
export function loadRecorder(dir: string, loaded: string): string {
  const hooks = join(dir, 'hooks.mjs');
  writeFileSync(
    hooks,
    `import { appendFileSync } from 'node:fs';
export async function resolve(specifier, context, next) {
  const r = await next(specifier, context);
  appendFileSync(${JSON.stringify(loaded)}, r.url + '\\n');
  return r;
}
`,
  );
  const register = join(dir, 'register.mjs');
  writeFileSync(
    register,
    `import { register } from 'node:module';
import { appendFileSync } from 'node:fs';
register(${JSON.stringify(`file://${hooks}`)});
process.on('exit', () => {
  const builtins = process.moduleLoadList.filter((m) => m.startsWith('NativeModule ')).map((m) => 'builtin:' + m.slice('NativeModule '.length));
  appendFileSync(${JSON.stringify(loaded)}, builtins.join('\\n') + '\\n');
});
`,
  );
  return register;
}

/**
 * A CommonJS preload for `node -r PRELOAD`: at exit it writes every file require() loaded (JSON)
 * to `out` (created here, in `dir`); `read()` gives that list.
 */
export function requireRecorder(dir: string, name = 'required'): { preload: string; read: () => string[] } {
  const out = join(dir, `${name}.json`);
  const preload = join(dir, `${name}.cjs`);
  writeFileSync(out, '[]');
  writeFileSync(preload, `process.on('exit', () => require('fs').writeFileSync(${JSON.stringify(out)}, JSON.stringify(Object.keys(require.cache))));\n`);
  return { preload, read: () => JSON.parse(readFileSync(out, 'utf8')) as string[] };
}
