/**
 * NAME        src/proxy/pop3-session — POP3 before authentication (RFC 1939, 2449, 2595, 5034, 3206)
 * DESCRIPTION AUTHORIZATION state: CAPA, STLS, USER/PASS, AUTH PLAIN/LOGIN (initial response, `*`
 *             cancels), QUIT. After login the backend is started, greeted with NOOP, and the client
 *             gets `+OK Logged in.`; then bytes are relayed (TRANSACTION/UPDATE are the backend's).
 * DIAGNOSTICS -ERR [AUTH] for credentials and privacy refusals, -ERR [SYS/TEMP] for outages.
 *             Lines over 255 bytes (8 KiB for SASL responses), 3 bad commands, 3 failed logins,
 *             or the pre-auth timeout end the session with one -ERR.
 */
import type { ProxyEnv } from './env.js';
import { sessionId } from './env.js';
import type { ClientConn } from './conn.js';
import { checkLogin, logLogin, logDisconnect, plaintextAllowed, type LoginState } from './login.js';
import { route, runSession } from './router.js';
import { MAX_BAD_COMMANDS, MAX_AUTH_FAILURES, MAX_PREAUTH_COMMANDS, POP3_MAX_LINE, PREAUTH_ABSOLUTE_MS, SASL_MAX_LINE } from '../limits.js';

export class Pop3Session {
  private buf: Buffer = Buffer.alloc(0);
  private readonly st: LoginState;
  private bad = 0;
  private commands = 0;
  private user: string | null = null;
  private timedOut = false;
  private idleTimer: NodeJS.Timeout | null = null;
  private readonly absTimer: NodeJS.Timeout;
  private readonly env: ProxyEnv;
  private readonly conn: ClientConn;

  constructor(env: ProxyEnv, conn: ClientConn) {
    this.env = env;
    this.conn = conn;
    this.st = { proto: 'pop3', sid: sessionId(), started: Date.now(), attempts: 0, lastUser: null, lastMethod: null };
    this.absTimer = setTimeout(() => this.timeout(), PREAUTH_ABSOLUTE_MS);
  }

  private timeout(): void {
    this.timedOut = true;
    this.conn.write('-ERR Disconnected for inactivity.\r\n');
    this.conn.abort();
  }

  /** Next line (without CRLF), 'too-long', or null at EOF. */
  private async line(max: number): Promise<string | 'too-long' | null> {
    for (;;) {
      const nl = this.buf.indexOf(0x0a);
      if (nl >= 0) {
        let l = this.buf.subarray(0, nl);
        this.buf = this.buf.subarray(nl + 1);
        if (l.length && l[l.length - 1] === 0x0d) l = l.subarray(0, l.length - 1);
        if (l.length > max) return 'too-long';
        return l.toString('utf8');
      }
      if (this.buf.length > max + 2) return 'too-long';
      if (this.idleTimer) clearTimeout(this.idleTimer);
      this.idleTimer = setTimeout(() => this.timeout(), this.env.instance.config.limits.preauth_timeout_s * 1000);
      const c = await this.conn.read();
      if (this.idleTimer) clearTimeout(this.idleTimer);
      if (c === null || this.timedOut) return null;
      this.buf = this.buf.length ? Buffer.concat([this.buf, c]) : c;
    }
  }

  private caps(): string {
    const allowed = plaintextAllowed(this.env, this.conn);
    const lines = ['CAPA', 'TOP', 'UIDL', 'RESP-CODES', 'PIPELINING', 'AUTH-RESP-CODE'];
    if (!this.conn.secure && this.conn.canTls && this.env.tls) lines.push('STLS');
    if (allowed) lines.push('USER', 'SASL PLAIN LOGIN');
    return `+OK\r\n${lines.join('\r\n')}\r\n.\r\n`;
  }

