/**
 * NAME        src/init — create an instance directory
 * SYNOPSIS    pigeon init DIR [--node NAME] [--listen PROTO=HOST:PORT[,proxy]]... [--db URL] [--ca-from DIR]
 * DESCRIPTION Writes DIR/pigeon.yaml (commented), DIR/conf.d/, DIR/mail/, the SQLite database
 *             (migrated), DIR/certs/ca.crt (+ ca.key when this instance made the CA) and this node's
 *             DIR/certs/node.crt + node.key, and registers the node. Refuses to touch an existing
 *             instance. On failure, removes only what it created.
 *             --ca-from DIR takes one of two things: another instance (DIR/certs/ca.crt + ca.key:
 *             a fresh host certificate is issued here), or what `pigeon cert issue NODE --out DIR`
 *             wrote on the CA holder (ca.crt, node.crt, node.key, no CA key: that certificate,
 *             verified to name --node and to come from that CA, becomes this node's).
 *             The backends' sections of pigeon.yaml are theirs (backends/registry.ts): Courier's
 *             paths are Debian's when courier-imap/courier-pop are installed, else this clone's
 *             .cache/courier when scripts/install-deps.sh unpacked them there (backends/courier.ts).
 *             --db postgres://… (a database server shared by nodes on several hosts): the schema
 *             is created or migrated there, the URL written into pigeon.yaml, which is then mode
 *             0600 (the URL may hold the password; --db-password-file keeps it out of the URL).
 * DIAGNOSTICS NODE_CONFLICT (78) when --node is already registered with another certificate,
 *             NODE_REMOVED (78) for a revoked certificate, CONFIG_INVALID (78) for an issued
 *             certificate that names another node, is from another CA, or has expired.
 */
import { BACKENDS } from '../backends/registry.js';
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, rmdirSync, writeFileSync, chmodSync, chownSync } from 'node:fs';
import { resolveMailUser } from './mailuser.js';
import { dirname, join, resolve, isAbsolute } from 'node:path';
import { AppError } from './errors.js';
import { parseListen, type Listener } from './instance.js';
import { openStore, parseDbUrl, redactUrl, type DbTarget, type OpenOptions } from './store.js';
import { checkNodeName } from './nodes.js';
import { createCa, issueHostCert, writeKeyPair, readKeyPair, LOOPBACK_NAMES, type KeyPair, type KeyType } from '../certs/ca.js';
import { loadNodeCredentials, verifyHostCert } from '../certs/verify.js';

/** rmdir: true when `dir` is gone (or was never there), false when it is not empty. */
function removeEmptyDir(dir: string): boolean {
  try {
    rmdirSync(dir);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'ENOENT';
  }
}

export interface InitOptions {
  readonly dir: string;
  readonly node: string;
  readonly listen: readonly string[];
  readonly db: string | undefined;
  /** database_password_file: the database server's password (first line), instead of the URL */
  readonly dbPasswordFile?: string | undefined;
  readonly caFrom: string | undefined;
  /** the kind of key of a new host certificate and of a new cluster CA (default ec) */
  readonly key?: KeyType;
}

function yamlListen(ls: readonly Listener[], raw: readonly string[]): string {
  if (ls.length === 0) return 'listen: []\n';
  return `listen:\n${raw.map((r) => `  - ${JSON.stringify(r)}\n`).join('')}`;
}

/** The pigeon.yaml sections of the registered backends, as each writes its own (backends/*.ts). */
function backendSections(): string {
  return BACKENDS.all()
    .flatMap((b) => (b.section === null ? [] : [b.section.template()]))
    .join('');
}

