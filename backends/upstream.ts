/**
 * NAME        backends/upstream — a plain IMAP/POP3 proxy in front of another server
 * SYNOPSIS    pigeon config set --domain D imap.backend upstream   (and/or pop3.backend)
 *             pigeon config set --domain D upstream.host imap.legacy.example
 *             settings (per user, domain or global): upstream.host, upstream.port (0: the
 *             protocol's standard port for upstream.tls), upstream.tls (implicit | starttls |
 *             none), upstream.ca (PEM file of the CA that signed the server's certificate; empty:
 *             the system's CAs), upstream.login (local | passthrough | master),
 *             upstream.master_user; pigeon.yaml section (node-local):
 *               upstream: { master_password_file: FILE, allow_plaintext: false }
 * DESCRIPTION The mailbox lives on a server PigeonDeliver does not start (a legacy server being
 *             migrated, a server of another vendor): this backend connects to it, does TLS
 *             (implicit, or STARTTLS/STLS) verifying the server's certificate and name, logs in,
 *             then the relay (src/proxy/relay.ts) joins client and server. The router allocates
 *             no mailbox for it (`external`, backends/types.ts) and hands it, and no other
 *             backend, the client's credentials.
 *             Login: `local` (the user passed the local password check; the same user name and
 *             password bytes go to the server), `passthrough` (the login layer skipped the local
 *             check for the domain, auth/passthrough.ts: the server's answer decides), `master`
 *             (Dovecot's master-user form `user*MASTER` with the password of the node-local
 *             file). IMAP: AUTHENTICATE PLAIN (SASL-IR when offered), else LOGIN with literals;
 *             POP3: AUTH PLAIN, else USER/PASS. After login the client gets the server's own
 *             capabilities: IMAP `<tag> OK [CAPABILITY …] Logged in` (from the server's login
 *             answer, or asked with CAPABILITY and sent untagged first); POP3 `+OK Logged in.`.
 * DIAGNOSTICS The server refusing the credentials: AppError AUTH_FAILED (the login layer answers
 *             as for a wrong password, with the failure delay). Unreachable, a certificate that
 *             does not verify, a timeout, an answer we do not understand, a server that says it
 *             is unavailable: BACKEND_START / BACKEND_TIMEOUT / BACKEND_PROTOCOL naming
 *             `upstream HOST:PORT`; the client gets `NO [UNAVAILABLE]` / `-ERR [SYS/TEMP]`.
 * SECURITY    Credentials are sent only after TLS verified the server (or, with upstream.tls
 *             none, only to a loopback address unless pigeon.yaml upstream.allow_plaintext).
 *             Bytes the server sent ahead of its STARTTLS answer are refused (no injection into
 *             the TLS session). The password is never logged nor put in an error; it reaches the
 *             server only base64-encoded (SASL PLAIN) or as a literal / a POP3 PASS line, refused
 *             when it holds NUL (or CR/LF where a line carries it).
 */
import type { Socket } from 'node:net';
import { netModule } from '../src/builtins.js';
import type { TLSSocket } from 'node:tls';
import { createRequire } from 'node:module';
import { readFile } from 'node:fs/promises';
import { z } from 'zod';
import type { Backend, BackendEnd, BackendRequest, BackendSession } from './types.js';
import { backendError, pathSetting, sectionParser } from './types.js';
import type { SettingsDecl } from '../src/settings.js';
import { AppError } from '../src/errors.js';
import { isLoopback, unmapIp } from '../src/ip.js';
import { StreamLines } from '../src/lines.js';
import { BACKEND_START_MS, BACKEND_MAX_LINE, RELAY_GRACE_MS } from '../src/limits.js';