  async run(): Promise<void> {
    try {
      await this.loop();
    } finally {
      clearTimeout(this.absTimer);
      if (this.idleTimer) clearTimeout(this.idleTimer);
    }
  }

  private bye(text: string, why: string): void {
    this.conn.end(`-ERR ${text}\r\n`);
    logDisconnect(this.env, this.conn, this.st, why);
  }

  private async loop(): Promise<void> {
    const { conn, env } = this;
    conn.write('+OK PigeonDeliver ready.\r\n');
    for (;;) {
      const l = await this.line(POP3_MAX_LINE);
      if (l === null) {
        logDisconnect(env, conn, this.st, this.st.attempts > 0 ? 'auth failed' : this.timedOut ? 'inactivity' : 'no auth attempts');
        conn.end();
        return;
      }
      if (l === 'too-long') return this.bye('Line too long.', 'line too long');
      if (++this.commands > MAX_PREAUTH_COMMANDS) return this.bye('Too many commands before login.', 'too many commands');
      const sp = l.indexOf(' ');
      const verb = (sp < 0 ? l : l.slice(0, sp)).toUpperCase();
      const arg = sp < 0 ? '' : l.slice(sp + 1);
      if (l.includes('\0')) {
        if (this.badCommand('NUL byte in command.')) return;
        continue;
      }
      switch (verb) {
        case 'CAPA':
          conn.write(this.caps());
          break;
        case 'NOOP':
          conn.write('+OK\r\n');
          break;
        case 'QUIT':
          conn.end('+OK Logging out.\r\n');
          logDisconnect(env, conn, this.st, this.st.attempts > 0 ? 'auth failed' : 'no auth attempts');
          return;
        case 'STLS':
          if (conn.secure) {
            conn.write('-ERR TLS is already active.\r\n');
            break;
          }
          if (!conn.canTls || !env.tls) {
            conn.write('-ERR STLS is not available on this connection.\r\n');
            break;
          }
          conn.write('+OK Begin TLS negotiation now.\r\n');
          this.buf = Buffer.alloc(0); // pipelined commands after STLS are discarded
          try {
            await conn.startTls(env.tls);
          } catch (e) {
            env.log.log('info', 'pop3-login', `Disconnected (TLS handshaking: ${(e as Error).message}):`, { rip: conn.peer.rip, session: this.st.sid });
            conn.end();
            return;
          }
          break;
        case 'USER':
          if (!plaintextAllowed(env, conn)) {
            conn.write('-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.\r\n');
            break;
          }
          if (arg === '') {
            if (this.badCommand('USER expects a user name.')) return;
            break;
          }
          this.user = arg;
          conn.write('+OK\r\n');
          break;
        case 'PASS': {
          if (this.user === null) {
            conn.write('-ERR No username given.\r\n');
            break;
          }
          const u = this.user;
          this.user = null;
          if (await this.login(u, arg, 'PLAIN')) return;
          break;
        }
        case 'AUTH':
          if (await this.auth(arg)) return;
          break;
        default:
          if (this.badCommand('Unknown command.')) return;
      }
    }
  }

  private badCommand(text: string): boolean {
    this.bad++;
    if (this.bad >= MAX_BAD_COMMANDS) {
      this.bye(`${text} Too many bad commands.`, 'too many invalid commands');
      return true;
    }
    this.conn.write(`-ERR ${text}\r\n`);
    return false;
  }

