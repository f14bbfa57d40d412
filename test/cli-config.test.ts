// `pigeon config set / unset / show` (scopes, override, ignore, refusals) and `pigeon auth test`
// as an admin runs them, on a fresh instance with alice@example.test.
import t from 'tap';
import { openStore } from '../src/store.js';
import { resolve } from '../src/resolve.js';
import { adminInstance, run, runAll, json, type Run } from './helpers/admin-cli.js';

// tap's per-file timeout for this file: it ran 46 s alone on a lightly loaded machine, and two
// suites at once on 2 cores make a file take 2-3 times as long (the default is 180 s, .taprc)
t.setTimeout(240_000);

const { db, C } = adminInstance(t);

type Explained = Record<string, { value: unknown; from: string; ignored: { from: string; value: unknown }[] }>;

/** The database state read in-process (the CLI's own `config show` output is checked separately). */
async function effective(address: string): Promise<Explained> {
  const store = await openStore(db);
  try {
    return resolve((await store.lookup(address))?.rows ?? []) as Explained;
  } finally {
    await store.close();
  }
}

t.test('config set / unset / show --explain --json', async (t) => {
  const show = (): Explained => json(run([...C, 'config', 'show', 'alice@example.test', '--explain', '--json'])) as Explained;
  const codes = async (cmds: string[][]): Promise<(number | null)[]> => (await runAll(cmds.map((c) => [[...C, ...c]] as const))).map((r) => r.code);
  let e = show();
  for (const [k, v] of Object.entries(e)) {
    t.same(Object.keys(v).sort(), ['from', 'ignored', 'value'], `${k}: {value, from, ignored}`);
    t.equal(v.from, 'default', `${k} from default`);
  }
  t.same(e['mailstore.format'], { value: 'maildir', from: 'default', ignored: [] });

  t.same(
    await codes([
      ['config', 'set', '--global', 'mailstore.quota', '1000'],
      ['config', 'set', '--domain', 'example.test', 'mailstore.quota', '2000'],
      ['config', 'set', '--user', 'alice@example.test', 'forward.to', 'a@x.test, b@y.test'],
      ['config', 'set', '--domain', 'example.test', 'vacation.enabled', 'yes'],
    ]),
    [0, 0, 0, 0],
    'set at global and domain scope, a list and a boolean value',
  );
  const us = run([...C, 'config', 'set', '--user', 'alice@example.test', 'mailstore.quota', '3000']);
  t.equal(us.code, 0);
  t.equal(us.err, '', 'no warning when nothing forces the key');
  const [ex, pl, tx] = await runAll([
    [[...C, 'config', 'show', 'alice@example.test', '--explain', '--json']],
    [[...C, 'config', 'show', 'alice@example.test', '--json']],
    [[...C, 'config', 'show', 'alice@example.test', '--explain']],
  ]);
  e = json(ex as Run) as Explained;
  t.same(e['mailstore.quota'], { value: 3000, from: 'user', ignored: [] }, 'narrowest wins');
  t.same(e['forward.to'], { value: ['a@x.test', 'b@y.test'], from: 'user', ignored: [] });
  t.same(e['vacation.enabled'], { value: true, from: 'domain', ignored: [] });
  const plain = json(pl as Run) as Record<string, unknown>;
  t.equal(plain['mailstore.quota'], 3000, 'config show --json is {"module.key": value}');
  t.equal(plain['mailstore.format'], 'maildir');
  t.match(tx?.out, /^mailstore\.quota\s+= 3000\s+\(user\)/m, 'text --explain names the source');

  // forced at a broader scope: succeeds, warns naming the scope that forces it
  t.equal(run([...C, 'config', 'set', '--domain', 'example.test', 'mailstore.quota', '2000', '--override']).code, 0);
  const forced = run([...C, 'config', 'set', '--user', 'alice@example.test', 'mailstore.quota', '3500']);
  t.equal(forced.code, 0, 'setting a forced key at user scope succeeds');
  t.match(forced.err, /warning: .*mailstore\.quota.*no effect.*domain.*override/, 'warns: the domain forces it');
  e = await effective('alice@example.test');
  t.match(e['mailstore.quota'], { value: 2000, from: 'domain', ignored: [{ from: 'user', value: 3500 }] }, 'domain override wins, user row listed as ignored');

  t.equal(run([...C, 'config', 'set', '--global', 'mailstore.quota', '1000', '--override']).code, 0);
  t.equal(run([...C, 'config', 'set', '--domain', 'example.test', 'forward.*', '--ignore']).code, 0, 'module-wide ignore at domain');
  const [forcedG, ign] = await runAll([
    [[...C, 'config', 'set', '--user', 'alice@example.test', 'mailstore.quota', '3600']],
    [[...C, 'config', 'set', '--user', 'alice@example.test', 'forward.keep', 'false']],
  ]);
  t.equal(forcedG?.code, 0);
  t.match(forcedG?.err, /warning: .*global.*override/, 'warns: global forces it');
  t.equal(ign?.code, 0);
  t.match(ign?.err, /warning: .*forward\.keep.*domain.*forward\.\*/, 'warns: the domain ignores forward.*');
  e = show();
  t.match(e['mailstore.quota'], { value: 1000, from: 'global', ignored: [{ from: 'domain', value: 2000 }, { from: 'user', value: 3600 }] }, 'broadest override wins');
  t.match(e['forward.to'], { value: [], from: 'default', ignored: [{ from: 'user', value: ['a@x.test', 'b@y.test'] }] }, 'user forward rows ignored');
  t.match(e['forward.keep'], { value: true, from: 'default', ignored: [{ from: 'user', value: false }] });

  // unset: the broader scope or the default applies again
  t.same(
    await codes([
      ['config', 'unset', '--domain', 'example.test', 'forward.*'],
      ['config', 'unset', '--global', 'mailstore.quota'],
      ['config', 'unset', '--domain', 'example.test', 'mailstore.quota'],
    ]),
    [0, 0, 0],
    'unset',
  );
  e = await effective('alice@example.test');
  t.same(e['mailstore.quota'], { value: 3600, from: 'user', ignored: [] }, 'user row wins again after the overrides are unset');
  t.same(e['forward.to'], { value: ['a@x.test', 'b@y.test'], from: 'user', ignored: [] }, 'user forward rows live again');

  // refusals, each leaving the settings as they were
  const [again, typo, mod, wrong, ...rest] = await runAll(
    [
      ['config', 'unset', '--global', 'mailstore.quota'],
      ['config', 'set', '--user', 'alice@example.test', 'mailstore.qouta', '5'],
      ['config', 'set', '--global', 'mailstor.quota', '5'],
      ['config', 'set', '--user', 'alice@example.test', 'mailstore.quota', 'lots'],
      ['config', 'set', '--global', 'mailstore.format', 'mh'],
      ['config', 'set', '--global', 'vacation.enabled', 'perhaps'],
      ['config', 'set', '--global', 'vacation.days', '0'],
      ['config', 'set', '--user', 'alice@example.test', 'login.plaintext', 'always'],
      ['config', 'set', '--user', 'alice@example.test', 'mailstore.quota', '5', '--override'],
      ['config', 'set', '--global', '--domain', 'example.test', 'mailstore.quota', '5'],
      ['config', 'set', '--domain', 'nosuch.test', 'mailstore.quota', '5'],
      ['config', 'set', '--user', 'nobody@example.test', 'mailstore.quota', '5'],
      ['config', 'show', 'nobody@example.test'],
    ].map((c) => [[...C, ...c]] as const),
  );
  t.equal(again?.code, 0);
  t.match(again?.out, /was not set/, 'unset of a missing row says so');
  t.equal(typo?.code, 64, 'a typo in the key exits 64');
  t.match(typo?.err, /unknown key "mailstore\.qouta"/);
  for (const k of ['mailstore.quota', 'mailstore.format', 'mailstore.enabled']) t.match(typo?.err, k, `lists the valid key ${k}`);
  t.equal(mod?.code, 64, 'unknown module exits 64');
  t.match(mod?.err, /modules: .*mailstore/, 'lists the modules');
  t.equal(wrong?.code, 65, 'a value of the wrong type exits 65');
  t.match(wrong?.err, /mailstore\.quota: invalid value "lots": expected integer/);
  t.same(
    rest.map((r) => r.code),
    [65, 65, 65, 64, 64, 64, 67, 67, 67],
    'enum not in list, not a boolean, below minimum: 65; global-only key at user scope, --override at user scope, two scopes: 64; missing domain, missing user, show of a missing user: 67',
  );
  e = await effective('alice@example.test');
  t.same(e['mailstore.quota'], { value: 3600, from: 'user', ignored: [] }, 'refused commands changed nothing');
  t.same(e['mailstore.format'], { value: 'maildir', from: 'default', ignored: [] });
  t.same(e['login.plaintext'], { value: 'loopback', from: 'default', ignored: [] });
});

