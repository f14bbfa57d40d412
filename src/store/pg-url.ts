/**
 * NAME        src/store/pg-url — parse a PostgreSQL connection URL the way libpq reads it
 * SYNOPSIS    parsePgUrl('postgres://pigeon@db1,db2:5433/pigeon?target_session_attrs=read-write')
 * DESCRIPTION `postgres://` or `postgresql://`, then `[USER[:PASSWORD]@][HOST[:PORT][,HOST[:PORT]]…][/DB]`
 *             and `?` parameters. Hosts are tried in order; a host starting with `/` (written
 *             percent-encoded in the authority, or as `?host=/run/postgresql`) is a unix socket
 *             directory; no host at all is Debian's socket directory /var/run/postgresql, as libpq
 *             does. Parameters: host, port, dbname, user, password, sslmode (disable, allow,
 *             prefer, require, verify-ca, verify-full), sslrootcert (a CA file, or `system`),
 *             target_session_attrs (any, read-write, read-only, primary, standby, prefer-standby),
 *             connect_timeout (seconds), application_name. Percent-decoding as in libpq (`+` is
 *             a plus). Without sslmode: `prefer` over TCP (libpq's default), none on a socket.
 * DIAGNOSTICS AppError CONFIG_INVALID naming the part that is wrong (an unknown parameter, a bad
 *             port, verify-ca without sslrootcert, sockets mixed with TCP hosts).
 * SECURITY    The password is kept only in the parsed value, never in `where` (the printable
 *             form) and never in an error message: messages quote only the part at fault, and
 *             never the user-info part of the URL.
 */
import { AppError } from '../errors.js';

export const SSL_MODES = ['disable', 'allow', 'prefer', 'require', 'verify-ca', 'verify-full'] as const;
export type SslMode = (typeof SSL_MODES)[number];
export const TARGET_SESSION_ATTRS = ['any', 'read-write', 'read-only', 'primary', 'standby', 'prefer-standby'] as const;
export type TargetSessionAttrs = (typeof TARGET_SESSION_ATTRS)[number];

/** Debian's (and libpq's compiled-in) socket directory, for a URL without a host. */
export const DEFAULT_SOCKET_DIR = '/var/run/postgresql';
export const DEFAULT_PORT = 5432;

export interface PgHost {
  readonly host: string;
  readonly port: number;
}

export interface PgUrl {
  /** TCP hosts, tried in order (empty when `socketDir` is set) */
  readonly hosts: readonly PgHost[];
  /** the unix socket directory, or null for TCP */
  readonly socketDir: string | null;
  /** the port that names the socket file (.s.PGSQL.PORT) */
  readonly socketPort: number;
  readonly user: string | null;
  readonly password: string | null;
  readonly database: string | null;
  readonly sslmode: SslMode;
  /** a CA file, 'system', or null */
  readonly sslrootcert: string | null;
  readonly targetSessionAttrs: TargetSessionAttrs;
  readonly connectTimeoutS: number | null;
  readonly applicationName: string | null;
  /** printable, without the password */
  readonly where: string;
}

const KNOWN = ['host', 'port', 'dbname', 'user', 'password', 'sslmode', 'sslrootcert', 'target_session_attrs', 'connect_timeout', 'application_name'] as const;
type Known = (typeof KNOWN)[number];

function bad(msg: string): AppError {
  return new AppError('CONFIG_INVALID', `database URL: ${msg}`);
}

function decode(s: string, what: string): string {
  try {
    return decodeURIComponent(s);
  } catch {
    throw bad(`${what} has a malformed %-escape`);
  }
}

export function isPgUrl(url: string): boolean {
  return /^postgres(ql)?:\/\//i.test(url);
}

function parsePort(s: string): number {
  if (!/^\d{1,5}$/.test(s) || Number(s) < 1 || Number(s) > 65535) throw bad(`port ${JSON.stringify(s)} is not a number from 1 to 65535`);
  return Number(s);
}

