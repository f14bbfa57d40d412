/**
 * The configuration resolution as a table over every combination of scopes and flags.
 *
 * For one key (mailstore.quota) each scope is absent, a plain row, or (global/domain only) an
 * `override` row; independently, a module-wide `ignore` (mailstore.*) sits at no scope, global,
 * domain, or both. The expected winner, its provenance and the list of losing rows are computed by
 * a small oracle written from DESIGN.md's rules, walking the scopes from broad to narrow:
 *   - narrowest wins;
 *   - an `override` row wins over every narrower scope (so the broadest override wins);
 *   - an `ignore` at scope S drops the module's rows of every scope narrower than S.
 * resolve() must agree with it for every combination and every order of the input rows.
 */
import t from 'tap';
import { resolve, values, forcedBy, type SettingRow, type Flag } from '../../src/resolve.js';
import { catalog } from '../../src/catalog.js';
import type { Json, Scope } from '../../src/settings.js';

const SCOPES: readonly Scope[] = ['global', 'domain', 'user'];
const MODULE = 'mailstore';
const KEY = 'quota';
const NAME = `${MODULE}.${KEY}`;
const DEFAULT = catalog().get(MODULE)?.keys[KEY]?.default;
const VALUE: Record<Scope, number> = { global: 1000, domain: 2000, user: 3000 };

type RowKind = 'absent' | 'plain' | 'override';
type IgnoreAt = 'none' | 'global' | 'domain' | 'both';

interface Combo {
  readonly global: RowKind;
  readonly domain: RowKind;
  readonly user: Exclude<RowKind, 'override'>;
  readonly ignore: IgnoreAt;
}

interface ExpectedIgnored {
  from: Scope;
  value: Json;
  by: Scope;
  reason: 'override' | 'ignore';
}

function combos(): Combo[] {
  const out: Combo[] = [];
  for (const global of ['absent', 'plain', 'override'] as const)
    for (const domain of ['absent', 'plain', 'override'] as const)
      for (const user of ['absent', 'plain'] as const)
        for (const ignore of ['none', 'global', 'domain', 'both'] as const) out.push({ global, domain, user, ignore });
  return out;
}

function label(c: Combo): string {
  return `global=${c.global} domain=${c.domain} user=${c.user} ignore=${c.ignore}`;
}

function rowsOf(c: Combo): SettingRow[] {
  const rows: SettingRow[] = [];
  for (const s of SCOPES) {
    const kind = c[s];
    if (kind === 'absent') continue;
    const flags: Flag[] = kind === 'override' ? ['override'] : [];
    rows.push({ scope: s, module: MODULE, key: KEY, value: VALUE[s], flags });
  }
  if (c.ignore === 'global' || c.ignore === 'both') rows.push({ scope: 'global', module: MODULE, key: '*', value: null, flags: ['ignore'] });
  if (c.ignore === 'domain' || c.ignore === 'both') rows.push({ scope: 'domain', module: MODULE, key: '*', value: null, flags: ['ignore'] });
  // control rows: another module, and another key of this module, at user scope
  rows.push({ scope: 'user', module: 'vacation', key: 'days', value: 9, flags: [] });
  return rows;
}

/** The oracle: one pass from the broadest scope to the narrowest, straight from DESIGN.md. */
function expected(c: Combo): { value: Json; from: 'default' | Scope; ignored: ExpectedIgnored[] } {
  // the broadest scope whose module-wide ignore applies
  const ignoreScope: Scope | null = c.ignore === 'none' ? null : c.ignore === 'domain' ? 'domain' : 'global';
  const rank = (s: Scope): number => SCOPES.indexOf(s);
  let winner: Scope | null = null;
  let forcedAt: Scope | null = null;
  const ignored: ExpectedIgnored[] = [];
  for (const s of SCOPES) {
    const kind = c[s];
    if (kind === 'absent') continue;
    if (ignoreScope !== null && rank(s) > rank(ignoreScope)) {
      ignored.push({ from: s, value: VALUE[s], by: ignoreScope, reason: 'ignore' });
      continue;
    }
    if (forcedAt !== null) {
      ignored.push({ from: s, value: VALUE[s], by: forcedAt, reason: 'override' });
      continue;
    }
    winner = s; // a narrower live row replaces a broader plain one
    if (kind === 'override') forcedAt = s;
  }
  return winner === null ? { value: DEFAULT ?? null, from: 'default', ignored } : { value: VALUE[winner], from: winner, ignored };
}

