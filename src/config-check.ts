/**
 * NAME        src/config-check — what `pigeon config test` checks beyond parsing the files
 * DESCRIPTION After the files parsed and the database opened: the certificate pairs (tls.cert/
 *             tls.key and every tls.sni entry: readable, the key belongs to the certificate,
 *             valid now; peer.cert/peer.key: also issued by the cluster CA and naming this node),
 *             and the binaries of every backend that a setting selects for someone this node may
 *             serve — the global value (or the default), every domain's, and the users homed here
 *             or not yet placed. Each binary must exist, be executable and start: it is run once
 *             as the mail user with the backend's probe arguments (backends/types.ts), so a
 *             missing shared library, a wrong program or a bad path shows here, not as
 *             `[UNAVAILABLE]` at a user's login. And where the one-session modes will log.
 *             `checkStart` is what `pigeon serve` checks before it listens, and `config test`
 *             runs the same function, so a configuration serve refuses never passes the test:
 *             this node's certificate (readable, from the cluster CA, naming the node, valid),
 *             that the cluster registry accepts it (not revoked, not another node's name), the
 *             peer listener's advertised address, the client TLS pairs (loadable), the mail
 *             user and the auth chain.
 * DIAGNOSTICS Returns report lines, warnings (certificates expiring within 30 days) and problems;
 *             the command exits 78 when there is a problem.
 * SECURITY    Probes run with an empty environment as the mail user, never as root; nothing
 *             from the database reaches a command line.
 */
import { BACKEND_PROBE_MS } from './limits.js';
import { spawnSync } from 'node:child_process';
import { accessSync, statSync, constants } from 'node:fs';
import type { Instance } from './instance.js';
import type { Store } from './store.js';
import type { MailUser } from './mailuser.js';
import type { BinaryProbe } from '../backends/types.js';
import { BACKENDS, localBackends, backendConfig } from '../backends/registry.js';
import { resolve, type SettingRow } from './resolve.js';
import { decidingRows, rowsOf } from './backend-switch.js';
import { checkPair, clientPairs } from './client-tls.js';
import { loadNodeCredentials, EXPIRY_WARN_DAYS } from '../certs/verify.js';
import { AppError, isAppError } from './errors.js';
import { loadClientTls } from './client-tls.js';
import { resolveMailUser } from './mailuser.js';
import { createAuth } from '../auth/chain.js';
import { peerAddress } from './peer/duties.js';
import { reRegistration } from './store/rows.js';
import type { NodeCredentials } from '../certs/verify.js';
import { syslogUnavailable } from './log.js';

export interface CheckReport {
  readonly lines: string[];
  readonly warnings: string[];
  readonly problems: string[];
}

/** A problem of checkStart, with the error serve exits with (its code decides the exit status). */
function problem(r: CheckReport, failures: AppError[], e: unknown, prefix = ''): void {
  const err = isAppError(e) ? e : new AppError('CONFIG_INVALID', e instanceof Error ? e.message : String(e));
  r.problems.push(`${prefix}${err.message}`);
  failures.push(prefix === '' ? err : new AppError(err.code, `${prefix}${err.message}`));
}

/**
 * Everything `pigeon serve` checks before it opens a listener (and `config test` with it), on an
 * open store whose schema was checked. Returns the node credentials (null when they are broken)
 * and the failures as errors: serve stops with the first one's exit code.
 */
