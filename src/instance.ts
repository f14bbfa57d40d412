/**
 * NAME        src/instance — find, load and check an instance's configuration file
 * SYNOPSIS    pigeon -c DIR|FILE ...   (or PIGEON_CONFIG; default /etc/pigeon/pigeon.yaml)
 * DESCRIPTION An instance is a directory: pigeon.yaml, then conf.d/*.yaml merged over it in lexical
 *             order (maps merge, lists and scalars replace). Every file is checked on its own, so an
 *             error names the file, line, column and key. Relative paths are relative to the
 *             instance directory. Defaults are applied once, here.
 *             The file's shape comes from the registries: each backend with settings of its own
 *             owns a section (backends/registry.ts: `dovecot:`, `courier:`, parsed by the backend
 *             itself), `peer.trust` names a trust module, `auth:` is checked by the auth sources,
 *             and `modules:` names modules kept outside this tree (src/module-files.ts loads
 *             them; a backend named there may own the section of its name).
 * DIAGNOSTICS CONFIG_INVALID / CONFIG_MISSING, exit 78: `file:line:col: key: message`.
 */
import { readFileSync, readdirSync, existsSync, openSync, fstatSync, closeSync, type Stats } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, isAbsolute } from 'node:path';
import type * as Yaml from 'yaml';
import type { LineCounter, Node } from 'yaml';
import { z } from 'zod';
import { AppError } from './errors.js';
import { configFileOf } from './instance-path.js';
import { readParsed, writeParsed, writesParsed, type Source } from './instance-parsed.js';
import { parseDbUrl, redactUrl, type ServerDbOptions } from './store.js';
import { checkAuthSection, SOURCE_NAME } from '../auth/registry.js';
import { TRUST } from '../certs/trust.js';
import { BACKENDS } from '../backends/registry.js';
import { MODULE_NAME, FILE_MODULE_KINDS, type FileModuleKind } from './modules.js';
import { parseNetwork } from './ip.js';
import {
  AUTH_FAILURE_DELAY_MS,
  AUTH_PENALTY_MAX_MS,
  PREAUTH_CONNS_PER_IP,
  MAX_CONNECTIONS,
  MAX_USERIP_CONNECTIONS,
  PREAUTH_IDLE_MS,
  IMAP_MAX_LINE,
  MDA_LOCK_WAIT_MS,
  CLAMD_ADDRESS,
  CLAMD_TIMEOUT_S,
  TLS_HANDSHAKE_MS,
  PROXY_HEADER_MS,
  PEER_HANDOFF_MS,
  PEER_CONNECT_MS,
  PEER_POOL_SIZE,
  PEER_POOL_IDLE_MS,
  PEER_RESUME_S,
  PG_POOL_SIZE,
  PG_CONNECT_TIMEOUT_S,
  PG_STATEMENT_TIMEOUT_S,
  PG_LISTEN_CHECK_S,
} from './limits.js';
import { MECHANISM_NAMES, OAUTH_MECHANISMS } from './proxy/sasl/names.js';

export const PROTOCOLS = ['imap', 'imaps', 'pop3', 'pop3s', 'lmtp', 'peer', 'metrics'] as const;
export type Protocol = (typeof PROTOCOLS)[number];

export const DEFAULT_PORTS: Record<Protocol, number> = { imap: 143, imaps: 993, pop3: 110, pop3s: 995, lmtp: 24, peer: 4190, metrics: 9900 };

export interface Listener {
  readonly protocol: Protocol;
  /** host and port, or a unix socket path (lmtp only) */
  readonly host: string;
  readonly port: number;
  readonly path: string | null;
  /** `,proxy`: every connection starts with a PROXY header (src/proxy/proxy-header.ts), from limits.trusted_proxies only */
  readonly proxy: boolean;
  /** a socket inherited from systemd (src/systemd.ts): listen on this fd instead of host/port */
  readonly fd?: number;
}

/** Protocols whose listener may take `,proxy` (the peer link and metrics may not). */
export const PROXY_PROTOCOLS: readonly Protocol[] = ['imap', 'imaps', 'pop3', 'pop3s', 'lmtp'];