export const upstreamSettings = {
  module: 'upstream',
  summary: 'the upstream backend: the IMAP/POP3 server that holds the mailbox',
  keys: {
    host: { type: 'string', pattern: /^[A-Za-z0-9._:-]{0,253}$/, default: '', doc: 'host name or address of the server (imap.backend / pop3.backend = upstream)' },
    port: { type: 'integer', min: 0, max: 65535, default: 0, doc: "its port; 0: the protocol's standard port for upstream.tls (993/143, 995/110)" },
    tls: { type: 'enum', values: ['implicit', 'starttls', 'none'], default: 'implicit', doc: 'implicit TLS, STARTTLS/STLS, or none (loopback only unless pigeon.yaml upstream.allow_plaintext)' },
    ca: { type: 'string', pattern: /^(\/.*)?$/, default: '', doc: "PEM file of the CA that signed the server's certificate (absolute path); empty: the system's CAs" },
    login: { type: 'enum', values: ['local', 'passthrough', 'master'], default: 'local', doc: 'local: local password check, same credentials upstream; passthrough (domain or global): the server decides; master: user*master_user' },
    master_user: { type: 'string', pattern: /^[^\s*]{0,255}$/, default: '', doc: 'the master user of upstream.login = master (its password: pigeon.yaml upstream.master_password_file)' },
  },
} as const satisfies SettingsDecl;

const sectionSchema = z
  .strictObject({
    master_password_file: pathSetting.nullable().default(null),
    allow_plaintext: z.boolean().default(false),
  })
  .prefault({});
type Section = z.output<typeof sectionSchema>;

/** One user's upstream settings, checked. */
interface Target {
  readonly host: string;
  readonly port: number;
  readonly tls: 'implicit' | 'starttls' | 'none';
  readonly ca: string;
  readonly login: 'local' | 'passthrough' | 'master';
  readonly masterUser: string;
  /** `upstream HOST:PORT`, how every message names the server */
  readonly name: string;
}

function targetOf(req: BackendRequest): Target {
  const c = req.user.config;
  const str = (k: string): string => {
    const v = c[`upstream.${k}`]?.value;
    return typeof v === 'string' ? v : '';
  };
  const host = str('host');
  if (host === '') throw backendError('start-failed', `upstream.host is not set for ${req.address}`);
  const tls = str('tls') === 'starttls' ? 'starttls' : str('tls') === 'none' ? 'none' : 'implicit';
  const p = c['upstream.port']?.value;
  const std = req.protocol === 'imap' ? (tls === 'implicit' ? 993 : 143) : tls === 'implicit' ? 995 : 110;
  const port = typeof p === 'number' && p > 0 ? p : std;
  const login = str('login') === 'master' ? 'master' : str('login') === 'passthrough' ? 'passthrough' : 'local';
  const name = `upstream ${netModule().isIP(host) === 6 ? `[${host}]` : host}:${port}`;
  return { host, port, tls, ca: str('ca'), login, masterUser: str('master_user'), name };
}

/** A failure on the way to the server, naming it (the log line the admin reads). */
function fail(t: Target, kind: 'start-failed' | 'timeout' | 'protocol', detail: string): AppError {
  return backendError(kind, `${t.name}: ${detail}`);
}

/** The server's line-by-line dialogue until login; then the socket goes to the relay. */
class Dialogue {
  sock: Socket | TLSSocket;
  private reader: StreamLines;
  private readonly t: Target;
  private readonly deadline: number;

  constructor(t: Target, sock: Socket | TLSSocket, deadline: number) {
    this.t = t;
    this.sock = sock;
    this.deadline = deadline;
    this.reader = this.read();
  }

  private read(): StreamLines {
    return new StreamLines(this.sock, {
      max: BACKEND_MAX_LINE,
      timeoutMs: Math.max(1, this.deadline - Date.now()),
      fail: {
        tooLong: () => fail(this.t, 'protocol', 'overlong line from the server'),
        timeout: (ms) => fail(this.t, 'timeout', `no answer within ${Math.ceil(ms / 1000)}s`),
        closed: () => fail(this.t, 'start-failed', 'the server closed the connection during login'),
      },
    });
  }