  private async auth(arg: string): Promise<boolean> {
    const { conn, env } = this;
    const [mechRaw, ir] = arg.split(' ');
    const mech = (mechRaw ?? '').toUpperCase();
    if (mech === '') {
      conn.write('+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n');
      return false;
    }
    if (mech !== 'PLAIN' && mech !== 'LOGIN') {
      conn.write('-ERR Unsupported authentication mechanism.\r\n');
      return false;
    }
    if (!plaintextAllowed(env, conn)) {
      conn.write('-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.\r\n');
      return false;
    }
    const decode = (s: string): Buffer | null => (s === '=' ? Buffer.alloc(0) : /^[A-Za-z0-9+/]+={0,2}$/.test(s) ? Buffer.from(s, 'base64') : null);
    const ask = async (prompt: string): Promise<Buffer | 'cancel' | 'bad' | null> => {
      conn.write(`+ ${prompt}\r\n`);
      const l = await this.line(SASL_MAX_LINE);
      if (l === null) return null;
      if (l === 'too-long') return 'bad';
      if (l.trim() === '*') return 'cancel';
      return decode(l.trim()) ?? 'bad';
    };
    const handle = (r: Buffer | 'cancel' | 'bad' | null): Buffer | boolean => {
      if (r === null) return true;
      if (r === 'cancel') {
        conn.write('-ERR Authentication aborted by client.\r\n');
        return false;
      }
      if (r === 'bad') return this.badCommand('Invalid base64 data.');
      return r;
    };
    if (mech === 'PLAIN') {
      const r = handle(ir !== undefined ? (decode(ir) ?? 'bad') : await ask(''));
      if (typeof r === 'boolean') return r;
      const parts = r.toString('utf8').split('\0');
      if (parts.length !== 3 || (parts[0] !== '' && parts[0] !== parts[1])) {
        this.st.attempts++;
        this.st.lastOutcome = 'failed';
        conn.write('-ERR [AUTH] Authentication failed.\r\n');
        return this.afterFailure();
      }
      return this.login(parts[1] ?? '', parts[2] ?? '', 'PLAIN');
    }
    const u = handle(ir !== undefined ? (decode(ir) ?? 'bad') : await ask('VXNlcm5hbWU6'));
    if (typeof u === 'boolean') return u;
    const p = handle(await ask('UGFzc3dvcmQ6'));
    if (typeof p === 'boolean') return p;
    return this.login(u.toString('utf8'), p.toString('utf8'), 'LOGIN');
  }

  private afterFailure(): boolean {
    if (this.st.attempts >= MAX_AUTH_FAILURES) {
      this.bye('[AUTH] Too many invalid authentication attempts.', 'auth failed');
      return true;
    }
    return false;
  }

  private async login(user: string, pass: string, method: string): Promise<boolean> {
    const { conn, env } = this;
    if (/[\r\n\0]/.test(user) || user.length === 0 || user.length > 256) {
      this.st.attempts++;
      this.st.lastOutcome = 'failed';
      conn.write('-ERR [AUTH] Authentication failed.\r\n');
      return this.afterFailure();
    }
    const r = await checkLogin(env, conn, this.st, user, pass, method);
    if (r.kind === 'tempfail') {
      conn.write('-ERR [SYS/TEMP] Temporary authentication failure.\r\n');
      return false;
    }
    if (r.kind === 'failed') {
      conn.write('-ERR [AUTH] Authentication failed.\r\n');
      return this.afterFailure();
    }
    const address = r.user.user.address;
    const rt = await route(env, 'pop3', r.user, conn, this.st.sid, null, () => {
      const b = this.buf;
      this.buf = Buffer.alloc(0);
      return b;
    });
    if (!rt.ok && rt.reply !== undefined) {
      conn.write(rt.reply); // a limit (user+IP): the router logged it
      return false;
    }
    if (!rt.ok) {
      this.st.lastOutcome = 'backend';
      env.log.log('error', `pop3(${address})`, `Backend failure: ${rt.reason}:`, { rip: conn.peer.rip, session: this.st.sid });
      conn.write('-ERR [SYS/TEMP] Internal error occurred. Refer to server log for more information.\r\n');
      return false;
    }
    logLogin(env, conn, this.st, address);
    clearTimeout(this.absTimer);
    const leftover = this.buf;
    this.buf = Buffer.alloc(0);
    await runSession(env, 'pop3', address, this.st.sid, conn, rt.session, leftover);
    return true;
  }
}