/** Parse `PROTO=HOST:PORT` (or `lmtp=/path/to/socket`), with `,proxy` after it for a PROXY protocol listener. */
export function parseListen(spec: string): Listener {
  const eq = spec.indexOf('=');
  const proto = eq < 0 ? '' : spec.slice(0, eq);
  const proxy = spec.endsWith(',proxy');
  const addr = eq < 0 ? '' : spec.slice(eq + 1, proxy ? -',proxy'.length : undefined);
  if (!(PROTOCOLS as readonly string[]).includes(proto)) {
    throw new Error(`listener ${JSON.stringify(spec)}: expected PROTO=HOST:PORT with PROTO one of ${PROTOCOLS.join(', ')}`);
  }
  const protocol = proto as Protocol;
  if (proxy && !PROXY_PROTOCOLS.includes(protocol)) {
    throw new Error(`listener ${JSON.stringify(spec)}: ,proxy is for ${PROXY_PROTOCOLS.join(', ')} listeners only`);
  }
  if (addr.startsWith('/')) {
    if (protocol !== 'lmtp') throw new Error(`listener ${JSON.stringify(spec)}: only lmtp may listen on a unix socket`);
    return { protocol, host: '', port: 0, path: addr, proxy };
  }
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(addr);
  const host = m?.[1] ?? m?.[2];
  const port = Number(m?.[3]);
  if (!m || host === undefined || !Number.isInteger(port) || port > 65535) {
    throw new Error(`listener ${JSON.stringify(spec)}: expected HOST:PORT (IPv6 as [::1]:PORT), port 0-65535`);
  }
  return { protocol, host, port, path: null, proxy };
}

const listenSchema = z.string().transform((s, ctx) => {
  try {
    return parseListen(s);
  } catch (e) {
    ctx.addIssue({ code: 'custom', message: (e as Error).message });
    return z.NEVER;
  }
});

const path = z.string().min(1).refine((s) => !/[\0\n]/.test(s), 'no NUL or newline in paths');