  /** The next line, without its CRLF, as latin1 text (answers are ASCII). */
  async line(): Promise<string> {
    try {
      return (await this.reader.line()).line.toString('latin1');
    } catch (e) {
      // a socket error (ECONNRESET …) as it comes: name the server
      if (e instanceof AppError) throw e;
      throw fail(this.t, 'start-failed', `connection failed during login: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
    }
  }

  write(b: Buffer | string): void {
    this.sock.write(b);
  }

  /** After the server agreed to STARTTLS/STLS: TLS on the same connection, verified. */
  async upgrade(): Promise<void> {
    this.reader.close();
    // anything the server sent after its answer would be read as if it came over TLS
    if (this.sock.readableLength > 0) throw fail(this.t, 'protocol', 'the server sent data after its STARTTLS answer');
    this.sock = await secure(this.t, { socket: this.sock as Socket }, this.deadline);
    this.reader = this.read();
  }

  /** Login done: stop reading (bytes after the last line stay in the socket for the relay). */
  done(): Socket | TLSSocket {
    this.reader.close();
    return this.sock;
  }
}

async function caOf(t: Target): Promise<{ ca?: Buffer[] }> {
  if (t.ca === '') return {};
  try {
    return { ca: [await readFile(t.ca)] };
  } catch (e) {
    throw fail(t, 'start-failed', `cannot read upstream.ca ${t.ca}: ${(e as NodeJS.ErrnoException).code ?? 'error'}`);
  }
}

/** A TLS connection (new, or over `socket`) whose certificate verified for the host name. */
async function secure(t: Target, over: { socket?: Socket }, deadline: number): Promise<TLSSocket> {
  const ca = await caOf(t);
  // node:tls on the first upstream connection: every process that checks pigeon.yaml loads this
  // backend for its section, one `pigeon deliver` per message included (≈ 5 ms of CPU each)
  const { connect: tlsConnect } = createRequire(import.meta.url)('node:tls') as typeof import('node:tls');
  return new Promise<TLSSocket>((resolve, reject) => {
    const s = tlsConnect({
      ...over,
      ...(over.socket ? {} : { port: t.port }),
      host: t.host,
      ...(netModule().isIP(t.host) === 0 ? { servername: t.host } : {}),
      ...ca,
      rejectUnauthorized: true,
      minVersion: 'TLSv1.2',
    });
    const timer = setTimeout(() => {
      s.destroy();
      reject(fail(t, 'timeout', 'TLS handshake did not finish in time'));
    }, Math.max(1, deadline - Date.now()));
    s.once('secureConnect', () => {
      clearTimeout(timer);
      resolve(s);
    });
    s.once('error', (e: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      s.destroy();
      reject(fail(t, 'start-failed', `${over.socket ? 'TLS' : 'connect/TLS'} failed: ${e.code ?? ''}${e.code ? ' ' : ''}${e.message}`));
    });
  });
}

async function plain(t: Target, deadline: number): Promise<Socket> {
  return new Promise<Socket>((resolve, reject) => {
    const s = netModule().connect({ host: t.host, port: t.port });
    const timer = setTimeout(() => {
      s.destroy();
      reject(fail(t, 'timeout', 'connect did not finish in time'));
    }, Math.max(1, deadline - Date.now()));
    s.once('connect', () => {
      clearTimeout(timer);
      resolve(s);
    });
    s.once('error', (e: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      reject(fail(t, 'start-failed', `connect failed: ${e.code ?? e.message}`));
    });
  });
}

/** The user name and password to send, as bytes. */
async function credentialsOf(t: Target, req: BackendRequest, section: Section): Promise<{ user: Buffer; password: Buffer }> {
  if (t.login === 'master') {
    if (t.masterUser === '') throw fail(t, 'start-failed', 'upstream.login is master but upstream.master_user is not set');
    const file = section.master_password_file;
    if (file === null) throw fail(t, 'start-failed', 'upstream.login is master but pigeon.yaml has no upstream.master_password_file');
    let text: Buffer;
    try {
      text = await readFile(file);
    } catch (e) {
      throw fail(t, 'start-failed', `cannot read upstream.master_password_file ${file}: ${(e as NodeJS.ErrnoException).code ?? 'error'}`);
    }
    const nl = text.indexOf(0x0a);
    let password = nl < 0 ? text : text.subarray(0, nl);
    if (password.at(-1) === 0x0d) password = password.subarray(0, -1);
    if (password.length === 0) throw fail(t, 'start-failed', `upstream.master_password_file ${file} is empty`);
    return { user: Buffer.from(`${req.address}*${t.masterUser}`, 'utf8'), password };
  }
  const c = req.credentials;
  if (c === undefined) throw fail(t, 'start-failed', 'no password to log in with (the client used a mechanism that sends none)');
  return { user: Buffer.from(c.user), password: Buffer.from(c.password) };
}

/** SASL PLAIN (RFC 4616): refused (as bad credentials) when a part holds a NUL. */
function saslPlain(t: Target, user: Buffer, password: Buffer): string {
  if (user.includes(0) || password.includes(0)) throw refused(t, 'NUL in the credentials');
  return Buffer.concat([Buffer.from([0]), user, Buffer.from([0]), password]).toString('base64');
}

function refused(t: Target, why: string): AppError {
  return new AppError('AUTH_FAILED', `${t.name} refused the login: ${why}`);
}

/** The response code of an IMAP status text (`[CODE …] text`), upper-cased, or ''. */
function imapCode(text: string): string {
  const m = /^\[([^\]]*)\]/.exec(text);
  return m?.[1] ?? '';
}

/** Read IMAP lines up to `tag`'s status; untagged CAPABILITY lines are collected. */
async function imapTagged(d: Dialogue, t: Target, tag: string, caps: { list: string | null }): Promise<{ status: string; text: string } | { continuation: true }> {
  for (;;) {
    const l = await d.line();
    if (l.startsWith('+')) return { continuation: true };
    if (l.startsWith('* ')) {
      const m = /^\* CAPABILITY (.*)$/i.exec(l);
      if (m?.[1] !== undefined) caps.list = m[1];
      continue;
    }
    const m = /^(\S+) (OK|NO|BAD)(?: (.*))?$/i.exec(l);
    if (m && m[1] === tag) return { status: (m[2] ?? '').toUpperCase(), text: m[3] ?? '' };
    throw fail(t, 'protocol', `unexpected answer: ${l.slice(0, 100)}`);
  }
}

async function imapLogin(d: Dialogue, t: Target, req: BackendRequest, section: Section): Promise<Buffer> {
  const greeting = await d.line();
  if (/^\* BYE/i.test(greeting)) throw fail(t, 'start-failed', `the server said: ${greeting.slice(0, 100)}`);
  if (!/^\* (OK|PREAUTH)/i.test(greeting)) throw fail(t, 'protocol', `unexpected greeting: ${greeting.slice(0, 100)}`);
  if (/^\* PREAUTH/i.test(greeting)) throw fail(t, 'protocol', 'the server greets with PREAUTH (no login possible)');
  const caps: { list: string | null } = { list: null };
  const g = /^\* OK \[CAPABILITY ([^\]]*)\]/i.exec(greeting);
  if (g?.[1] !== undefined) caps.list = g[1];
  let n = 0;
  const next = (): string => `U${++n}`;
  const command = async (cmd: string): Promise<{ status: string; text: string }> => {
    const tag = next();
    d.write(`${tag} ${cmd}\r\n`);
    const r = await imapTagged(d, t, tag, caps);
    if ('continuation' in r) throw fail(t, 'protocol', `continuation request to ${cmd}`);
    return r;
  };
  if (t.tls === 'starttls') {
    const r = await command('STARTTLS');
    if (r.status !== 'OK') throw fail(t, 'start-failed', `STARTTLS refused: ${r.status} ${r.text.slice(0, 100)}`);
    await d.upgrade();
    caps.list = null; // capabilities change with TLS (RFC 3501 6.2.1)
  }
  if (caps.list === null) {
    const r = await command('CAPABILITY');
    if (r.status !== 'OK' || caps.list === null) throw fail(t, 'protocol', 'no answer to CAPABILITY');
  }
  const have = new Set((caps.list ?? '').toUpperCase().split(/\s+/));
  const { user, password } = await credentialsOf(t, req, section);
  const tag = next();
  caps.list = null;
  let r: { status: string; text: string } | { continuation: true };
  if (have.has('AUTH=PLAIN')) {
    const b64 = saslPlain(t, user, password);
    if (have.has('SASL-IR')) {
      d.write(`${tag} AUTHENTICATE PLAIN ${b64}\r\n`);
      r = await imapTagged(d, t, tag, caps);
    } else {
      d.write(`${tag} AUTHENTICATE PLAIN\r\n`);
      r = await imapTagged(d, t, tag, caps);
      if ('continuation' in r) {
        d.write(`${b64}\r\n`);
        r = await imapTagged(d, t, tag, caps);
      }
    }
  } else if (!have.has('LOGINDISABLED')) {
    if (user.includes(0) || password.includes(0)) throw refused(t, 'NUL in the credentials');
    d.write(`${tag} LOGIN {${user.length}}\r\n`);
    r = await imapTagged(d, t, tag, caps);
    if ('continuation' in r) {
      d.write(Buffer.concat([user, Buffer.from(` {${password.length}}\r\n`)]));
      r = await imapTagged(d, t, tag, caps);
      if ('continuation' in r) {
        d.write(Buffer.concat([password, Buffer.from('\r\n')]));
        r = await imapTagged(d, t, tag, caps);
      }
    }
  } else {
    throw fail(t, 'start-failed', 'the server offers neither AUTH=PLAIN nor LOGIN');
  }
  if ('continuation' in r) {
    d.write('*\r\n'); // cancel a SASL exchange that wants more than PLAIN gives
    throw fail(t, 'protocol', 'the server asked for more than SASL PLAIN gives');
  }
  if (r.status !== 'OK') {
    const code = imapCode(r.text).toUpperCase();
    // RFC 5530: the server cannot serve now, or is broken: not the user's fault
    if (r.status === 'BAD' || ['UNAVAILABLE', 'SERVERBUG', 'INUSE', 'LIMIT', 'CONTACTADMIN'].includes(code.split(' ')[0] ?? '')) {
      throw fail(t, 'start-failed', `login answered ${r.status} ${r.text.slice(0, 100)}`);
    }
    throw refused(t, `${r.status} ${r.text.slice(0, 100)}`);
  }
  const okCode = /^\[CAPABILITY ([^\]]*)\]/i.exec(r.text);
  const login = req.tag ?? '*';
  if (okCode?.[1] !== undefined) return Buffer.from(`${login} OK [CAPABILITY ${okCode[1]}] Logged in\r\n`, 'latin1');
  if (caps.list === null) {
    const c = await command('CAPABILITY');
    if (c.status !== 'OK' || caps.list === null) throw fail(t, 'protocol', 'no answer to CAPABILITY after login');
  }
  return Buffer.from(`* CAPABILITY ${caps.list}\r\n${login} OK Logged in\r\n`, 'latin1');
}

async function pop3Login(d: Dialogue, t: Target, req: BackendRequest, section: Section): Promise<Buffer> {
  const greeting = await d.line();
  if (!greeting.startsWith('+OK')) throw fail(t, 'start-failed', `the server greets with: ${greeting.slice(0, 100)}`);
  const ok = async (cmd: string | Buffer): Promise<string> => {
    d.write(cmd);
    return d.line();
  };
  if (t.tls === 'starttls') {
    const r = await ok('STLS\r\n');
    if (!r.startsWith('+OK')) throw fail(t, 'start-failed', `STLS refused: ${r.slice(0, 100)}`);
    await d.upgrade();
  }
  const capa = await ok('CAPA\r\n');
  const have = new Set<string>();
  if (capa.startsWith('+OK')) {
    for (let l = await d.line(); l !== '.'; l = await d.line()) {
      if (have.size >= MAX_CAPA_LINES) throw fail(t, 'protocol', `more than ${MAX_CAPA_LINES} CAPA lines`);
      have.add(l.toUpperCase());
    }
  }
  const { user, password } = await credentialsOf(t, req, section);
  let r: string;
  if ([...have].some((l) => /^SASL\b.*\bPLAIN\b/.test(l))) {
    r = await ok(`AUTH PLAIN ${saslPlain(t, user, password)}\r\n`);
  } else {
    if ([user, password].some((b) => b.includes(0) || b.includes(0x0d) || b.includes(0x0a))) throw refused(t, 'NUL, CR or LF in the credentials');
    r = await ok(Buffer.concat([Buffer.from('USER '), user, Buffer.from('\r\n')]));
    if (r.startsWith('+OK')) r = await ok(Buffer.concat([Buffer.from('PASS '), password, Buffer.from('\r\n')]));
  }
  if (r.startsWith('+OK')) return Buffer.from('+OK Logged in.\r\n');
  // RFC 2449/3206: SYS/*, IN-USE and LOGIN-DELAY are the server's state, not a wrong password
  if (/^-ERR \[(SYS\/|IN-USE|LOGIN-DELAY)/i.test(r) || !r.startsWith('-ERR')) throw fail(t, 'start-failed', `login answered ${r.slice(0, 100)}`);
  throw refused(t, r.slice(0, 100));
}

/** a POP3 server's CAPA answer longer than this is not a POP3 server's */
const MAX_CAPA_LINES = 100;

function socketSession(t: Target, sock: Socket | TLSSocket, greeting: Buffer): BackendSession {
  let clientGone = false;
  let lost: string | null = null;
  sock.on('error', (e) => {
    if (!clientGone) lost ??= `Connection to ${t.name} lost: ${e.message}`;
  });
  const ended = new Promise<BackendEnd>((resolve) => {
    const done = (): void => resolve({ exit: null, ...(lost !== null ? { lost } : {}) });
    if (sock.destroyed) done();
    else sock.once('close', done);
  });
  return {
    greeting,
    handedOff: false,
    input: sock,
    output: sock,
    ended,
    clientEnded() {
      clientGone = true;
      if (!sock.writableEnded) sock.end();
      setTimeout(() => sock.destroy(), RELAY_GRACE_MS).unref();
    },
    stop() {
      sock.destroy();
    },
  };
}

async function start(req: BackendRequest, section: Section): Promise<BackendSession> {
  const t = targetOf(req);
  const deadline = Date.now() + BACKEND_START_MS;
  const sock = t.tls === 'implicit' ? await secure(t, {}, deadline) : await plain(t, deadline);
  // errors reach the reader of each step (and the session's own listener); between two steps
  // (the STARTTLS upgrade) one must not crash the process
  sock.on('error', () => undefined);
  let d: Dialogue | null = null;
  try {
    if (t.tls === 'none' && !section.allow_plaintext && !isLoopback(unmapIp(sock.remoteAddress))) {
      throw fail(t, 'start-failed', `upstream.tls is none but ${unmapIp(sock.remoteAddress)} is not a loopback address (pigeon.yaml upstream.allow_plaintext allows it)`);
    }
    d = new Dialogue(t, sock, deadline);
    const greeting = await (req.protocol === 'imap' ? imapLogin : pop3Login)(d, t, req, section);
    return socketSession(t, d.done(), greeting);
  } catch (e) {
    // its timer must not keep a one-session process (inetd, stdio) alive
    d?.done().destroy();
    sock.destroy();
    throw e;
  }
}

export default {
  kind: 'backend',
  name: 'upstream',
  summary: 'another IMAP/POP3 server (plain proxy): TLS verified, login with the client credentials or a master user',
  serves: 'local',
  external: true,
  settings: upstreamSettings,
  section: {
    key: 'upstream',
    parse: sectionParser(sectionSchema),
    template: () => `# The upstream backend (imap.backend / pop3.backend = upstream: another IMAP/POP3 server).
upstream:
  # upstream.login = master: the master user's password is this file's first line (mode 0600)
  #master_password_file: /etc/pigeon/upstream-master.pass
  # upstream.tls = none is refused to servers not on loopback unless this is true
  allow_plaintext: false
`,
  },
  probe: null,
  create: (section) => ({
    acceptsHandoff: () => false,
    start: (req) => start(req, section),
  }),
} satisfies Backend<Section>;
