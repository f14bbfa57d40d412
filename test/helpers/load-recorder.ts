// What a Node process loads: files for `node --import REGISTER` (a resolve hook registered with
// node:module's register) that append every URL the process resolves to `loaded`, and at exit
// every node built-in it loaded as `builtin:NAME`. The files go in `dir`; `loaded` must be
// writable by whoever the process runs as.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';

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
