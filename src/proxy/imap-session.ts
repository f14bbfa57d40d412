/**
 * NAME        src/proxy/imap-session — IMAP4rev1 before authentication (RFC 3501/9051)
 * DESCRIPTION State not-authenticated: CAPABILITY, NOOP, LOGOUT, STARTTLS, LOGIN, AUTHENTICATE
 *             (PLAIN, LOGIN; SASL-IR; `*` cancels), ID (RFC 2971). The next command is read only
 *             when the current one has settled. After a successful login the backend answers the
 *             client's tag itself (`OK [CAPABILITY …] Logged in`) and the proxy only relays bytes.
 *             Phases for logs: banner → login → relay.
 * DIAGNOSTICS [AUTHENTICATIONFAILED] for wrong credentials, [UNAVAILABLE] for any outage (database,
 *             backend), [PRIVACYREQUIRED] for plaintext auth without TLS where not allowed.
 *             Limits (src/limits.ts): line/literal size, 3 bad commands, 3 failed logins,
 *             pre-auth idle and absolute timeouts — each ends with one `* BYE`.
 */
import type { ProxyEnv } from './env.js';
import { sessionId } from './env.js';
import type { ClientConn } from './conn.js';
import { ImapFramer, parseCommand, ParseError, argString, type Arg, type Frame, type Command } from './imap-framer.js';
import { checkLogin, logLogin, logDisconnect, plaintextAllowed, type LoginState } from './login.js';
import { route, runSession } from './router.js';
import { MAX_BAD_COMMANDS, MAX_AUTH_FAILURES, MAX_PREAUTH_COMMANDS, PREAUTH_ABSOLUTE_MS, SASL_MAX_LINE, ID_MAX_PAIRS, ID_MAX_FIELD, ID_MAX_VALUE } from '../limits.js';

const BASE_CAPS = 'IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL-';

export function quote(s: string): string {
  return `"${s.replace(/[\\"]/g, (c) => `\\${c}`)}"`;
}

export class ImapSession {
  private readonly framer: ImapFramer;
  private readonly st: LoginState;
  private bad = 0;
  private commands = 0;
  private idleTimer: NodeJS.Timeout | null = null;
  private readonly absTimer: NodeJS.Timeout;
  private timedOut = false;
  private readonly env: ProxyEnv;
  private readonly conn: ClientConn;

  constructor(env: ProxyEnv, conn: ClientConn) {
    this.env = env;
    this.conn = conn;
    this.framer = new ImapFramer(env.instance.config.limits.max_line);
    this.st = { proto: 'imap', sid: sessionId(), started: Date.now(), attempts: 0, lastUser: null, lastMethod: null };
    this.absTimer = setTimeout(() => this.timeout(), PREAUTH_ABSOLUTE_MS);
  }

  private timeout(): void {
    this.timedOut = true;
    this.conn.write('* BYE Disconnected for inactivity.\r\n');
    this.conn.abort();
  }

  capabilities(): string {
    let c = BASE_CAPS;
    if (!this.conn.secure && this.conn.canTls && this.env.tls) c += ' STARTTLS';
    c += plaintextAllowed(this.env, this.conn) ? ' AUTH=PLAIN AUTH=LOGIN' : ' LOGINDISABLED';
    return c;
  }

  private async nextFrame(): Promise<Frame | null> {
    for (;;) {
      const f = this.framer.next();
      if (f) return f;
      if (this.idleTimer) clearTimeout(this.idleTimer);
      this.idleTimer = setTimeout(() => this.timeout(), this.env.instance.config.limits.preauth_timeout_s * 1000);
      const chunk = await this.conn.read();
      if (this.idleTimer) clearTimeout(this.idleTimer);
      if (chunk === null || this.timedOut) return null;
      this.framer.feed(chunk);
    }
  }

  /** Run the session to its end (logout, disconnect, or the end of the relayed backend session). */
  async run(): Promise<void> {
    try {
      await this.loop();
    } finally {
      clearTimeout(this.absTimer);
      if (this.idleTimer) clearTimeout(this.idleTimer);
    }
  }

  private async loop(): Promise<void> {
    const { conn } = this;
    conn.write(`* OK [CAPABILITY ${this.capabilities()}] PigeonDeliver ready.\r\n`);
    for (;;) {
      const f = await this.nextFrame();
      if (f === null) {
        if (!this.timedOut) logDisconnect(this.env, conn, this.st, this.st.attempts > 0 ? 'auth failed' : 'no auth attempts');
        else logDisconnect(this.env, conn, this.st, this.st.attempts > 0 ? 'auth failed' : 'inactivity');
        conn.end();
        return;
      }
      if (f.kind === 'continue') {
        conn.write('+ OK\r\n');
        continue;
      }
      if (f.kind === 'error') {
        this.env.log.log('info', 'imap-login', `Disconnected (${f.text}):`, { rip: conn.peer.rip, lip: conn.peer.lip, session: this.st.sid });
        conn.end(`* BYE ${f.text}\r\n`);
        return;
      }
      if (++this.commands > MAX_PREAUTH_COMMANDS) {
        conn.end('* BYE Too many commands before login.\r\n');
        return;
      }
      let cmd: Command;
      try {
        cmd = parseCommand(f.parts);
      } catch (e) {
        const pe = e instanceof ParseError ? e : new ParseError('Invalid command', null);
        if (this.badCommand(pe.tag, `Error in IMAP command: ${pe.message}`)) return;
        continue;
      }
      const done = await this.dispatch(cmd);
      if (done) return;
    }
  }

