/**
 * NAME        backends/registry — the backends, by name (static list; no directory scanning)
 * DESCRIPTION Adding a backend is its file and one line here (or, kept outside this tree, a line
 *             in pigeon.yaml `modules.backend`). The local ones are the values `imap.backend` and
 *             `pop3.backend` accept (src/catalog.ts); the one remote backend (peer) is what the
 *             router uses for a mailbox on another node. A backend's section of pigeon.yaml
 *             (`section.key`) is part of the file's schema (src/instance.ts). The self-check
 *             refuses a section key that another part of pigeon.yaml or another backend uses, a
 *             local backend whose binaries `pigeon config test` cannot probe, a section whose
 *             defaults do not parse, a second remote backend, and per-user settings (`settings`)
 *             under any module name but its own (src/catalog.ts refuses a name declared twice).
 */
import type { Backend } from './types.js';
import { Registry } from '../src/modules.js';
import dovecot from './dovecot.js';
import courier from './courier.js';
import peer from './peer.js';
import upstream from './upstream.js';

/** pigeon.yaml keys that are not backend sections (src/instance.ts) */
export const CORE_SECTIONS = ['node', 'database', 'mail_root', 'mail_user', 'listen', 'handoff', 'auth', 'tls', 'peer', 'sendmail', 'log', 'run_dir', 'limits', 'modules'];

export const BACKENDS = new Registry<Backend>('backend', [dovecot, courier, upstream, peer] as Backend[], (b, reg) => {
  const out: string[] = [];
  if (b.serves !== 'local' && b.serves !== 'remote') out.push('serves must be "local" or "remote"');
  if (typeof b.create !== 'function') out.push('no create()');
  if (b.serves === 'remote' && reg.all().some((o) => o !== b && o.serves === 'remote')) out.push('there is already a remote backend');
  if (b.serves === 'local' && b.external !== true && (b.probe === null || typeof b.probe !== 'object' || !b.probe.imap || !b.probe.pop3)) out.push('a local backend needs a probe for imap and pop3 (pigeon config test)');
  if (b.external === true && b.serves !== 'local') out.push('an external backend is chosen by imap.backend / pop3.backend: serves must be "local"');
  if (b.settings !== undefined && (typeof b.settings !== 'object' || b.settings === null || b.settings.module !== b.name || typeof b.settings.keys !== 'object')) out.push(`its settings must be a settings declaration of module ${JSON.stringify(b.name)}`);
  if (b.section !== null) {
    const key = b.section.key;
    if (CORE_SECTIONS.includes(key) || reg.all().some((o) => o !== b && o.section?.key === key)) out.push(`its pigeon.yaml section ${JSON.stringify(key)} is taken`);
    try {
      b.section.parse(undefined);
    } catch (e) {
      out.push(`its section's defaults do not parse: ${e instanceof Error ? e.message : String(e)}`);
    }
  }
  return out;
});

/** The backends `imap.backend` / `pop3.backend` may name. */
export function localBackends(): Backend[] {
  return BACKENDS.all().filter((b) => b.serves === 'local');
}

/** The backend for mailboxes on other nodes. */
export function remoteBackend(): Backend | null {
  return BACKENDS.all().find((b) => b.serves === 'remote') ?? null;
}

/** A backend's parsed section of this instance's pigeon.yaml (null: it has none). */
export function backendConfig(b: Backend, raw: Readonly<Record<string, unknown>>): unknown {
  return b.section === null ? null : b.section.parse(raw[b.section.key]);
}