const cidr = z.string().transform((s, ctx) => {
  try {
    parseNetwork(s);
    return s;
  } catch (e) {
    ctx.addIssue({ code: 'custom', message: (e as Error).message });
    return z.NEVER;
  }
});
/** A tls.sni key: a DNS name, or `*.` and a DNS name (a wildcard for one label). */
export const SNI_NAME = /^(\*\.)?[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$/i;

const moduleFiles = z.record(z.string().regex(MODULE_NAME, 'a module name is lower-case letters, digits and hyphens'), path).default({});

/** A registered backend's own section: its parse() checks it; an error names the key below the section. */
function backendSection(parse: (raw: unknown) => unknown) {
  return z.unknown().superRefine((v, ctx) => {
    try {
      parse(v);
    } catch (e) {
      const msg = e instanceof Error ? e.message : String(e);
      const m = /^([a-z0-9_.]+): (.*)$/s.exec(msg);
      ctx.addIssue({ code: 'custom', message: m?.[2] ?? msg, path: m?.[1] !== undefined ? m[1].split('.') : [] });
    }
  }).optional();
}

/** Sections owned by backends: the registered ones, and those of backends named in `modules.backend` (checked when loaded). */
function sectionsOf(declared: readonly string[]): Record<string, z.ZodType> {
  const out: Record<string, z.ZodType> = {};
  for (const b of BACKENDS.all()) if (b.section) out[b.section.key] = backendSection(b.section.parse.bind(b.section));
  for (const name of declared) out[name] ??= z.unknown().optional();
  return out;
}

const baseShape = {
  node: z.string().regex(/^[a-z0-9][a-z0-9.-]{0,62}$/i, 'node names are letters, digits, dots and hyphens').default('node1'),
  database: z.string().min(1).default('sqlite:pigeon.db'),
  // a database server (postgres://…): where its password is (first line; mode 0600 or 0640),
  // and this node's connection settings (per process: serve's workers each have their own pool)
  database_password_file: path.nullable().default(null),
  database_pool_size: z.number().int().min(1).max(100).default(PG_POOL_SIZE),
  database_connect_timeout_s: z.number().int().min(1).max(300).default(PG_CONNECT_TIMEOUT_S),
  database_statement_timeout_s: z.number().int().min(1).max(300).default(PG_STATEMENT_TIMEOUT_S),
  database_listen_check_s: z.number().int().min(1).max(3600).default(PG_LISTEN_CHECK_S),
  mail_root: path.default('mail'),
  mail_user: z.string().min(1).default('mail'),
  listen: z.array(listenSchema).default([]),
  handoff: z.boolean().default(true),
  // password sources (auth/registry.ts): the chain, modules from outside this tree, and each
  // source's own keys, checked by the source itself
  auth: z
    .looseObject({
      chain: z.array(z.string()).min(1).default(['database']),
      modules: z.record(z.string().regex(SOURCE_NAME, 'an auth source name is lower-case letters, digits and hyphens'), path).default({}),
    })
    .superRefine((a, ctx) => {
      for (const [p, message] of checkAuthSection(a)) ctx.addIssue({ code: 'custom', path: p, message });
    })
    .prefault({}),
  // what IMAP/POP3 clients see (STARTTLS/STLS, imaps/pop3s); any CA, e.g. a public certificate
  tls: z
    .strictObject({
      cert: path.default('certs/node.crt'),
      key: path.default('certs/node.key'),
      // per host name the client asks for (SNI): an exact name, or *.example.org for one label
      sni: z.record(z.string().regex(SNI_NAME, 'a host name (a.example.org) or *.example.org'), z.strictObject({ cert: path, key: path })).default({}),
      // the cluster CA: it issues the node certificates (peer.cert), trusted on peer links
      ca: path.default('certs/ca.crt'),
      ca_key: path.default('certs/ca.key'),
    })
    .prefault({}),
  // modules kept outside this tree, per kind: NAME: /path/to/module.js (src/module-files.ts)
  modules: z.strictObject(Object.fromEntries(FILE_MODULE_KINDS.map((k) => [k, moduleFiles])) as Record<FileModuleKind, typeof moduleFiles>).prefault({}),
  // the cluster link: where other nodes reach this one (default: the peer= listener's address)
  peer: z
    .strictObject({
      advertise: z
        .string()
        .regex(/^(\[[0-9a-f:.]+\]|[a-z0-9.-]+):\d{1,5}$/i, 'expected HOST:PORT')
        .nullable()
        .default(null),
      // which trust module decides about the node at the other end (certs/trust.ts; checked below)
      trust: z.string().default('registry'),
      handoff_timeout_s: z.number().int().min(1).max(300).default(PEER_HANDOFF_MS / 1000),
      connect_timeout_s: z.number().int().min(1).max(300).default(PEER_CONNECT_MS / 1000),
      // spare, already verified links per other node (src/peer/link.ts): a burst of sessions skips the handshakes
      pool_size: z.number().int().min(0).max(64).default(PEER_POOL_SIZE),
      pool_idle_s: z.number().int().min(1).max(300).default(PEER_POOL_IDLE_MS / 1000),
      // links resume the TLS 1.3 session of an earlier full handshake to the same node for this long (src/peer/link.ts); 0: every link a full handshake
      resume_s: z.number().int().min(0).max(3600).default(PEER_RESUME_S),
      // this node's certificate from the cluster CA (tls.ca), for peer links only
      cert: path.default('certs/node.crt'),
      key: path.default('certs/node.key'),
    })
    .prefault({}),
  // node-local: the MTA's sendmail command (forward and vacation re-inject mail through it)
  sendmail: path.default('/usr/sbin/sendmail'),
  // node-local: ClamAV's clamd for the antivirus delivery module (a unix socket path or HOST:PORT)
  clamd: z
    .strictObject({
      address: z
        .string()
        .regex(/^(\/[^\0\r\n]{1,200}|(\[[0-9a-f:.]+\]|[a-z0-9.-]+):\d{1,5})$/i, 'expected a unix socket path (/run/clamav/clamd.ctl) or HOST:PORT')
        .default(CLAMD_ADDRESS),
      timeout_s: z.number().int().min(1).max(600).default(CLAMD_TIMEOUT_S),
    })
    .prefault({}),
  log: z
    .strictObject({
      level: z.enum(['debug', 'info', 'warn', 'error']).default('info'),
      file: z.string().nullable().default(null),
      // inetd and Postfix spawn without log.file: syslog through this socket when it exists ...
      syslog_socket: path.default('/dev/log'),
      // ... else this file (relative to the instance directory), with one line saying why
      fallback_file: path.default('pigeon.log'),
    })
    .prefault({}),
  // node-local runtime files: the node state service's socket (src/anvil)
  run_dir: path.default('run'),
  // node-wide limits (LIMITS.md; src/limits.ts holds the defaults)
  limits: z
    .strictObject({
      auth_failure_delay_ms: z.number().int().min(0).max(60000).default(AUTH_FAILURE_DELAY_MS),
      auth_failure_delay_max_ms: z.number().int().min(0).max(300000).default(AUTH_PENALTY_MAX_MS),
      preauth_timeout_s: z.number().int().min(1).max(3600).default(PREAUTH_IDLE_MS / 1000),
      max_line: z.number().int().min(512).max(65536).default(IMAP_MAX_LINE),
      // mbox delivery: wait for the fcntl lock and the dotlock at most this long, then 4.2.0
      mda_lock_wait_s: z.number().int().min(1).max(600).default(MDA_LOCK_WAIT_MS / 1000),
      tls_handshake_timeout_s: z.number().int().min(1).max(180).default(TLS_HANDSHAKE_MS / 1000),
      trusted_networks: z.array(cidr).default([]),
      // the only addresses a `,proxy` listener accepts connections (and their PROXY header) from
      trusted_proxies: z.array(cidr).default([]),
      proxy_header_timeout_s: z.number().int().min(1).max(180).default(PROXY_HEADER_MS / 1000),
      preauth_per_ip: z.number().int().min(1).max(1_000_000).default(PREAUTH_CONNS_PER_IP),
      max_connections: z.number().int().min(1).max(1_000_000).default(MAX_CONNECTIONS),
      max_userip_connections: z.number().int().min(1).max(1_000_000).default(MAX_USERIP_CONNECTIONS),
    })
    .refine((l) => l.auth_failure_delay_max_ms >= l.auth_failure_delay_ms, {
      message: 'must be at least auth_failure_delay_ms',
      path: ['auth_failure_delay_max_ms'],
    })
    .prefault({}),
  // SASL mechanisms offered to IMAP/POP3 clients, node-wide (src/proxy/sasl/names.ts); null: the defaults
  sasl: z
    .strictObject({ mechanisms: z.array(z.enum(MECHANISM_NAMES)).min(1).nullable().default(null) })
    .prefault({}),
  // OAUTHBEARER/XOAUTH2: JWTs checked against this node's JWKS file (auth/oauth.ts)
  oauth: z
    .strictObject({
      jwks_file: path.nullable().default(null),
      issuer: z.string().min(1).nullable().default(null),
      audience: z.string().min(1).nullable().default(null),
      username_claim: z.string().min(1).default('email'),
      clock_skew_s: z.number().int().min(0).max(600).default(60),
    })
    .prefault({}),
};

/** Names of modules the files declare for `kind` (pre-scan: they may own a section). */
function declaredIn(raws: readonly Record<string, unknown>[], kind: FileModuleKind): string[] {
  const out = new Set<string>();
  for (const r of raws) {
    const m = r['modules'];
    const k = m !== null && typeof m === 'object' ? (m as Record<string, unknown>)[kind] : undefined;
    if (k !== null && typeof k === 'object') for (const n of Object.keys(k)) out.add(n);
  }
  return [...out];
}

/** The schema of pigeon.yaml with the sections of the registered backends (and of those `declared` in modules.backend). */
export function fileSchemaFor(declared: { backend?: readonly string[]; trust?: readonly string[] } = {}) {
  const trusts = [...TRUST.names(), ...(declared.trust ?? [])];
  return z
    .strictObject({ ...baseShape, ...sectionsOf(declared.backend ?? []) })
    .superRefine((c, ctx) => {
      if (!trusts.includes(c.peer.trust)) ctx.addIssue({ code: 'custom', path: ['peer', 'trust'], message: `unknown trust module; known: ${trusts.join(', ')}` });
      const oauthListed = (c.sasl.mechanisms ?? []).filter((m) => OAUTH_MECHANISMS.includes(m));
      if (oauthListed.length > 0 && c.oauth.jwks_file === null) ctx.addIssue({ code: 'custom', path: ['sasl', 'mechanisms'], message: `${oauthListed.join(', ')} need oauth.jwks_file` });
    });
}

export const fileSchema = fileSchemaFor();

export type FileConfig = z.output<typeof fileSchema>;

export interface Instance {
  readonly dir: string;
  readonly file: string;
  readonly files: readonly string[];
  readonly config: FileConfig;
  /** the merged files as written (a backend's section: backendConfig in backends/registry.ts) */
  readonly raw: Readonly<Record<string, unknown>>;
  /** the SQLite file (absolute), or the server database's URL without its password: for messages */
  readonly dbPath: string;
  /** a database server's node-local settings (database_password_file absolute, pool, timeouts) */
  readonly dbOptions: ServerDbOptions;
  readonly mailRoot: string;
  /** absolute log file path, or null for stderr */
  readonly logFile: string | null;
  /** absolute run_dir: the node state service's socket */
  readonly runDir: string;
  /** where one-session modes log when there is neither log.file nor a syslog socket (absolute) */
  readonly logFallback: string;
  /** client-facing TLS (tls.cert/tls.key, tls.sni), and the cluster CA (tls.ca/tls.ca_key); absolute paths */
  readonly tls: {
    readonly cert: string;
    readonly key: string;
    readonly sni: readonly { readonly name: string; readonly cert: string; readonly key: string }[];
    readonly ca: string;
    readonly caKey: string;
  };
  /** the node certificate for peer links (peer.cert/peer.key) and the cluster CA that issued it */
  readonly peerTls: { readonly cert: string; readonly key: string; readonly ca: string };
}

/** Where the instance is: -c, then PIGEON_CONFIG, then /etc/pigeon. A directory means DIR/pigeon.yaml. */
export function locate(c: string | undefined): string {
  const file = configFileOf(c);
  if (!existsSync(file)) {
    throw new AppError('CONFIG_MISSING', `${file}: no such configuration file (create an instance with "pigeon init DIR", then use -c DIR)`);
  }
  return file;
}

function posOf(lc: LineCounter, file: string, offset: number): string {
  const p = lc.linePos(offset);
  return `${file}:${p.line}:${p.col}`;
}

/** the yaml package, loaded on first use: a process that finds the files parsed (src/instance-parsed.ts) never needs it */
let yamlLoaded: typeof Yaml | undefined;
const yaml = (): typeof Yaml => (yamlLoaded ??= createRequire(import.meta.url)('yaml') as typeof Yaml);
type Parsed = ReturnType<typeof Yaml.parseDocument>;

function nodeAt(doc: Parsed, p: readonly PropertyKey[]): Node | null {
  for (let n = p.length; n >= 0; n--) {
    const node: unknown = n === 0 ? doc.contents : doc.getIn(p.slice(0, n), true);
    if (node && typeof node === 'object' && 'range' in node) return node as Node;
  }
  return null;
}

const STRICT_UTF8 = new TextDecoder('utf-8', { fatal: true });

/** The number of the first line of `data` that is not valid UTF-8. */
function firstInvalidUtf8Line(data: Buffer): number {
  let start = 0;
  for (let n = 1; start <= data.length; n++) {
    let end = data.indexOf(0x0a, start);
    if (end < 0) end = data.length;
    try {
      STRICT_UTF8.decode(data.subarray(start, end));
    } catch {
      return n;
    }
    start = end + 1;
  }
  return 1;
}

/** Read one configuration file (its stat from the same open), or throw CONFIG_MISSING / CONFIG_INVALID. */
function readSource(file: string): Source {
  let bytes: Buffer;
  let stat: Stats;
  try {
    const fd = openSync(file, 'r');
    try {
      stat = fstatSync(fd);
      bytes = readFileSync(fd);
    } finally {
      closeSync(fd);
    }
  } catch (e) {
    throw new AppError('CONFIG_MISSING', `${file}: cannot read: ${(e as NodeJS.ErrnoException).code ?? String(e)}`);
  }
  // paths and names come from here: bytes that are not UTF-8 are refused, never made U+FFFD
  let text: string;
  try {
    text = STRICT_UTF8.decode(bytes);
  } catch {
    const bad = firstInvalidUtf8Line(bytes);
    throw new AppError('CONFIG_INVALID', `${file}:${bad}: not valid UTF-8 (YAML files are UTF-8 text)`);
  }
  return { file, text, stat };
}

/** Parse one file's YAML into a plain object, or throw CONFIG_INVALID with file:line:col. */
function readYaml({ file, text }: Source): { data: Record<string, unknown>; doc: Parsed; lc: LineCounter } {
  const { LineCounter, parseDocument } = yaml();
  const lc = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lc, prettyErrors: false, uniqueKeys: true });
  const err = doc.errors[0];
  if (err) throw new AppError('CONFIG_INVALID', `${posOf(lc, file, err.pos[0])}: syntax error: ${err.message.split('\n')[0]}`);
  const data: unknown = doc.toJS() ?? {};
  if (typeof data !== 'object' || data === null || Array.isArray(data)) {
    throw new AppError('CONFIG_INVALID', `${file}:1:1: the configuration must be a mapping of keys`);
  }
  return { data: data as Record<string, unknown>, doc, lc };
}

