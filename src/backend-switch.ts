/**
 * NAME        src/backend-switch — warn when a settings change moves mailboxes that hold mail to
 *             another IMAP/POP3 backend
 * DESCRIPTION Dovecot and Courier read the same Maildir++ files but keep separate UID databases
 *             (dovecot-uidlist vs courierimapuiddb): a mailbox switched between them gets a new
 *             UIDVALIDITY and new POP3 UIDLs, so every client downloads everything again
 *             (../shared/backends.md §2.6). `config set`/`unset` of imap.backend or pop3.backend
 *             compares each affected user's effective backend before and after the change and
 *             names the mailboxes that already hold messages (and mbox users switched to Courier,
 *             which serves Maildir only). The change itself is always made: this only warns.
 */
import { existsSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import type { Allocation, ScopeRef, Store, UserRecord } from './store.js';
import { resolve } from './resolve.js';

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

function usersIn(store: Store, ref: ScopeRef): UserRecord[] {
  if (ref.scope === 'user') {
    const u = ref.name === null ? null : store.getUser(ref.name);
    return u ? [u] : [];
  }
  return ref.scope === 'domain' && ref.name !== null ? store.listUsers(ref.name) : store.listUsers();
}

function effectiveBackends(store: Store, users: readonly UserRecord[], name: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const u of users) {
    const l = store.lookup(u.address);
    if (l) out.set(u.address, String(resolve(l.rows)[name]?.value ?? DEFAULT_BACKEND));
  }
  return out;
}

/**
 * Run `change` (the settings write); return warning lines for mailboxes with mail whose
 * effective `name` (imap.backend / pop3.backend) it changed. Other keys: just run it.
 */
export function withBackendSwitchCheck(store: Store, ref: ScopeRef, name: string, change: () => void): string[] {
  if (!WATCHED.has(name)) {
    change();
    return [];
  }
  const users = usersIn(store, ref).filter((u) => u.allocation !== null);
  const before = effectiveBackends(store, users, name);
  change();
  const after = effectiveBackends(store, users, name);
  const moved: string[] = [];
  const mboxToCourier: string[] = [];
  const froms = new Set<string>();
  let to = '';
  for (const u of users) {
    const b = before.get(u.address);
    const a = after.get(u.address);
    if (b === undefined || a === undefined || a === b || u.allocation === null) continue;
    if (a === 'courier' && u.allocation.format === 'mbox') mboxToCourier.push(u.address);
    if (!holdsMessages(u.allocation)) continue;
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
  if (mboxToCourier.length > 0) {
    lines.push(`${name}: Courier serves Maildir only; these mbox mailboxes cannot log in with it: ${named(mboxToCourier)}`);
  }
  return lines;
}