export function configText(o: { node: string; db: string; dbPasswordFile?: string | null; listen: readonly string[] }): string {
  const ls = o.listen.map(parseListen);
  const pwFile = o.dbPasswordFile ?? null;
  return `# PigeonDeliver instance configuration (pigeon.yaml).
# Files in conf.d/*.yaml are merged over this one in lexical order (maps merge, lists replace).
# Check it with:  pigeon -c THIS_DIR config test
# Per-user settings (mailstore, forward, vacation, login policy, backend choice) live in the
# database instead: see "pigeon config set --help".

# This node's name: in its host certificate, the nodes table and every user's "home".
node: ${JSON.stringify(o.node)}

# Configuration database: sqlite:PATH or a plain path (relative to this directory; several nodes
# on one host may share the file), or a PostgreSQL server shared by nodes on several hosts:
# postgres://USER@HOST[:PORT][,HOST2[:PORT]]/DB[?sslmode=verify-full&sslrootcert=FILE
# &target_session_attrs=read-write], postgres:///DB?host=/run/postgresql (a unix socket).
# With a postgres:// URL, "pigeon init" makes this file mode 0600 (the URL may hold the
# password); better: no password in the URL, and database_password_file below or ~/.pgpass.
database: ${JSON.stringify(o.db)}

# A database server only (this node's settings; every process has its own connection pool):
# the password is the first line of this file, which others must not read (0600, or 0640 with
# the group of the accounts pigeon runs as); null: the URL, ~/.pgpass or PGPASSFILE
database_password_file: ${pwFile === null ? 'null' : JSON.stringify(pwFile)}
# connections per process (serve: per worker), kept open and reused
database_pool_size: 4
# connecting gives up after this many seconds per host of the URL (then the next host)
database_connect_timeout_s: 5
# the server cancels a statement after this many seconds; logins and deliveries then get a
# temporary failure (NO [UNAVAILABLE], 451 4.3.0), never a hang
database_statement_timeout_s: 5

# Default mail root: new mailboxes are allocated below it (relative to this directory).
mail_root: mail

# System user that owns mailboxes; Dovecot/Courier and deliveries run as this user, never as root.
mail_user: mail

# Listeners of "pigeon serve": PROTO=HOST:PORT with PROTO one of
# imap imaps pop3 pop3s lmtp peer metrics; lmtp may also be a unix socket path (lmtp=/run/x.sock).
${yamlListen(ls, o.listen)}
# The cluster link (peer= listener): other nodes hand sessions and mail for this node's users
# over mutual TLS 1.3 with node certificates (peer.cert) from the cluster CA (tls.ca).
peer:
  # HOST:PORT other nodes connect to; null = the peer= listener's own address
  advertise: null
  # who is trusted at the other end of a link, after the CA check: registry = a registered,
  # enabled node with this certificate's fingerprint (modules: certs/trust.ts)
  trust: registry
  # a peer must send its whole hand-off within this time
  handoff_timeout_s: 10
  # connecting to another node gives up after this time (the client gets [UNAVAILABLE])
  connect_timeout_s: 10
  # spare, already verified links kept per other node in use (per worker), so sessions skip
  # the TLS handshake; 0 = none. A spare unused pool_idle_s is closed (at most handoff_timeout_s/2)
  pool_size: 4
  pool_idle_s: 5
  # links resume the TLS session of an earlier full handshake with the same node for this long
  # (no certificates exchanged again; the registry is still checked); 0 = every link a full handshake
  resume_s: 300
  # this node's certificate from the cluster CA (pigeon init / pigeon cert issue): peer links
  # only, never shown to mail clients (they see tls.cert)
  cert: certs/node.crt
  key: certs/node.key

# After login on plain TCP, give the client's socket itself to Dovecot (no copy in between).
# false: always relay through the proxy (byte counts in the logout line).
handoff: true

# Password sources, tried in order: the first that knows a user decides (database, passwd-file,
# or a source of auth.modules). passwd-file: a Dovecot passwd-file (user@domain:{SCHEME}hash:...);
# users it authenticates are added to the database (no password) when their domain exists there.
# modules: sources kept outside pigeon, NAME: /path/to/source.js (root-owned), settings under
# auth.NAME (README "Writing an auth source").
auth:
  chain: [database]
  passwd_file: null
  modules: {}

# TLS for clients (STARTTLS/STLS, imaps/pop3s): the certificate mail clients see. This node's
# certificate works out of the box; for real clients use one for your mail host name, e.g. a
# public one (any CA). SIGHUP to "pigeon serve" reloads these files.
tls:
  cert: certs/node.crt
  key: certs/node.key
  # per host name a client asks for (SNI), when one address serves several names:
  # sni:
  #   mail.example.org: { cert: /etc/ssl/mail.example.org.crt, key: /etc/ssl/mail.example.org.key }
  #   "*.example.net": { cert: /etc/ssl/example.net.crt, key: /etc/ssl/example.net.key }
  sni: {}
  # the cluster CA: it issues node certificates (peer.cert) and is the only CA peer links trust
  ca: certs/ca.crt
  # the CA key is needed only where new node certificates are issued
  ca_key: certs/ca.key

# Local backends, started for a user after login: each backend's own section (backends/registry.ts).
${backendSections()}
# The MTA's sendmail command: the delivery modules forward and vacation re-inject mail through it.
sendmail: /usr/sbin/sendmail

# ClamAV's clamd, for the antivirus delivery module (antivirus.enabled; README "Antivirus").
clamd:
  # its unix socket (clamd.conf LocalSocket; Debian: /var/run/clamav/clamd.ctl) or HOST:PORT (TCPSocket)
  address: /var/run/clamav/clamd.ctl
  # a scan (connect, send, answer) must finish within this many seconds; else antivirus.on_error decides
  timeout_s: 30

log:
  # debug | info | warn | error
  level: info
  # append log lines to this file instead of stderr; relative to this directory
  file: null
  # without log.file, the one-session modes (inetd, Postfix spawn, stdio: stderr is the client's
  # socket there) log to syslog (facility mail, tag pigeon) through this socket ...
  syslog_socket: /dev/log
  # ... or, when it does not exist (no syslog daemon), append to this file, which then starts
  # with a line saying so; relative to this directory
  fallback_file: pigeon.log

# Runtime files of this node: the socket of the node state service ("anvil"), which holds the
# connection counts and failure penalties every process of the node shares (serve's workers,
# inetd and Postfix spawn processes). Relative to this directory; created mode 0700 by the
# first process that needs it. Processes running as other users share it only through its group.
run_dir: run

# Node-wide limits (all processes of this node together). A full limit is answered with one
# line (* BYE / -ERR) and the connection closes; see README "Connection limits".
limits:
  # delay before answering a failed login; doubles per failure from one address (IPv6: /48)
  auth_failure_delay_ms: 2000
  # ... up to this
  auth_failure_delay_max_ms: 15000
  # a client must log in within this many seconds of idling
  preauth_timeout_s: 60
  # longest pre-auth command line in bytes
  max_line: 8192
  # mbox delivery: longest wait for the mailbox locks (fcntl + dotlock), then 4.2.0 (retry)
  mda_lock_wait_s: 20
  # a TLS handshake (imaps/pop3s, STARTTLS/STLS) must finish within this many seconds
  tls_handshake_timeout_s: 15
  # clients in these networks (CIDR) are exempt from preauth_per_ip, e.g. [192.0.2.10/32, 2001:db8::/48]
  trusted_networks: []
  # the load balancers (CIDR) that may connect to a listener marked ",proxy"
  # (listen: ["imap=0.0.0.0:143,proxy"]) and name the client's address in a PROXY header
  trusted_proxies: []
  # ... which must arrive within this many seconds of the connection
  proxy_header_timeout_s: 3
  # connections not logged in yet, per client address (logged-in sessions never count);
  # when full, the oldest of that address is closed
  preauth_per_ip: 200
  # connections the proxy holds (not logged in yet, or relayed); sessions handed to
  # Dovecot/Courier count against them, not here. When full, the oldest not logged in is closed
  max_connections: 1000
  # logged-in sessions of one user from one address (Dovecot's mail_max_userip_connections)
  max_userip_connections: 10

# SASL mechanisms offered to IMAP/POP3 clients, in this order (node-wide: they are offered before
# the user is known; README "SASL mechanisms"). null: PLAIN, LOGIN, SCRAM-SHA-256, and OAUTHBEARER,
# XOAUTH2 when oauth.jwks_file is set. PLAIN, LOGIN and the OAuth two follow login.plaintext.
sasl:
  mechanisms: null

# OAUTHBEARER/XOAUTH2: bearer tokens are JWTs signed by a key of this JWKS file (the identity
# provider's public keys; relative to this directory), unexpired, from this issuer for this
# audience (null: not checked); the user is the username_claim claim, and must exist here.
oauth:
  jwks_file: null
  issuer: null
  audience: null
  username_claim: email
  # allowed clock difference for exp/nbf, seconds
  clock_skew_s: 60
`;
}