/**
 * A configuration is parsed once per process (and per reload): zod's compiled fast path for
 * objects (it writes and compiles a parser with `new Function` on an object schema's first
 * parse) costs more than it saves here, in every one-shot process (one `pigeon deliver` per
 * message) above all.
 */
const PARSE_ONCE = { jitless: true } as const;

/** Check one file on its own against `schema`; throw CONFIG_INVALID with file:line:col and key. */
function checkFile(file: string, y: ReturnType<typeof readYaml>, schema: ReturnType<typeof fileSchemaFor>): void {
  const { data, doc, lc } = y;
  const r = schema.safeParse(data, PARSE_ONCE);
  if (!r.success) {
    const issue = r.error.issues[0];
    if (issue) {
      let p = issue.path;
      let msg = issue.message;
      if (issue.code === 'unrecognized_keys') {
        p = [...issue.path, issue.keys[0] ?? ''];
        msg = `unknown key${issue.keys.length > 1 ? 's' : ''} ${issue.keys.join(', ')}`;
      }
      // a map key that is not allowed (tls.sni names): its own rule's message
      if (issue.code === 'invalid_key') msg = issue.issues[0]?.message ?? msg;
      const node = nodeAt(doc, p);
      // for an unknown key point at the key itself
      let offset = node?.range?.[0] ?? 0;
      if (issue.code === 'unrecognized_keys') {
        const parent = nodeAt(doc, issue.path);
        if (parent && yaml().isMap(parent)) {
          const item = parent.items.find((i) => String((i.key as { value?: unknown } | null)?.value) === issue.keys[0]);
          const k = item?.key as Node | undefined;
          if (k?.range) offset = k.range[0];
        }
      } else if (node && yaml().isSeq(node) === false && p.length > 0) {
        offset = node.range?.[0] ?? offset;
      }
      throw new AppError('CONFIG_INVALID', `${posOf(lc, file, offset)}: ${p.map(String).join('.') || '(top)'}: ${msg}`);
    }
  }
}