  /** Answer BAD; true when the session is over (too many). */
  private badCommand(tag: string | null, text: string): boolean {
    this.bad++;
    if (this.bad >= MAX_BAD_COMMANDS) {
      this.conn.end(`${tag ?? '*'} BAD ${text}\r\n* BYE Too many invalid IMAP commands.\r\n`);
      logDisconnect(this.env, this.conn, this.st, 'too many invalid commands');
      return true;
    }
    this.conn.write(`${tag ?? '*'} BAD ${text}\r\n`);
    return false;
  }

  private async dispatch(cmd: Command): Promise<boolean> {
    const { conn, env } = this;
    const t = cmd.tag;
    switch (cmd.name) {
      case 'CAPABILITY':
        if (cmd.args.length) return this.badCommand(t, 'CAPABILITY takes no arguments.');
        conn.write(`* CAPABILITY ${this.capabilities()}\r\n${t} OK Pre-login capabilities listed, post-login capabilities have more.\r\n`);
        return false;
      case 'NOOP':
        conn.write(`${t} OK NOOP completed.\r\n`);
        return false;
      case 'LOGOUT':
        conn.end(`* BYE Logging out\r\n${t} OK Logout completed.\r\n`);
        logDisconnect(env, conn, this.st, this.st.attempts > 0 ? 'auth failed' : 'no auth attempts');
        return true;
      case 'ID':
        return this.id(cmd);
      case 'STARTTLS': {
        if (conn.secure) return this.badCommand(t, 'TLS is already active.');
        if (!conn.canTls || !env.tls) {
          conn.write(`${t} NO STARTTLS is not available on this connection.\r\n`);
          return false;
        }
        conn.write(`${t} OK Begin TLS negotiation now.\r\n`);
        this.framer.rest(); // commands pipelined after STARTTLS are discarded, never answered inside TLS
        try {
          await conn.startTls(env.tls);
        } catch (e) {
          env.log.log('info', 'imap-login', `Disconnected (TLS handshaking: ${(e as Error).message}):`, { rip: conn.peer.rip, lip: conn.peer.lip, session: this.st.sid });
          conn.end();
          return true;
        }
        return false;
      }
      case 'LOGIN': {
        if (cmd.args.length !== 2) return this.badCommand(t, 'LOGIN expects user and password.');
        const user = argString(cmd.args[0]);
        const pass = argString(cmd.args[1]);
        if (user === null || pass === null) return this.badCommand(t, 'LOGIN expects user and password.');
        if (!plaintextAllowed(env, conn)) {
          conn.write(`${t} NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.\r\n`);
          env.log.log('info', 'imap-login', 'Aborted login (tried to use disallowed plaintext auth):', { user, rip: conn.peer.rip, lip: conn.peer.lip, session: this.st.sid });
          return false;
        }
        return this.login(t, user, pass, 'PLAIN');
      }
      case 'AUTHENTICATE':
        return this.authenticate(cmd);
      case 'SELECT':
      case 'EXAMINE':
      case 'LIST':
      case 'LSUB':
      case 'STATUS':
      case 'FETCH':
      case 'APPEND':
      case 'CREATE':
      case 'DELETE':
      case 'ENABLE':
      case 'IDLE':
        return this.badCommand(t, 'Please log in first.');
      default:
        return this.badCommand(t, 'Unknown command.');
    }
  }

  private id(cmd: Command): boolean {
    const a = cmd.args[0];
    if (cmd.args.length !== 1 || !a || (a.type !== 'nil' && a.type !== 'list')) return this.badCommand(cmd.tag, 'ID expects a list or NIL.');
    if (a.type === 'list') {
      if (a.items.length % 2 !== 0 || a.items.length > ID_MAX_PAIRS * 2) return this.badCommand(cmd.tag, 'Invalid ID parameters.');
      for (let i = 0; i < a.items.length; i += 2) {
        const k = argString(a.items[i]);
        const v: Arg | undefined = a.items[i + 1];
        if (k === null || k.length > ID_MAX_FIELD || (v && v.type !== 'nil' && (argString(v)?.length ?? ID_MAX_VALUE + 1) > ID_MAX_VALUE)) {
          return this.badCommand(cmd.tag, 'Invalid ID parameters.');
        }
      }
    }
    this.conn.write(`* ID ("name" "PigeonDeliver")\r\n${cmd.tag} OK ID completed.\r\n`);
    return false;
  }