t.test('auth test: 0 on success, 77 on failure', async (t) => {
  const [ok, bad, ghost, empty] = await runAll([
    [[...C, 'auth', 'test', 'alice@example.test'], 'sec ret\n'],
    [[...C, 'auth', 'test', 'alice@example.test'], 'sec ret \n'],
    [[...C, 'auth', 'test', 'ghost@example.test'], 'sec ret\n'],
    [[...C, 'auth', 'test', 'alice@example.test'], ''],
  ]);
  t.equal(ok?.code, 0);
  t.match(ok?.out, /auth succeeded/);
  t.match(ok?.out, /mailstore\.quota\s+= 3600/, 'prints the effective config');
  t.ok(ok?.out.endsWith('\n') && !/^ +$/m.test(ok.out), 'output ends with a newline, no dangling indentation');
  t.equal(bad?.code, 77, 'wrong password (one extra space): 77');
  t.match(bad?.out, /auth failed/);
  t.equal(ghost?.code, 77, 'unknown user: 77');
  t.equal(empty?.code, 64, 'no password on stdin: 64');
  t.equal(run([...C, 'user', 'disable', 'alice@example.test']).code, 0);
  t.equal(run([...C, 'auth', 'test', 'alice@example.test'], 'sec ret\n').code, 77, 'disabled user: 77');
  t.equal(run([...C, 'user', 'enable', 'alice@example.test']).code, 0);
  t.equal(run([...C, 'user', 'passwd', 'alice@example.test'], 'n3w\n').code, 0, 'user passwd');
  const [nw, old] = await runAll([
    [[...C, 'auth', 'test', 'alice@example.test'], 'n3w\n'],
    [[...C, 'auth', 'test', 'alice@example.test'], 'sec ret\n'],
  ]);
  t.equal(nw?.code, 0, 'enabled again, the new password works');
  t.equal(old?.code, 77, 'the old password does not');
});