function merge(a: Record<string, unknown>, b: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = { ...a };
  for (const [k, v] of Object.entries(b)) {
    const cur = out[k];
    if (v && typeof v === 'object' && !Array.isArray(v) && cur && typeof cur === 'object' && !Array.isArray(cur)) {
      out[k] = merge(cur as Record<string, unknown>, v as Record<string, unknown>);
    } else out[k] = v;
  }
  return out;
}

interface Checked {
  readonly config: FileConfig;
  readonly raw: Record<string, unknown>;
  readonly raws: Record<string, unknown>[];
}
/**
 * The files' merged configuration, checked. `cached`: their parsed forms from the cache (every
 * file passed its own check when it was made; the merged one is checked again here, against this
 * code's schema): null when that fails, so that the caller parses the YAML and reports the error
 * with its file, line and column.
 */
function checked(file: string, sources: readonly Source[], cached: null): Checked;
function checked(file: string, sources: readonly Source[], cached: Record<string, unknown>[]): Checked | null;
function checked(file: string, sources: readonly Source[], cached: Record<string, unknown>[] | null): Checked | null {
  const yamls = cached === null ? sources.map((s) => readYaml(s)) : null;
  const raws = cached ?? (yamls ?? []).map((y) => y.data);
  const schema = fileSchemaFor({ backend: declaredIn(raws, 'backend'), trust: declaredIn(raws, 'trust') });
  yamls?.forEach((y, i) => checkFile(sources[i]?.file ?? '', y, schema));
  let raw: Record<string, unknown> = {};
  for (const d of raws) raw = merge(raw, d);
  const r = schema.safeParse(raw, PARSE_ONCE);
  if (!r.success) {
    if (cached !== null) return null;
    throw new AppError('CONFIG_INVALID', `${file}: ${r.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
  }
  return { config: r.data, raw, raws };
}

export function loadInstance(c: string | undefined): Instance {
  const file = locate(c);
  const dir = dirname(file);
  const files = [file];
  const confd = join(dir, 'conf.d');
  if (existsSync(confd)) {
    for (const f of readdirSync(confd).filter((f) => f.endsWith('.yaml') || f.endsWith('.yml')).sort()) files.push(join(confd, f));
  }
  const sources = files.map((f) => readSource(f));
  const main = sources[0] as Source;
  // root and pigeon.yaml's owner parse the YAML and keep the parsed form up to date; other users
  // (the mail user's deliveries) take it when it was made from exactly these texts
  const writer = writesParsed(main);
  const cached = writer ? null : readParsed(dir, sources);
  const loaded = cached !== null ? checked(file, sources, cached) : null;
  const { config, raw, raws } = loaded ?? checked(file, sources, null);
  const abs = (p: string): string => (isAbsolute(p) ? p : join(dir, p));
  let dbPath: string;
  try {
    const t = parseDbUrl(config.database);
    dbPath = t.kind === 'sqlite' ? abs(t.path) : redactUrl(t.url);
  } catch (e) {
    throw new AppError('CONFIG_INVALID', `${file}: database: ${(e as Error).message}`);
  }
  if (writer && loaded === null) writeParsed(dir, sources, raws);
  const dbOptions: ServerDbOptions = {
    passwordFile: config.database_password_file === null ? null : abs(config.database_password_file),
    poolMax: config.database_pool_size,
    connectTimeoutMs: config.database_connect_timeout_s * 1000,
    statementTimeoutMs: config.database_statement_timeout_s * 1000,
    listenCheckMs: config.database_listen_check_s * 1000,
  };
  return {
    dir,
    file,
    files,
    config,
    raw,
    dbPath,
    dbOptions,
    mailRoot: abs(config.mail_root),
    logFile: config.log.file === null || config.log.file === '' ? null : abs(config.log.file),
    runDir: abs(config.run_dir),
    logFallback: abs(config.log.fallback_file),
    tls: {
      cert: abs(config.tls.cert),
      key: abs(config.tls.key),
      sni: Object.entries(config.tls.sni).map(([name, p]) => ({ name: name.toLowerCase(), cert: abs(p.cert), key: abs(p.key) })),
      ca: abs(config.tls.ca),
      caKey: abs(config.tls.ca_key),
    },
    peerTls: { cert: abs(config.peer.cert), key: abs(config.peer.key), ca: abs(config.tls.ca) },
  };
}