export async function checkStart(instance: Instance, store: Store, r: CheckReport): Promise<{ creds: NodeCredentials | null; failures: AppError[] }> {
  const failures: AppError[] = [];
  let creds: NodeCredentials | null = null;
  try {
    creds = loadNodeCredentials(instance.peerTls, instance.config.node);
    r.lines.push(`peer: ${instance.peerTls.cert} (node ${creds.name} from the cluster CA ${instance.peerTls.ca}; expires ${creds.notAfter.toISOString().slice(0, 10)})`);
    const d = days(creds.notAfter, new Date());
    if (d < EXPIRY_WARN_DAYS) r.warnings.push(`peer.cert: ${instance.peerTls.cert} expires in ${d} days; re-issue it with "pigeon cert issue ${creds.name} --out DIR" on the CA holder`);
  } catch (e) {
    problem(r, failures, e, 'peer.cert/peer.key: ');
  }
  if (creds !== null) {
    // what registerSelf would say, without writing: a revoked certificate, or a name another
    // certificate holds (a re-issued one announced as next is fine)
    try {
      const fingerprint = creds.fingerprint;
      if ((await store.revokedFingerprints()).has(fingerprint)) {
        throw new AppError('NODE_REMOVED', `this node's certificate was revoked when node ${creds.name} was removed from the cluster; issue a new certificate with "pigeon cert issue ${instance.config.node} --out DIR" on the CA holder`);
      }
      const row = await store.getNode(instance.config.node);
      if (row !== null) reRegistration({ fingerprint: row.fingerprint, next_fingerprint: row.nextFingerprint }, { name: instance.config.node, fingerprint, certExpires: creds.notAfter.toISOString(), peerAddress: null });
      r.lines.push(`node ${instance.config.node}: ${row === null ? 'not registered yet (serve registers it)' : `registered, ${row.state}`}`);
    } catch (e) {
      problem(r, failures, e, `peer.cert: ${instance.peerTls.cert}: `);
    }
  }
  try {
    peerAddress(instance);
  } catch (e) {
    problem(r, failures, e);
  }
  // every client pair (the clearer message of checkPair), then loaded as serve loads them
  const before = failures.length;
  for (const p of clientPairs(instance.tls)) {
    try {
      checkPair(p, new Date(), { validity: false });
    } catch (e) {
      problem(r, failures, e);
    }
  }
  if (failures.length === before) {
    try {
      loadClientTls(instance.tls);
    } catch (e) {
      problem(r, failures, e);
    }
  }
  try {
    resolveMailUser(instance.config.mail_user);
  } catch (e) {
    problem(r, failures, e, 'mail_user: ');
  }
  try {
    await createAuth(instance.config.auth, store, instance.dir);
  } catch (e) {
    problem(r, failures, e, 'auth: ');
  }
  return { creds, failures };
}

const PROTOCOLS = ['imap', 'pop3'] as const;
type Proto = (typeof PROTOCOLS)[number];

function days(to: Date, now: Date): number {
  return Math.floor((to.getTime() - now.getTime()) / 86400_000);
}

/**
 * The certificates clients see (tls, tls.sni): names, issuer and expiry of each, a warning when it
 * expires soon, a problem when it is expired or not valid yet. (Unloadable pairs are checkStart's
 * problems already; they are not said twice.)
 */
export function checkCertificates(instance: Instance, r: CheckReport, now = new Date()): void {
  const said = [...r.problems];
  for (const p of clientPairs(instance.tls)) {
    try {
      const info = checkPair(p, now);
      r.lines.push(`${p.setting}: ${p.cert} (${info.names.length > 0 ? info.names.join(', ') : info.subject}; issuer ${info.issuer}; expires ${info.notAfter.toISOString().slice(0, 10)})`);
      const d = days(info.notAfter, now);
      if (d < EXPIRY_WARN_DAYS) r.warnings.push(`${p.setting}.cert: ${p.cert} expires in ${d} days`);
    } catch (e) {
      const m = isAppError(e) ? e.message : String(e);
      if (!said.some((x) => x.startsWith(`${p.setting}.`) || x.startsWith(`${p.setting}:`))) r.problems.push(m);
    }
  }
}

/**
 * Which backend each scope selects, per protocol: backend name → the scopes that select it
 * ("default", "global", "domain D", "user U"). Users homed on other nodes are not this node's.
 */
export async function selectedBackends(store: Store, node: string): Promise<Map<string, { protocol: Proto; backend: string; by: string[] }>> {
  const out = new Map<string, { protocol: Proto; backend: string; by: string[] }>();
  const note = (protocol: Proto, backend: string, by: string): void => {
    const k = `${protocol} ${backend}`;
    const e = out.get(k) ?? { protocol, backend, by: [] };
    e.by.push(by);
    out.set(k, e);
  };
  const valueOf = (rows: readonly SettingRow[], p: Proto): { backend: string; from: string } => {
    const e = resolve(rows)[`${p}.backend`];
    return { backend: String(e?.value ?? 'dovecot'), from: e?.from ?? 'default' };
  };
  for (const p of PROTOCOLS) {
    // only the rows that can decide p.backend, at every scope (not a read per user)
    const rows = await decidingRows(store, `${p}.backend`);
    const g = valueOf(rowsOf(rows, null), p);
    note(p, g.backend, g.from === 'default' ? 'default' : 'global');
    const domains = new Set(rows.filter((r) => r.scope === 'domain' && r.name !== null).map((r) => r.name as string));
    for (const d of [...domains].sort()) {
      const v = valueOf(rowsOf(rows, d), p);
      if (v.backend !== g.backend) note(p, v.backend, `domain ${d}`);
    }
    const users = new Set(rows.filter((r) => r.scope === 'user' && r.name !== null).map((r) => r.name as string));
    for (const address of [...users].sort()) {
      const u = await store.getUser(address);
      if (!u || (u.home !== null && u.home !== node)) continue;
      const v = valueOf(rowsOf(rows, u.domain, u.address), p);
      if (v.backend !== valueOf(rowsOf(rows, u.domain), p).backend) note(p, v.backend, `user ${u.address}`);
    }
  }
  return out;
}

