// Modules kept outside this tree (issue #18): the example delivery module of README "Writing a
// module" (test/fixtures/delivery-add-header.mjs) and a dummy backend
// (test/fixtures/backend-dummy.mjs) plug in through one line each of pigeon.yaml `modules:`,
// like the dummy auth source through `auth.modules` (test/auth-modules.test.ts). Their settings
// join the catalog, the backend joins the values of imap.backend, and a module that breaks its
// kind's contract stops the process at start with one line naming it.
import t from 'tap';
import { copyFileSync, chmodSync, readFileSync, writeFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { cli, makeInstance, setUser, maildirOf, files, msg, CLI } from './helpers/delivery-env.js';
import { scratchDir, ROOT } from './helpers/instance.js';

const ALICE = 'alice@example.test';

/** An instance whose conf.d names the test modules (copied next to it, as an admin would install them). */
function withModules(t: Parameters<typeof scratchDir>[0]): { inst: string; conf: string } {
  const inst = makeInstance(scratchDir(t));
  for (const f of ['delivery-add-header.mjs', 'backend-dummy.mjs']) {
    copyFileSync(join(ROOT, 'test', 'fixtures', f), join(inst, f));
    chmodSync(join(inst, f), 0o644);
  }
  mkdirSync(join(inst, 'conf.d'), { recursive: true });
  const conf = join(inst, 'conf.d', '80-modules.yaml');
  writeFileSync(conf, 'modules:\n  delivery:\n    add-header: delivery-add-header.mjs\n  backend:\n    dummy: backend-dummy.mjs\n');
  return { inst, conf };
}

t.test('the example delivery module: its settings are in the catalog, it adds its header to the stored copy', async (t) => {
  const { inst } = withModules(t);
  const keys = cli(inst, ['config', 'keys']);
  t.equal(keys.code, 0, keys.stderr);
  t.match(keys.stdout, /^add-header\.enabled\tboolean\tdefault false\t/m, 'its keys are listed with their defaults');
  let r = cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg({ subject: 'before' }));
  t.equal(r.code, 0, r.stdout);
  setUser(inst, ALICE, 'add-header.enabled', 'true');
  setUser(inst, ALICE, 'add-header.value', 'from the example module');
  r = cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg({ subject: 'after' }));
  t.equal(r.code, 0, r.stdout);
  const dir = join(maildirOf(inst, ALICE), 'new');
  const stored = files(dir).map((f) => readFileSync(join(dir, f), 'latin1'));
  t.equal(stored.length, 2);
  t.equal(stored.filter((m) => /^X-Pigeon-Example: from the example module$/m.test(m)).length, 1, 'only the copy delivered while enabled has the header');
  t.match(stored.find((m) => /Subject: after/.test(m)) ?? '', /^Return-Path: <bob@remote\.test>\nDelivered-To: alice@example\.test\nX-Pigeon-Example: /, 'above the message\'s own header');
  r = cli(inst, ['config', 'set', '--user', ALICE, 'add-header.colour', 'red']);
  t.equal(r.code, 64, 'a key the module does not declare is refused like any other');
});

t.test('the dummy backend: a value of imap.backend, a login goes to it', async (t) => {
  const { inst } = withModules(t);
  let r = cli(inst, ['config', 'set', '--user', ALICE, 'imap.backend', 'nosuch']);
  t.not(r.code, 0, 'an unknown backend is refused');
  t.match(r.stderr, /dovecot\|courier\|upstream\|dummy/, 'the choices include the loaded backend');
  setUser(inst, ALICE, 'imap.backend', 'dummy');
  const s = spawnSync(process.execPath, [CLI, '-c', inst, 'imap', '--forker', 'stdio'], { input: 'a LOGIN alice@example.test secret\r\nb NOOP\r\nc LOGOUT\r\n', encoding: 'utf8', timeout: 60_000 });
  t.match(s.stdout, /a OK \[CAPABILITY IMAP4rev1\] Logged in to dummy\r\n/, 'the backend answers the login tag');
  t.match(s.stdout, /b OK dummy alice@example\.test\r\n/, 'and the commands after it, through the relay');
  t.match(s.stdout, /c OK LOGOUT\r\n/);
  r = cli(inst, ['config', 'test']);
  t.match(r.stdout, /imap\.backend dummy: \/bin\/echo starts \(user alice@example\.test\)/, 'config test probes it like a built-in backend');
});

t.test('the registries check every loaded module at start, with one line naming it', async (t) => {
  const { inst, conf } = withModules(t);
  const bad = join(inst, 'delivery-bad.mjs');
  writeFileSync(bad, "export default { kind: 'delivery', name: 'bad', phase: 'store', summary: 'no enabled key', settings: { to: { type: 'string', default: '', doc: 'x' } }, async run() { return { kind: 'continue' }; } };\n");
  chmodSync(bad, 0o644);
  writeFileSync(conf, 'modules:\n  delivery:\n    bad: delivery-bad.mjs\n');
  let r = cli(inst, ['deliver', '-f', 'bob@remote.test', ALICE], msg());
  t.equal(r.code, 75, 'deliver defers: a broken module never loses mail');
  t.match(r.stdout, /^4\.3\.5 configuration error: modules\.delivery\.bad: .*delivery-bad\.mjs: .*no boolean key "enabled"/);
  r = cli(inst, ['config', 'keys']);
  t.equal(r.code, 78, 'admin commands refuse to start');
  t.match(r.stderr, /modules\.delivery\.bad: .*no boolean key "enabled" \(it would never run\)/);
  writeFileSync(conf, 'modules:\n  delivery:\n    mailstore: delivery-add-header.mjs\n');
  r = cli(inst, ['config', 'keys']);
  t.equal(r.code, 78);
  t.match(r.stderr, /modules\.delivery\.mailstore: .*does not export \(default\) a delivery module named mailstore/, 'the name in pigeon.yaml must be the module\'s');
  writeFileSync(conf, 'modules:\n  backend:\n    dummy: delivery-add-header.mjs\n');
  r = cli(inst, ['config', 'keys']);
  t.equal(r.code, 78);
  t.match(r.stderr, /modules\.backend\.dummy: .*does not export \(default\) a backend module named dummy/);
  chmodSync(join(inst, 'backend-dummy.mjs'), 0o666);
  writeFileSync(conf, 'modules:\n  backend:\n    dummy: backend-dummy.mjs\n');
  r = cli(inst, ['config', 'keys']);
  t.equal(r.code, 78, 'a module file anyone may change is not loaded');
  t.match(r.stderr, /modules\.backend\.dummy: .*backend-dummy\.mjs must be owned by root \(or uid \d+\) and writable by no one else/);
});
