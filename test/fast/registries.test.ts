// Fast tier: the registries' self-check (src/registries.ts) and what is derived from them — the
// settings catalog's module choices, the --forker choices, the backends' pigeon.yaml sections. A
// module that breaks its kind's contract is refused with a line naming it.
import t from 'tap';
import { registryProblems } from '../../src/registries.js';
import { catalog } from '../../src/catalog.js';
import { DELIVERY_MODULES } from '../../src/delivery/registry.js';
import { MDA_MODULES, MDA_PROGRAMS } from '../../src/delivery/registry-mda.js';
import { CREATORS } from '../../src/creators/registry.js';
import { BACKENDS, localBackends, remoteBackend, backendConfig } from '../../backends/registry.js';
import { oneShotForkers } from '../../forkers/registry.js';
import { fileSchema } from '../../src/instance.js';
import type { DeliveryModule } from '../../src/delivery/types.js';
import type { Backend } from '../../backends/types.js';

t.test('the built-in modules pass the self-check', async (t) => {
  t.same(registryProblems(), []);
});

t.test('choices are derived from the registries', async (t) => {
  const keys = catalog();
  const values = (m: string, k: string): unknown => {
    const s = keys.get(m)?.keys[k];
    return s?.type === 'enum' ? s.values : null;
  };
  t.same(values('imap', 'backend'), ['dovecot', 'courier', 'upstream'], 'imap.backend: the local backends');
  t.same(values('pop3', 'backend'), localBackends().map((b) => b.name));
  t.same(values('mailstore', 'format'), MDA_MODULES.names(), 'mailstore.format: the MDA modules');
  t.same(values('mailstore', 'creator'), CREATORS.names(), 'mailstore.creator: the creators');
  t.same(values('mailstore', 'mda'), ['builtin', ...MDA_PROGRAMS.names()], 'mailstore.mda: builtin or an MDA program');
  t.same([...keys.keys()], ['login', 'imap', 'pop3', 'upstream', ...DELIVERY_MODULES.names(), 'sieve'], 'the upstream backend has its own settings module, one per delivery module, then those of the MDA programs');
  t.same(oneShotForkers().map((f) => f.name), ['stdio', 'inetd', 'postfix'], '--forker choices');
  t.equal(remoteBackend()?.name, 'peer', 'the peer link is the remote backend');
  const dovecot = BACKENDS.get('dovecot') as Backend;
  t.same(backendConfig(dovecot, {}), { imap: '/usr/lib/dovecot/imap', pop3: '/usr/lib/dovecot/pop3', lda: '/usr/lib/dovecot/dovecot-lda', lda_timeout_s: 300 }, "dovecot's section of pigeon.yaml, with its defaults, parsed by the backend");
  const bad = fileSchema.safeParse({ dovecot: { imapd: '/usr/bin/imapd' } });
  t.same(bad.error?.issues.map((i) => [i.path.join('.'), i.message]), [['dovecot.imapd', 'unknown key']], "a key the section's backend does not know is refused, named");
  t.ok(fileSchema.safeParse({ courier: { imapd: '/opt/imapd' } }).success, "courier's section belongs to courier");
  t.notOk('peer' in BACKENDS.get('peer')!, 'the peer backend has no section of its own');
});

t.test('a module that breaks its contract is refused, the registry unchanged', async (t) => {
  const good: DeliveryModule = {
    kind: 'delivery',
    name: 'stamp',
    phase: 'scan',
    summary: 'test',
    settings: { enabled: { type: 'boolean', default: false, doc: 'on' } },
    run: async () => ({ kind: 'continue' }),
  };
  t.throws(() => DELIVERY_MODULES.add({ ...good, settings: { to: { type: 'string', default: '', doc: 'x' } } }, '/x.mjs'), /no boolean key "enabled"/);
  t.throws(() => DELIVERY_MODULES.add({ ...good, name: 'mailstore' }, '/x.mjs'), /mailstore is a built-in delivery module/);
  t.throws(() => DELIVERY_MODULES.add({ ...good, name: 'Stamp' }, '/x.mjs'), /lower-case letters/);
  t.throws(() => DELIVERY_MODULES.add({ ...good, phase: 'later' as DeliveryModule['phase'] }, '/x.mjs'), /phase "later" is not one of scan, store, notify/);
  t.throws(() => DELIVERY_MODULES.add({ ...good, name: 'imap' }, '/x.mjs'), /imap is the name of a settings module/);
  t.throws(() => DELIVERY_MODULES.add({ ...good, name: 'sieve' }, '/x.mjs'), /sieve is the name of the settings module of an MDA program/);
  t.notOk(catalog().has('stamp'), 'nothing was added');
  const remote = { ...(BACKENDS.get('peer') as Backend), name: 'other' };
  t.throws(() => BACKENDS.add(remote, '/y.mjs'), /there is already a remote backend/);
  const local = { ...(BACKENDS.get('dovecot') as Backend), name: 'dove2', probe: null };
  t.throws(() => BACKENDS.add(local, '/y.mjs'), /needs a probe for imap and pop3/);
  DELIVERY_MODULES.add(good, '/x.mjs');
  t.same(Object.keys(catalog().get('stamp')?.keys ?? {}), ['enabled'], 'a module added: its settings join the catalog');
  t.same(registryProblems(), [], 'and the registries still pass');
  t.throws(() => BACKENDS.add({ ...(BACKENDS.get('upstream') as Backend), name: 'upstream2' }, '/u.mjs'), /settings must be a settings declaration of module "upstream2"/);
  // last (a registry never forgets a module): a delivery module named like a backend's settings module
  DELIVERY_MODULES.add({ ...good, name: 'upstream' }, '/z.mjs');
  t.match(registryProblems(), [/settings module upstream is declared twice/], 'a settings module declared twice is refused, named');
  t.equal(catalog().get('upstream')?.keys['host']?.type, 'string', "the first declaration (the backend's) stays in force");
});