/** A few deterministic permutations of the row list: resolve must not depend on row order. */
function orders(rows: SettingRow[]): SettingRow[][] {
  const out = [rows, rows.slice().reverse()];
  if (rows.length > 2) out.push([...rows.slice(1), rows[0] as SettingRow], [rows[rows.length - 1] as SettingRow, ...rows.slice(0, -1)]);
  return out;
}

t.test('the oracle itself gives the textbook answers', async (t) => {
  // a few hand-checked lines, so that a broken oracle cannot agree with a broken resolve()
  t.same(expected({ global: 'absent', domain: 'absent', user: 'absent', ignore: 'none' }), { value: 0, from: 'default', ignored: [] });
  t.same(expected({ global: 'plain', domain: 'plain', user: 'plain', ignore: 'none' }), { value: 3000, from: 'user', ignored: [] });
  t.same(expected({ global: 'override', domain: 'plain', user: 'plain', ignore: 'none' }), {
    value: 1000,
    from: 'global',
    ignored: [
      { from: 'domain', value: 2000, by: 'global', reason: 'override' },
      { from: 'user', value: 3000, by: 'global', reason: 'override' },
    ],
  });
  t.same(expected({ global: 'plain', domain: 'plain', user: 'plain', ignore: 'domain' }), {
    value: 2000,
    from: 'domain',
    ignored: [{ from: 'user', value: 3000, by: 'domain', reason: 'ignore' }],
  });
  t.same(expected({ global: 'plain', domain: 'override', user: 'plain', ignore: 'global' }), {
    value: 1000,
    from: 'global',
    ignored: [
      { from: 'domain', value: 2000, by: 'global', reason: 'ignore' },
      { from: 'user', value: 3000, by: 'global', reason: 'ignore' },
    ],
  });
});

t.test('resolve() over every combination of scopes, override and ignore', async (t) => {
  const all = combos();
  t.equal(all.length, 72, '3 x 3 x 2 x 4 combinations');
  t.equal(DEFAULT, 0, 'default of mailstore.quota as declared by the module');
  for (const c of all) {
    const want = expected(c);
    for (const [i, rows] of orders(rowsOf(c)).entries()) {
      const eff = resolve(rows);
      const got = eff[NAME];
      t.same(got, want, `${label(c)} (row order ${i})`);
      // the control rows are untouched by anything done to mailstore
      t.same(eff['vacation.days'], { value: 9, from: 'user', ignored: [] }, `${label(c)}: vacation.days unaffected`);
      t.same(eff['mailstore.format'], { value: 'maildir', from: 'default', ignored: [] }, `${label(c)}: other keys stay default`);
    }
  }
});

t.test('every registered key appears, with its default, when there are no rows', async (t) => {
  const eff = resolve([]);
  const keys: string[] = [];
  for (const m of catalog().values()) for (const [k, spec] of Object.entries(m.keys)) {
    keys.push(`${m.module}.${k}`);
    t.same(eff[`${m.module}.${k}`], { value: spec.default, from: 'default', ignored: [] }, `${m.module}.${k}`);
  }
  t.same(Object.keys(eff).sort(), keys.sort(), 'no extra keys');
  t.same(values(eff)['login.plaintext'], 'loopback', 'values() flattens to {key: value}');
});

t.test('flags that have no meaning at user scope do not act', async (t) => {
  const eff = resolve([
    { scope: 'global', module: MODULE, key: KEY, value: 1, flags: [] },
    { scope: 'domain', module: MODULE, key: KEY, value: 2, flags: [] },
    { scope: 'user', module: MODULE, key: KEY, value: 3, flags: ['override'] },
    { scope: 'user', module: 'vacation', key: '*', value: null, flags: ['ignore'] },
    { scope: 'user', module: 'vacation', key: 'days', value: 4, flags: [] },
  ]);
  t.same(eff[NAME], { value: 3, from: 'user', ignored: [] }, 'user override is a plain user row');
  t.same(eff['vacation.days'], { value: 4, from: 'user', ignored: [] }, 'user-scope ignore ignores nothing');
});

t.test('rows for unknown modules or keys are skipped', async (t) => {
  const eff = resolve([
    { scope: 'global', module: 'nosuch', key: 'thing', value: 1, flags: ['override'] },
    { scope: 'global', module: MODULE, key: 'nosuch', value: 1, flags: [] },
  ]);
  t.notOk('nosuch.thing' in eff);
  t.notOk(`${MODULE}.nosuch` in eff);
  t.same(eff[NAME], { value: 0, from: 'default', ignored: [] });
});

