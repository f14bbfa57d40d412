/**
 * NAME        src/resolve — the effective configuration of a user, with provenance
 * DESCRIPTION Pure function over setting rows. For each module.key: the module's default, then the
 *             global row, then the domain row, then the user row — the narrowest wins, except:
 *             `override` on a global/domain row wins over every narrower scope; `ignore` on a
 *             global/domain row for `module.*` drops every narrower row of that module.
 *             The result keeps, per key, where the value came from and which rows lost and why.
 */
import type { Json, Scope } from './settings.js';
import { catalog } from './catalog.js';
import { deepFreeze } from './freeze.js';

export type Flag = 'override' | 'ignore';

export interface SettingRow {
  readonly scope: Scope;
  readonly module: string;
  readonly key: string; // '*' for a module-wide ignore
  readonly value: Json;
  readonly flags: readonly Flag[];
}

export interface Ignored {
  readonly from: Scope;
  readonly value: Json;
  /** the broader scope that made this row lose */
  readonly by: Scope;
  readonly reason: 'override' | 'ignore';
}

export interface Explained {
  readonly value: Json;
  readonly from: 'default' | Scope;
  readonly ignored: Ignored[];
}

export type Effective = Record<string, Explained>;

const RANK: Record<Scope, number> = { global: 0, domain: 1, user: 2 };

// Resolving walks every key of every module (a few hundred objects): a login or a delivery does it
// once per user, and most users share their rows (the global and domain rows, few of their own).
// The result for one set of rows is computed once and shared, frozen, so no caller can change what
// another one reads; a catalog rebuilt (a module file loaded) starts afresh.
const MEMO_MAX = 512;
const memo = new Map<string, Effective>();
let memoFor: unknown = null;

/** The rows as one string: equal strings, equal resolutions. */
function rowsKey(rows: readonly SettingRow[]): string {
  let k = '';
  for (const r of rows) k += `${r.scope}\0${r.module}\0${r.key}\0${r.flags.join(',')}\0${JSON.stringify(r.value)}\n`;
  return k;
}

/**
 * Resolve every key of every registered module. Rows for unknown keys are skipped. The result is
 * frozen (shared between callers with the same rows).
 */
export function resolve(rows: readonly SettingRow[]): Effective {
  const cat = catalog();
  if (cat !== memoFor) {
    memo.clear();
    memoFor = cat;
  }
  const key = rowsKey(rows);
  const hit = memo.get(key);
  if (hit) return hit;
  const out = deepFreeze(resolveNow(rows));
  if (memo.size >= MEMO_MAX) memo.delete(memo.keys().next().value as string);
  memo.set(key, out);
  return out;
}

function resolveNow(rows: readonly SettingRow[]): Effective {
  const out: Effective = {};
  // module-wide ignores: module -> broadest scope that ignores narrower rows
  const ignoreAt = new Map<string, Scope>();
  for (const r of rows) {
    if (r.key === '*' && r.flags.includes('ignore') && r.scope !== 'user') {
      const cur = ignoreAt.get(r.module);
      if (cur === undefined || RANK[r.scope] < RANK[cur]) ignoreAt.set(r.module, r.scope);
    }
  }
  const byKey = new Map<string, SettingRow[]>();
  for (const r of rows) {
    if (r.key === '*') continue;
    const name = `${r.module}.${r.key}`;
    const list = byKey.get(name);
    if (list) list.push(r);
    else byKey.set(name, [r]);
  }
  for (const spec of catalog().values()) {
    const ig = ignoreAt.get(spec.module);
    for (const [key, ks] of Object.entries(spec.keys)) {
      const name = `${spec.module}.${key}`;
      const ignored: Ignored[] = [];
      const live: SettingRow[] = [];
      for (const r of (byKey.get(name) ?? []).slice().sort((a, b) => RANK[a.scope] - RANK[b.scope])) {
        if (ig !== undefined && RANK[r.scope] > RANK[ig]) ignored.push({ from: r.scope, value: r.value, by: ig, reason: 'ignore' });
        else live.push(r);
      }
      let winner: SettingRow | undefined = live.find((r) => r.flags.includes('override') && r.scope !== 'user');
      if (winner) {
        for (const r of live) {
          if (RANK[r.scope] > RANK[winner.scope]) ignored.push({ from: r.scope, value: r.value, by: winner.scope, reason: 'override' });
        }
      } else {
        winner = live[live.length - 1];
      }
      ignored.sort((a, b) => RANK[a.from] - RANK[b.from]);
      out[name] = winner ? { value: winner.value, from: winner.scope, ignored } : { value: ks.default, from: 'default', ignored };
    }
  }
  return out;
}

/** Plain `{ "module.key": value }` view. */
export function values(e: Effective): Record<string, Json> {
  const o: Record<string, Json> = {};
  for (const [k, v] of Object.entries(e)) o[k] = v.value;
  return o;
}

/**
 * Who forces `module.key` above `scope`, if anyone: a broader `override` row for the key, or a
 * broader module-wide `ignore`. Used to warn that a narrower setting has no effect.
 */
export function forcedBy(rows: readonly SettingRow[], scope: Scope, module: string, key: string): { scope: Scope; reason: 'override' | 'ignore' } | null {
  for (const r of rows.slice().sort((a, b) => RANK[a.scope] - RANK[b.scope])) {
    if (RANK[r.scope] >= RANK[scope] || r.module !== module) continue;
    if (r.key === '*' && r.flags.includes('ignore')) return { scope: r.scope, reason: 'ignore' };
    if (r.key === key && r.flags.includes('override')) return { scope: r.scope, reason: 'override' };
  }
  return null;
}