type CaFrom = { kind: 'ca'; ca: KeyPair } | { kind: 'issued'; caPem: string; host: KeyPair };

/**
 * What --ca-from DIR holds: another instance's CA (DIR/certs/ca.crt + ca.key, or DIR/ca.crt +
 * ca.key), or a `pigeon cert issue` output (DIR/ca.crt + node.crt + node.key), checked now so
 * that nothing is created for a certificate that cannot work.
 */
function readCaFrom(src: string, node: string): CaFrom {
  const certDir = existsSync(join(src, 'certs')) ? join(src, 'certs') : src;
  const f = (n: string): string => join(certDir, n);
  if (existsSync(f('ca.key'))) {
    try {
      return { kind: 'ca', ca: readKeyPair(f('ca.crt'), f('ca.key')) };
    } catch (e) {
      throw new AppError('CONFIG_MISSING', `--ca-from ${src}: cannot read ${f('ca.crt')} and ${f('ca.key')} (${(e as NodeJS.ErrnoException).code ?? 'error'})`);
    }
  }
  if (existsSync(f('node.crt')) || existsSync(f('node.key'))) {
    const files = { ca: f('ca.crt'), cert: f('node.crt'), key: f('node.key') };
    try {
      loadNodeCredentials(files, node);
    } catch (e) {
      const hint = `issue one for this node on the CA holder: pigeon cert issue ${node} --out DIR`;
      throw new AppError((e as AppError).code ?? 'CONFIG_INVALID', `--ca-from ${src}: ${(e as Error).message}; ${hint}`);
    }
    return { kind: 'issued', caPem: readFileSync(files.ca, 'utf8'), host: readKeyPair(files.cert, files.key) };
  }
  throw new AppError(
    'CONFIG_MISSING',
    `--ca-from ${src}: needs either certs/ca.crt + certs/ca.key (an instance holding the cluster CA: a certificate is issued here) or ca.crt + node.crt + node.key (written by "pigeon cert issue ${node} --out DIR" on the CA holder)`,
  );
}

