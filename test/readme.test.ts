// README's two set-up lines and CI stay in step: .ci/run runs exactly README's test line, and the
// install script they share installs every component the integration tests use.
import t from 'tap';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT } from './helpers/instance.js';

const readme = readFileSync(join(ROOT, 'README.md'), 'utf8');
const block = /```sh\n([^\n]*)\n([^\n]*)\n```/.exec(readme);
const strip = (l: string): string => l.replace(/\s+#.*$/, '').trim();

t.test('README opens with the two set-up lines', async (t) => {
  t.ok(block && readme.indexOf(block[0]) < readme.indexOf('\n## '), 'the first code block comes before any section');
  t.match(strip(block?.[1] ?? ''), /^sh scripts\/install-deps\.sh && npm start$/, 'line one installs and starts the demo');
  t.match(strip(block?.[2] ?? ''), /^sh scripts\/install-deps\.sh && npm test$/, 'line two installs and runs the tests');
});

t.test('.ci/run runs exactly README\'s test line', async (t) => {
  const commands = readFileSync(join(ROOT, '.ci', 'run'), 'utf8')
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '' && !l.startsWith('#') && !/^(set |cd )/.test(l));
  t.same(commands, [strip(block?.[2] ?? '')]);
});

t.test('the shared install script installs what the tests drive', async (t) => {
  const sh = readFileSync(join(ROOT, 'scripts', 'install-deps.sh'), 'utf8');
  for (const pkg of ['dovecot-imapd', 'dovecot-pop3d', 'dovecot-lmtpd', 'postfix', 'openbsd-inetd', 'courier-base', 'gamin']) t.match(sh, new RegExp(`\\b${pkg}\\b`), `installs ${pkg}`);
  t.match(sh, /apt-get download courier-imap courier-pop/, "fetches Courier's conflicting .debs");
  t.match(sh, /dpkg -x/, 'and extracts them into the project cache');
  t.match(sh, /npm install/, 'installs the npm packages');
});

t.test('README says near the top how to get the pigeon command, and the set-up line does it', async (t) => {
  const top = readme.slice(0, readme.indexOf('\n## '));
  t.match(top, /\/usr\/local\/bin\/pigeon/, 'where the command comes from, before the first section');
  t.match(top, 'ln -sfn "$PWD/dist/src/cli.cjs" /usr/local/bin/pigeon', 'and the one command when the set-up line could not link it');
  t.notMatch(readme, /chmod \+x dist\/src\/cli\.js/, 'no stale chmod step (npm run build marks cli.js executable)');
  const sh = readFileSync(join(ROOT, 'scripts', 'install-deps.sh'), 'utf8');
  t.ok(sh.indexOf('sh scripts/link-pigeon.sh') > sh.indexOf('npm run --silent build'), 'install-deps.sh links pigeon after the build');
});

t.test("README's Courier paths are the ones the set-up line unpacks", async (t) => {
  const sh = readFileSync(join(ROOT, 'scripts', 'install-deps.sh'), 'utf8');
  for (const p of ['.cache/courier/usr/bin/imapd', '.cache/courier/usr/lib/courier/courier/courierpop3d']) {
    t.match(readme, p, `README names ${p}`);
    t.match(sh, `[ -x ${p} ]`, 'install-deps.sh checks the same path after dpkg -x');
  }
});