  /** Read one SASL response line; null when cancelled (`*`) or the client went away. */
  private async saslLine(): Promise<Buffer | 'cancel' | 'bad' | null> {
    const f = await this.nextFrame();
    if (!f) return null;
    if (f.kind !== 'command' || f.parts.length !== 1) return 'bad';
    const line = f.parts[0] ?? Buffer.alloc(0);
    if (line.length > SASL_MAX_LINE) return 'bad';
    const s = line.toString('latin1').trim();
    if (s === '*') return 'cancel';
    if (!/^[A-Za-z0-9+/]*={0,2}$/.test(s)) return 'bad';
    return Buffer.from(s, 'base64');
  }

  private async authenticate(cmd: Command): Promise<boolean> {
    const { conn, env } = this;
    const t = cmd.tag;
    const mech = argString(cmd.args[0])?.toUpperCase();
    if (!mech || cmd.args.length > 2) return this.badCommand(t, 'AUTHENTICATE expects a mechanism.');
    if (mech !== 'PLAIN' && mech !== 'LOGIN') {
      conn.write(`${t} NO Unsupported authentication mechanism.\r\n`);
      return false;
    }
    if (!plaintextAllowed(env, conn)) {
      conn.write(`${t} NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.\r\n`);
      return false;
    }
    const irRaw = argString(cmd.args[1]);
    const decode = (s: string): Buffer | null => (s === '=' ? Buffer.alloc(0) : /^[A-Za-z0-9+/]+={0,2}$/.test(s) ? Buffer.from(s, 'base64') : null);
    const ask = async (prompt: string): Promise<Buffer | 'cancel' | 'bad' | null> => {
      conn.write(`+ ${prompt}\r\n`);
      return this.saslLine();
    };
    let user: string;
    let pass: string;
    if (mech === 'PLAIN') {
      let resp: Buffer | 'cancel' | 'bad' | null;
      if (irRaw !== null) resp = decode(irRaw) ?? 'bad';
      else resp = await ask('');
      if (resp === null) return true;
      if (resp === 'cancel') {
        conn.write(`${t} BAD Authentication aborted by client.\r\n`);
        return false;
      }
      if (resp === 'bad') return this.badCommand(t, 'Invalid base64 data in continued response.');
      const parts = resp.toString('utf8').split('\0');
      if (parts.length !== 3 || (parts[0] !== '' && parts[0] !== parts[1])) {
        conn.write(`${t} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n`);
        return this.afterFailure();
      }
      user = parts[1] ?? '';
      pass = parts[2] ?? '';
    } else {
      let u: Buffer | 'cancel' | 'bad' | null = irRaw !== null ? (decode(irRaw) ?? 'bad') : await ask('VXNlcm5hbWU6');
      if (u === null) return true;
      if (u === 'cancel' || u === 'bad') {
        if (u === 'bad') return this.badCommand(t, 'Invalid base64 data in continued response.');
        conn.write(`${t} BAD Authentication aborted by client.\r\n`);
        return false;
      }
      const p = await ask('UGFzc3dvcmQ6');
      if (p === null) return true;
      if (p === 'cancel' || p === 'bad') {
        if (p === 'bad') return this.badCommand(t, 'Invalid base64 data in continued response.');
        conn.write(`${t} BAD Authentication aborted by client.\r\n`);
        return false;
      }
      user = u.toString('utf8');
      pass = p.toString('utf8');
    }
    return this.login(t, user, pass, mech);
  }

  private afterFailure(): boolean {
    if (this.st.attempts >= MAX_AUTH_FAILURES) {
      this.conn.end('* BYE Too many invalid authentication attempts.\r\n');
      logDisconnect(this.env, this.conn, this.st, 'auth failed');
      return true;
    }
    return false;
  }

  private async login(tag: string, user: string, pass: string, method: string): Promise<boolean> {
    const { conn, env } = this;
    if (/[\r\n\0]/.test(user) || user.length === 0 || user.length > 256) {
      this.st.attempts++;
      this.st.lastOutcome = 'failed';
      conn.write(`${tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n`);
      return this.afterFailure();
    }
    const r = await checkLogin(env, conn, this.st, user, pass, method);
    if (r.kind === 'tempfail') {
      conn.write(`${tag} NO [UNAVAILABLE] Temporary authentication failure.\r\n`);
      return false;
    }
    if (r.kind === 'failed') {
      conn.write(`${tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n`);
      return this.afterFailure();
    }
    const address = r.user.user.address;
    const rt = await route(env, 'imap', r.user, conn, this.st.sid, tag, () => this.framer.rest());
    if (!rt.ok && rt.reply !== undefined) {
      conn.write(rt.reply); // a limit (user+IP): the router logged it
      return false;
    }
    if (!rt.ok) {
      this.st.lastOutcome = 'backend';
      env.log.log('error', `imap(${address})`, `Backend failure: ${rt.reason}:`, { rip: conn.peer.rip, session: this.st.sid });
      conn.write(`${tag} NO [UNAVAILABLE] Internal error occurred. Refer to server log for more information.\r\n`);
      return false;
    }
    logLogin(env, conn, this.st, address);
    clearTimeout(this.absTimer);
    const leftover = this.framer.rest();
    await runSession(env, 'imap', address, this.st.sid, conn, rt.session, leftover);
    return true;
  }
}
