// Integration tests need real programs. A missing one fails the test loudly, naming the Debian
// package — unless the run sets PIGEON_TEST_ALLOW_MISSING=1, an explicit opt-out (reported as SKIP).
import { existsSync } from 'node:fs';
import type { Test } from 'tap';

export function requireProgram(t: Test, path: string, pkg: string): boolean {
  if (existsSync(path)) return true;
  const msg = `${path} is missing: install the Debian package ${pkg} (apt-get install ${pkg}), or run scripts/install-deps.sh`;
  if (process.env['PIGEON_TEST_ALLOW_MISSING'] === '1') t.pass(msg, { skip: msg });
  else t.fail(msg);
  return false;
}