/** Run a backend binary's probe; the problem, or null when it started as expected. */
export function probeBinary(probe: BinaryProbe<unknown>, bin: string, mailUser: MailUser): string | null {
  try {
    accessSync(bin, constants.X_OK);
    if (!statSync(bin).isFile()) return `${bin} is not a file`;
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code ?? 'error';
    return `${bin}: ${code === 'ENOENT' ? 'no such file' : code === 'EACCES' ? 'not executable' : code}`;
  }
  const r = spawnSync(bin, [...probe.args], {
    cwd: '/',
    env: { PATH: '/usr/bin:/bin' },
    stdio: ['ignore', 'pipe', 'pipe'],
    timeout: BACKEND_PROBE_MS,
    encoding: 'latin1',
    ...(mailUser.switchTo ? { uid: mailUser.uid, gid: mailUser.gid } : {}),
  });
  if (r.error) {
    const code = (r.error as NodeJS.ErrnoException).code;
    return code === 'ETIMEDOUT' ? `${bin} did not finish within ${BACKEND_PROBE_MS / 1000}s when run as ${bin} ${probe.args.join(' ')}` : `${bin} cannot be run: ${code ?? r.error.message}`;
  }
  const said = `${r.stdout}${r.stderr}`;
  const first = said.split('\n').find((l) => l.trim() !== '')?.trim().slice(0, 200) ?? '(nothing)';
  if (/error while loading shared libraries|cannot open shared object/.test(said)) return `${bin} cannot start: ${first}`;
  if (!probe.expect.test(said)) return `${bin} does not behave like ${probe.what}: run as "${[bin, ...probe.args].join(' ')}" it printed: ${first} (exit ${r.status ?? r.signal})`;
  return null;
}

/** The binaries of every backend some scope selects on this node. */
export async function checkBackends(instance: Instance, store: Store, mailUser: MailUser, r: CheckReport): Promise<void> {
  for (const { protocol, backend: name, by } of (await selectedBackends(store, instance.config.node)).values()) {
    const who = by.length > 4 ? `${by.slice(0, 4).join(', ')}, … (${by.length} in all)` : by.join(', ');
    const backend = BACKENDS.get(name);
    if (!backend || backend.serves !== 'local') {
      r.problems.push(`${protocol}.backend = ${name} (${who}): no such backend on this node (known: ${localBackends().map((b) => b.name).join(', ')})`);
      continue;
    }
    const probe = backend.probe?.[protocol];
    if (!probe) {
      r.lines.push(`${protocol}.backend ${name}: nothing to probe (${who})`);
      continue;
    }
    const bin = probe.path(backendConfig(backend, instance.raw));
    const key = probe.setting;
    const problem = probeBinary(probe, bin, mailUser);
    if (problem) r.problems.push(`${key}: ${problem}; selected by ${protocol}.backend = ${name} (${who}): those logins would get ${protocol === 'imap' ? 'NO [UNAVAILABLE]' : '-ERR [SYS/TEMP]'}`);
    else r.lines.push(`${protocol}.backend ${name}: ${bin} starts (${who})`);
  }
}

/** Where the one-session modes (inetd, Postfix spawn, stdio) log. */
export function checkLog(instance: Instance, r: CheckReport): void {
  if (instance.logFile !== null) {
    r.lines.push(`log: ${instance.logFile} (log.file)`);
    return;
  }
  const why = syslogUnavailable(instance.config.log.syslog_socket);
  if (why === null) r.lines.push(`log: pigeon serve to stderr; inetd, Postfix spawn and stdio sessions to syslog through ${instance.config.log.syslog_socket}`);
  else r.lines.push(`log: pigeon serve to stderr; inetd, Postfix spawn and stdio sessions to ${instance.logFallback} (log.fallback_file): ${why}`);
}

/** OAUTHBEARER/XOAUTH2: the JWKS file of `oauth:` (auth/oauth.ts). */
export async function checkOAuth(instance: Instance, r: CheckReport): Promise<void> {
  const { checkJwksFile } = await import('../auth/oauth.js');
  const c = await checkJwksFile(instance.config.oauth, instance.dir);
  r.lines.push(c.line);
  if (c.problem !== undefined) r.problems.push(c.problem);
  if (c.warning !== undefined) r.warnings.push(c.warning);
}
