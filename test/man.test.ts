// The man pages pigeon(8) and pigeon.yaml(5): generated from the command and configuration
// definitions (scripts/gen-man.mjs), so the committed pages must be what the generator writes
// now; man(1) renders them; and after `npm pack` + a global install of that package, `man pigeon`
// and `man pigeon.yaml` find them (npm links package.json's "man" entries into share/man).
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT } from './helpers/instance.js';
import { requireProgram } from './helpers/programs.js';

t.setTimeout(240_000);

const sh = (cmd: string, args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv } = {}): { code: number | null; out: string; err: string } => {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 120_000, ...opts });
  // man's pager-less output still overstrikes bold and underline (X\bX, _\bX): plain text
  return { code: r.status, out: r.stdout.replace(/.\x08/g, ''), err: r.stderr };
};

t.test('man/ is what the generator writes from the current definitions', async (t) => {
  const r = sh(process.execPath, [join(ROOT, 'scripts', 'gen-man.mjs'), '--check']);
  t.equal(r.code, 0, `man pages current (${r.err.trim()})`);
});

t.test('man renders both pages, with every command and the configuration keys', async (t) => {
  if (!requireProgram(t, '/usr/bin/man', 'man-db')) return;
  const env = { ...process.env, MANWIDTH: '100', MAN_KEEP_FORMATTING: '0' };
  const p8 = sh('/usr/bin/man', ['-l', '-P', 'cat', join(ROOT, 'man', 'pigeon.8')], { env });
  t.equal(p8.code, 0, `man -l man/pigeon.8 (${p8.err})`);
  t.match(p8.out, /^PIGEON\(8\)/m);
  for (const c of ['pigeon init', 'pigeon serve', 'pigeon deliver', 'pigeon lmtp', 'pigeon config test', 'pigeon user add', 'pigeon auth test', 'pigeon imap']) t.match(p8.out, new RegExp(`^ +${c}(?: |$)`, 'm'), `documents ${c}`);
  t.match(p8.out, /--password-stdin/, 'with the options');
  t.notMatch(p8.err, /error/i, 'no roff errors');
  const p5 = sh('/usr/bin/man', ['-l', '-P', 'cat', join(ROOT, 'man', 'pigeon.yaml.5')], { env });
  t.equal(p5.code, 0, `man -l man/pigeon.yaml.5 (${p5.err})`);
  t.match(p5.out, /^PIGEON\.YAML\(5\)/m);
  for (const k of ['limits.auth_failure_delay_ms', 'log.syslog_socket', 'tls.cert', 'login.plaintext', 'imap.backend']) t.match(p5.out, new RegExp(`^ +${k.replace(/\./g, '\\.')}`, 'm'), `documents ${k}`);
});

t.test('npm pack + npm install -g: man pigeon finds the pages', async (t) => {
  if (!requireProgram(t, '/usr/bin/man', 'man-db')) return;
  const dir = t.testdir({});
  const packed = sh('npm', ['pack', ROOT, '--silent', '--pack-destination', dir], { cwd: dir });
  t.equal(packed.code, 0, `npm pack (${packed.err})`);
  const tgz = join(dir, packed.out.trim().split('\n').pop() ?? '');
  // the package as published (its "files"), installed globally into a prefix of our own; its
  // dependencies are not what this test is about, so they are not fetched (a folder install)
  const pkg = join(dir, 'x');
  mkdirSync(pkg);
  t.equal(sh('tar', ['xzf', tgz, '-C', pkg]).code, 0, 'the tarball unpacks');
  const prefix = join(dir, 'prefix');
  const inst = sh('npm', ['install', '-g', '--prefix', prefix, '--offline', '--ignore-scripts', '--no-audit', '--no-fund', '--loglevel=error', join(pkg, 'package')]);
  t.equal(inst.code, 0, `npm install -g (${inst.err})`);
  const env = { ...process.env, MANPATH: join(prefix, 'share', 'man') };
  const w8 = sh('/usr/bin/man', ['-w', 'pigeon'], { env });
  t.equal(w8.code, 0, `man -w pigeon (${w8.err})`);
  t.match(w8.out.trim(), /\/man\/pigeon\.8$/, 'section 8');
  const w5 = sh('/usr/bin/man', ['-w', 'pigeon.yaml'], { env });
  t.equal(w5.code, 0, `man -w pigeon.yaml (${w5.err})`);
  t.match(w5.out.trim(), /\/man\/pigeon\.yaml\.5$/, 'section 5');
  const page = sh('/usr/bin/man', ['-P', 'cat', 'pigeon'], { env: { ...env, MANWIDTH: '100' } });
  t.match(page.out, /^PIGEON\(8\)/m, 'man pigeon shows pigeon(8)');
  t.equal(sh('test', ['-x', join(prefix, 'bin', 'pigeon')]).code, 0, 'and the pigeon command is installed beside it');
});
