/**
 * NAME        src/backend-switch — warn when a settings change moves mailboxes that hold mail to
 *             another IMAP/POP3 backend
 * DESCRIPTION Dovecot and Courier read the same Maildir++ files but keep separate UID databases
 *             (dovecot-uidlist vs courierimapuiddb): a mailbox switched between them gets a new
 *             UIDVALIDITY and new POP3 UIDLs, so every client downloads everything again
 *             (../shared/backends.md §2.6). `config set`/`unset` of imap.backend or pop3.backend
 *             compares each affected user's effective backend before and after the change and
 *             names the mailboxes that already hold messages (and those switched to a backend that
 *             does not serve their mailbox format: its `formats`, backends/types.ts). A switch to
 *             an `external` backend (upstream: another server) is no UID change: it warns that
 *             the local mail is no longer served; a switch back from one says nothing about UIDs.
 *             The change itself is always made: this only warns.
 */
import { BACKENDS } from '../backends/registry.js';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import type { Allocation, ScopeRef, Store, UserRecord } from './store.js';
import { resolve, type SettingRow } from './resolve.js';

const WATCHED = new Set(['imap.backend', 'pop3.backend']);
const DEFAULT_BACKEND = 'dovecot';
const MAX_NAMED = 10;

/** Messages in INBOX (cur/new) or any Maildir++ folder; for mbox a non-empty file. */
export function holdsMessages(a: Allocation): boolean {
  try {
    if (a.format === 'mbox') return existsSync(a.path) && statSync(a.path).size > 0;
    const dirs = [a.path, ...readdirSync(a.path, { withFileTypes: true }).filter((e) => e.isDirectory() && e.name.startsWith('.') && e.name.length > 1 && e.name !== '..').map((e) => join(a.path, e.name))];
    for (const d of dirs) {
      for (const sub of ['cur', 'new']) {
        const p = join(d, sub);
        if (existsSync(p) && readdirSync(p).length > 0) return true;
      }
    }
  } catch {
    /* not on this node, or unreadable: nothing to say */
  }
  return false;
}

async function usersIn(store: Store, ref: ScopeRef): Promise<UserRecord[]> {
  if (ref.scope === 'user') {
    const u = ref.name === null ? null : await store.getUser(ref.name);
    return u ? [u] : [];
  }
  return ref.scope === 'domain' && ref.name !== null ? store.listUsers(ref.name) : store.listUsers();
}

type NamedRow = SettingRow & { name: string | null };

/** Every row that can decide `module.key` (its own rows and the module's ignores), at any scope. */
export async function decidingRows(store: Store, name: string): Promise<NamedRow[]> {
  const [module = '', key = ''] = name.split('.');
  const [own, ignores] = await Promise.all([store.settingRows(module, key), store.settingRows(module, '*')]);
  return [...own, ...ignores];
}

/** The rows of `rows` that apply to a domain (domain null: global only) or to one user. */
export function rowsOf(rows: readonly NamedRow[], domain: string | null, address: string | null = null): SettingRow[] {
  return rows.filter((r) => r.scope === 'global' || (r.scope === 'domain' && r.name === domain) || (r.scope === 'user' && address !== null && r.name === address));
}

async function effectiveBackends(store: Store, users: readonly UserRecord[], name: string): Promise<Map<string, string>> {
  const rows = await decidingRows(store, name);
  const out = new Map<string, string>();
  for (const u of users) out.set(u.address, String(resolve(rowsOf(rows, u.domain, u.address))[name]?.value ?? DEFAULT_BACKEND));
  return out;
}

/**
 * Run `change` (the settings write); return warning lines for mailboxes with mail whose
 * effective `name` (imap.backend / pop3.backend) it changed. Other keys: just run it.
 */
export async function withBackendSwitchCheck(store: Store, ref: ScopeRef, name: string, change: () => Promise<void>): Promise<string[]> {
  if (!WATCHED.has(name)) {
    await change();
    return [];
  }
  const users = (await usersIn(store, ref)).filter((u) => u.allocation !== null);
  const before = await effectiveBackends(store, users, name);
  await change();
  const after = await effectiveBackends(store, users, name);
  const moved: string[] = [];
  /** backend → the users switched to it whose mailbox format it does not serve */
  const unservable = new Map<string, string[]>();
  const froms = new Set<string>();
  let to = '';
  /** external backend → the users with local mail switched to it (their mail stays here, unserved) */
  const away = new Map<string, string[]>();
  for (const u of users) {
    const b = before.get(u.address);
    const a = after.get(u.address);
    if (b === undefined || a === undefined || a === b || u.allocation === null) continue;
    const formats = BACKENDS.get(a)?.formats;
    if (formats !== undefined && !formats.includes(u.allocation.format)) unservable.set(a, [...(unservable.get(a) ?? []), u.address]);
    if (!holdsMessages(u.allocation)) continue;
    // another server entirely (upstream): not a UID database change of the same mail
    if (BACKENDS.get(a)?.external === true) {
      away.set(a, [...(away.get(a) ?? []), u.address]);
      continue;
    }
    if (BACKENDS.get(b)?.external === true) continue;
    moved.push(u.address);
    froms.add(b);
    to = a;
  }
  const named = (l: string[]): string => `${l.slice(0, MAX_NAMED).join(', ')}${l.length > MAX_NAMED ? `, … (${l.length} in all)` : ''}`;
  const lines: string[] = [];
  if (moved.length > 0) {
    const proto = name.startsWith('pop3') ? 'POP3' : 'IMAP';
    lines.push(
      `${name}: ${moved.length} mailbox(es) that already hold mail now use ${to}${froms.size === 1 ? ` instead of ${[...froms].join('')}` : ''}: ${named(moved)}. ` +
        `${proto} clients will see new ${proto === 'IMAP' ? 'UIDVALIDITY values and re-download every message' : 'UIDLs and download every message again'} ` +
        '(Dovecot and Courier keep separate UID databases); undo with the previous value if that was not intended',
    );
  }
  for (const [b, users] of away) {
    lines.push(`${name}: ${users.length} mailbox(es) on this node that hold mail are now served by the ${b} server instead (upstream.host): ${named(users)}. Their mail here stays on disk, unseen by ${name.startsWith('pop3') ? 'POP3' : 'IMAP'} until switched back; delivery still stores new mail here unless your MTA sends it to that server`);
  }
  for (const [b, users] of unservable) {
    lines.push(`${name}: ${b} serves ${(BACKENDS.get(b)?.formats ?? []).join(' and ')} mailboxes only; these mailboxes cannot log in with it: ${named(users)}`);
  }
  return lines;
}