/** Undo this run's registration in a shared database (a later step of init failed). */
async function unregister(dbUrl: string, opts: OpenOptions, r: { name: string; fingerprint: string }): Promise<void> {
  try {
    const store = await openStore(dbUrl, opts);
    try {
      await store.unregisterUnseen(r.name, r.fingerprint);
    } finally {
      await store.close();
    }
  } catch {
    /* the original error matters more */
  }
}

/** `dbPath`: the SQLite file, or the server database's URL without its password (for messages). */
export async function initInstance(o: InitOptions): Promise<{ dir: string; dbPath: string; dbUrl: string; created: string[] }> {
  const dir = resolve(o.dir);
  checkNodeName(o.node);
  o.listen.forEach((l) => {
    try {
      return parseListen(l);
    } catch (e) {
      throw new AppError('USAGE', `--listen: ${(e as Error).message}`);
    }
  });
  if (existsSync(join(dir, 'pigeon.yaml'))) {
    throw new AppError('INSTANCE_EXISTS', `${dir} already holds an instance (pigeon.yaml exists); refusing to overwrite it`);
  }
  if (existsSync(dir) && readdirSync(dir).length > 0) {
    throw new AppError('INSTANCE_EXISTS', `${dir} exists and is not empty; choose a new or empty directory`);
  }
  const dbUrl = o.db ?? 'sqlite:pigeon.db';
  let target: DbTarget;
  try {
    target = parseDbUrl(dbUrl);
  } catch (e) {
    throw new AppError('USAGE', `--db: ${(e as Error).message}`);
  }
  const dbPasswordFile = o.dbPasswordFile === undefined ? null : resolve(o.dbPasswordFile);
  if (dbPasswordFile !== null && target.kind !== 'postgres') throw new AppError('USAGE', '--db-password-file: only for a database server (--db postgres://…)');
  const openOpts: OpenOptions = { baseDir: dir, pg: { passwordFile: dbPasswordFile } };
  const dbFile = target.kind === 'sqlite' ? target.path : null;
  const dbPath = dbFile === null ? null : isAbsolute(dbFile) ? dbFile : join(dir, dbFile);
  const dbExisted = dbPath === null || existsSync(dbPath);
  if (dbPath !== null && dirname(dbPath) !== dir && !existsSync(dirname(dbPath))) {
    throw new AppError('CONFIG_MISSING', `--db ${dbUrl}: directory ${dirname(dbPath)} does not exist${isAbsolute(dbFile ?? '') ? '' : ` (a relative --db is relative to ${dir}; give a shared database as an absolute path)`}`);
  }
  const from = o.caFrom === undefined ? null : readCaFrom(resolve(o.caFrom), o.node);
  const dirExisted = existsSync(dir);
  const created: string[] = [];
  let registered: { name: string; fingerprint: string } | null = null;
  try {
    mkdirSync(join(dir, 'certs'), { recursive: true, mode: 0o750 });
    mkdirSync(join(dir, 'conf.d'), { recursive: true });
    mkdirSync(join(dir, 'mail'), { recursive: true, mode: 0o770 });
    // the mail user (Dovecot, deliveries) must traverse the instance directory and own the mail root
    chmodSync(dir, 0o755);
    chmodSync(join(dir, 'mail'), 0o770);
    const mu = resolveMailUser('mail');
    if (mu.switchTo) chownSync(join(dir, 'mail'), mu.uid, mu.gid);
    let host: KeyPair;
    let caPem: string;
    if (from?.kind === 'issued') {
      // a certificate from `pigeon cert issue`: this node's own, no CA key here
      caPem = from.caPem;
      host = from.host;
      writeFileSync(join(dir, 'certs', 'ca.crt'), caPem, { mode: 0o644, flag: 'wx' });
    } else {
      const ca = from?.ca ?? (await createCa(o.node, { ...(o.key !== undefined ? { key: o.key } : {}) }));
      caPem = ca.certPem;
      if (from) writeFileSync(join(dir, 'certs', 'ca.crt'), ca.certPem, { mode: 0o644, flag: 'wx' });
      else writeKeyPair(ca, join(dir, 'certs', 'ca.crt'), join(dir, 'certs', 'ca.key'));
      host = await issueHostCert(ca, o.node, LOOPBACK_NAMES, {}, o.key);
    }
    writeKeyPair(host, join(dir, 'certs', 'node.crt'), join(dir, 'certs', 'node.key'));
    const info = verifyHostCert(host.certPem, caPem, o.node);
    writeFileSync(join(dir, 'conf.d', 'README'), '# Drop-in files *.yaml here are merged over ../pigeon.yaml in lexical order.\n');
    const store = await openStore(dbUrl, { ...openOpts, create: true });
    try {
      const r = await store.registerSelf({ name: o.node, fingerprint: info.fingerprint, certExpires: info.notAfter.toISOString(), peerAddress: null }, { heartbeat: false });
      if (r.created) registered = { name: o.node, fingerprint: info.fingerprint };
    } finally {
      await store.close();
    }
    // a server URL may carry the database's password: only the owner reads the file then
    writeFileSync(join(dir, 'pigeon.yaml'), configText({ node: o.node, db: dbUrl, dbPasswordFile, listen: o.listen }), {
      flag: 'wx',
      mode: target.kind === 'postgres' ? 0o600 : 0o640,
    });
    created.push(join(dir, 'pigeon.yaml'));
  } catch (e) {
    // remove only what this run created. The mail root belongs to the mail user from its chown on:
    // root removes it only while it is still empty (rmdir), never recursively — whatever the mail
    // user put there in the meantime stays, and no link in it is ever followed by root
    const mailGone = removeEmptyDir(join(dir, 'mail'));
    // the rest is root's own: a directory this run made holds nothing else once the mail root is gone
    if (!dirExisted && mailGone) rmSync(dir, { recursive: true, force: true });
    else for (const p of ['certs', 'conf.d', 'pigeon.yaml']) rmSync(join(dir, p), { recursive: true, force: true });
    if (!dbExisted && dbPath !== null) for (const s of ['', '-wal', '-shm']) rmSync(dbPath + s, { force: true });
    else if (registered) await unregister(dbUrl, openOpts, registered);
    throw e;
  }
  return { dir, dbPath: dbPath ?? redactUrl(dbUrl), dbUrl, created };
}