t.test('forcedBy names who forces a key above a scope', async (t) => {
  const row = (scope: Scope, key: string, flags: Flag[], module = MODULE): SettingRow => ({ scope, module, key, value: key === '*' ? null : 1, flags });
  t.same(forcedBy([], 'user', MODULE, KEY), null, 'no rows');
  t.same(forcedBy([row('global', KEY, []), row('domain', KEY, [])], 'user', MODULE, KEY), null, 'plain rows force nothing');
  t.same(forcedBy([row('global', KEY, ['override'])], 'user', MODULE, KEY), { scope: 'global', reason: 'override' });
  t.same(forcedBy([row('domain', KEY, ['override'])], 'user', MODULE, KEY), { scope: 'domain', reason: 'override' });
  t.same(forcedBy([row('domain', KEY, ['override']), row('global', KEY, ['override'])], 'user', MODULE, KEY), { scope: 'global', reason: 'override' }, 'broadest override named');
  t.same(forcedBy([row('global', KEY, ['override'])], 'domain', MODULE, KEY), { scope: 'global', reason: 'override' }, 'global forces domain scope');
  t.same(forcedBy([row('domain', KEY, ['override'])], 'domain', MODULE, KEY), null, 'a scope does not force itself');
  t.same(forcedBy([row('global', KEY, ['override'])], 'global', MODULE, KEY), null, 'nothing is above global');
  t.same(forcedBy([row('global', 'format', ['override'])], 'user', MODULE, KEY), null, 'override of another key');
  t.same(forcedBy([row('global', KEY, ['override'], 'vacation')], 'user', MODULE, KEY), null, 'override in another module');
  t.same(forcedBy([row('global', '*', ['ignore'])], 'user', MODULE, KEY), { scope: 'global', reason: 'ignore' });
  t.same(forcedBy([row('domain', '*', ['ignore'])], 'user', MODULE, KEY), { scope: 'domain', reason: 'ignore' });
  t.same(forcedBy([row('domain', '*', ['ignore'])], 'domain', MODULE, KEY), null, 'a domain ignore leaves the domain row');
  t.same(forcedBy([row('global', '*', ['ignore'], 'vacation')], 'user', MODULE, KEY), null, 'ignore of another module');
  t.same(forcedBy([row('user', KEY, ['override'])], 'user', MODULE, KEY), null, 'the user row itself');
});

t.test('forcedBy agrees with resolve(): a row at a scope is forced iff resolve() drops it', async (t) => {
  for (const c of combos()) {
    const rows = rowsOf(c);
    const eff = resolve(rows)[NAME];
    for (const s of ['domain', 'user'] as const) {
      if (c[s] === 'absent') continue;
      const lost = eff?.ignored.find((i) => i.from === s);
      const f = forcedBy(rows, s, MODULE, KEY);
      t.equal(f !== null, lost !== undefined, `${label(c)}: ${s} row ${lost ? 'dropped' : 'kept'}`);
      // the one who forces is broader than the scope, and forces by override or ignore
      if (f) t.ok(SCOPES.indexOf(f.scope) < SCOPES.indexOf(s), `${label(c)}: forced from a broader scope`);
    }
  }
});

t.test('one resolution per set of rows, shared and frozen; different rows, different resolutions', async (t) => {
  const row = (scope: Scope, key: string, flags: Flag[]): SettingRow => ({ scope, module: MODULE, key, value: VALUE[scope], flags });
  const rows = [row('global', KEY, []), row('user', KEY, [])];
  const a = resolve(rows);
  const b = resolve(rows.map((r) => ({ ...r })));
  t.equal(a, b, 'equal rows (other objects) give the very same resolution');
  t.ok(Object.isFrozen(a) && Object.isFrozen(a[NAME]) && Object.isFrozen(a[NAME]?.ignored), 'frozen, down to the lists of losing rows');
  t.throws(() => {
    (a as Record<string, unknown>)[NAME] = null;
  }, TypeError, 'a caller cannot change what the next one reads');
  t.equal(a[NAME]?.value, VALUE.user);
  const c = resolve([row('global', KEY, [])]);
  t.not(c, a);
  t.equal(c[NAME]?.value, VALUE.global, 'a user without the user row gets the global value');
  t.equal(resolve([{ ...row('global', KEY, []), value: 7 }])[NAME]?.value, 7, 'the value is part of what tells rows apart');
  t.equal(resolve([row('global', KEY, ['override']), row('user', KEY, [])])[NAME]?.value, VALUE.global, 'so are the flags');
});