/** `[v6]:port`, `host:port`, `host`, `:port` or '' (the default). */
function splitHost(spec: string): { host: string; port: string | null } {
  const v6 = /^\[([^\]]*)\](?::(.*))?$/.exec(spec);
  if (v6) return { host: v6[1] ?? '', port: v6[2] ?? null };
  const colon = spec.lastIndexOf(':');
  if (colon === -1) return { host: spec, port: null };
  return { host: spec.slice(0, colon), port: spec.slice(colon + 1) };
}

function quoteHost(h: string): string {
  return h.includes(':') ? `[${h}]` : encodeURIComponent(h).replace(/%2E/gi, '.');
}

export function parsePgUrl(url: string): PgUrl {
  const scheme = /^(postgres(?:ql)?):\/\//i.exec(url);
  if (!scheme) throw bad('expected postgres://… or postgresql://…');
  let rest = url.slice(scheme[0].length);
  let query = '';
  const q = rest.indexOf('?');
  if (q !== -1) {
    query = rest.slice(q + 1);
    rest = rest.slice(0, q);
  }
  const slash = rest.indexOf('/');
  const authority = slash === -1 ? rest : rest.slice(0, slash);
  const path = slash === -1 ? '' : rest.slice(slash + 1);
  const at = authority.lastIndexOf('@');
  const userinfo = at === -1 ? null : authority.slice(0, at);
  const hostspec = at === -1 ? authority : authority.slice(at + 1);

  let user: string | null = null;
  let password: string | null = null;
  if (userinfo !== null) {
    const colon = userinfo.indexOf(':');
    user = decode(colon === -1 ? userinfo : userinfo.slice(0, colon), 'the user name');
    if (colon !== -1) password = decode(userinfo.slice(colon + 1), 'the password');
    if (user === '') user = null;
  }
  let database: string | null = path === '' ? null : decode(path, 'the database name');

  const params = new Map<Known, string>();
  if (query !== '') {
    for (const pair of query.split('&')) {
      if (pair === '') continue;
      const eq = pair.indexOf('=');
      const name = decode(eq === -1 ? pair : pair.slice(0, eq), 'a parameter name');
      if (!(KNOWN as readonly string[]).includes(name)) {
        throw bad(`unknown parameter ${JSON.stringify(name.slice(0, 64))} (known: ${KNOWN.join(', ')})`);
      }
      params.set(name as Known, eq === -1 ? '' : decode(pair.slice(eq + 1), `parameter ${name}`));
    }
  }
  const p = (k: Known): string | undefined => params.get(k);
  if (p('user') !== undefined) user = p('user') || null;
  if (p('password') !== undefined) password = p('password') ?? null;
  if (p('dbname') !== undefined) database = p('dbname') || null;

  // hosts and ports: the authority's list, or host=/port= parameters (which win, as in libpq)
  const specs = hostspec === '' ? [] : hostspec.split(',').map(splitHost);
  let hostList = specs.map((s) => decode(s.host, 'a host name'));
  let portList: (string | null)[] = specs.map((s) => s.port);
  if (p('host') !== undefined) hostList = (p('host') ?? '').split(',');
  if (p('port') !== undefined) {
    const ps = (p('port') ?? '').split(',');
    if (ps.length !== 1 && ps.length !== Math.max(1, hostList.length)) throw bad(`${ps.length} ports for ${hostList.length} hosts`);
    portList = hostList.length === 0 ? [ps[0] ?? null] : hostList.map((_, i) => (ps.length === 1 ? (ps[0] ?? null) : (ps[i] ?? null)));
  }
  if (hostList.length === 0) hostList = [''];
  const ports = hostList.map((_, i) => {
    const s = portList[i];
    return s === undefined || s === null || s === '' ? DEFAULT_PORT : parsePort(s);
  });
  const targets = hostList.map((h, i) => ({ host: h === '' ? DEFAULT_SOCKET_DIR : h, port: ports[i] ?? DEFAULT_PORT }));
  const sockets = targets.filter((t) => t.host.startsWith('/'));
  if (sockets.length > 0 && sockets.length !== targets.length) throw bad('unix socket directories cannot be mixed with TCP hosts');
  if (sockets.length > 1) throw bad('only one unix socket directory can be given');
  for (const t of targets) {
    if (!t.host.startsWith('/') && !/^[A-Za-z0-9.:%_-]+$/.test(t.host)) throw bad(`host ${JSON.stringify(t.host.slice(0, 64))} is not a host name or address`);
  }

  const sslmodeRaw = p('sslmode');
  if (sslmodeRaw !== undefined && !(SSL_MODES as readonly string[]).includes(sslmodeRaw)) {
    throw bad(`sslmode ${JSON.stringify(sslmodeRaw.slice(0, 32))} is not one of ${SSL_MODES.join(', ')}`);
  }
  const socket = sockets[0] ?? null;
  const sslrootcert = p('sslrootcert') || null;
  let sslmode: SslMode = (sslmodeRaw as SslMode | undefined) ?? (socket ? 'disable' : sslrootcert ? 'verify-full' : 'prefer');
  if (socket && sslmode !== 'disable' && sslmode !== 'allow' && sslmode !== 'prefer') throw bad(`sslmode=${sslmode} does not apply to a unix socket`);
  if (socket) sslmode = 'disable';
  if (sslmode === 'verify-ca' && (sslrootcert === null || sslrootcert === 'system')) throw bad('sslmode=verify-ca needs sslrootcert=FILE (the CA that signed the server certificate)');
  if (sslmode === 'verify-full' && sslrootcert === null) throw bad('sslmode=verify-full needs sslrootcert=FILE, or sslrootcert=system for the system CAs');

  const tsa = p('target_session_attrs') ?? 'any';
  if (!(TARGET_SESSION_ATTRS as readonly string[]).includes(tsa)) {
    throw bad(`target_session_attrs ${JSON.stringify(tsa.slice(0, 32))} is not one of ${TARGET_SESSION_ATTRS.join(', ')}`);
  }
  let connectTimeoutS: number | null = null;
  const ct = p('connect_timeout');
  if (ct !== undefined) {
    if (!/^\d{1,6}$/.test(ct)) throw bad(`connect_timeout ${JSON.stringify(ct.slice(0, 32))} is not a number of seconds`);
    connectTimeoutS = Number(ct) === 0 ? null : Math.max(2, Number(ct)); // libpq: below 2 means 2
  }

  // the printable form: everything but the password
  const kept: string[] = [];
  if (socket) kept.push(`host=${encodeURIComponent(socket.host)}`);
  if (sslmodeRaw !== undefined) kept.push(`sslmode=${sslmode}`);
  if (sslrootcert !== null) kept.push(`sslrootcert=${encodeURIComponent(sslrootcert)}`);
  if (tsa !== 'any') kept.push(`target_session_attrs=${tsa}`);
  if (ct !== undefined) kept.push(`connect_timeout=${ct}`);
  const hostPart = socket
    ? socket.port === DEFAULT_PORT
      ? ''
      : `:${socket.port}`
    : targets.map((t) => `${quoteHost(t.host)}${t.port === DEFAULT_PORT ? '' : `:${t.port}`}`).join(',');
  const where = `postgres://${user === null ? '' : `${encodeURIComponent(user)}@`}${hostPart}/${database === null ? '' : encodeURIComponent(database)}${kept.length ? `?${kept.join('&')}` : ''}`;

  return {
    hosts: socket ? [] : targets,
    socketDir: socket ? socket.host : null,
    socketPort: socket ? socket.port : DEFAULT_PORT,
    user,
    password,
    database,
    sslmode,
    sslrootcert,
    targetSessionAttrs: tsa as TargetSessionAttrs,
    connectTimeoutS,
    applicationName: p('application_name') ?? null,
    where,
  };
}

/**
 * A URL made printable without parsing it (for a message about a URL that did not parse):
 * the user-info part and a password= parameter are masked.
 */
export function redactUrl(url: string): string {
  return url.replace(/^([a-z][a-z0-9+.-]*:\/\/)[^/?#]*@/i, '$1***@').replace(/([?&]password=)[^&]*/gi, '$1***');
}
