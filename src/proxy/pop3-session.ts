/**
 * NAME        src/proxy/pop3-session — POP3 before authentication (RFC 1939, 2449, 2595, 5034, 3206)
 * DESCRIPTION AUTHORIZATION state: CAPA, STLS, USER/PASS, AUTH with the node's SASL mechanisms
 *             (src/proxy/sasl/; initial response, `*` cancels), QUIT. After login the backend is started, greeted with NOOP, and the client
 *             gets `+OK Logged in.`; then bytes are relayed (TRANSACTION/UPDATE are the backend's).
 *             Lines are bytes: user names must be valid UTF-8, passwords go to the hash as sent.
 *             STLS forgets everything said before it (a USER, pipelined input).
 * DIAGNOSTICS -ERR [AUTH] for credentials (every refusal after the failure delay) and privacy
 *             refusals, -ERR [SYS/TEMP] for outages. Lines over 255 octets with their CRLF
 *             (8 KiB for SASL responses), 3 bad commands, 3 failed logins, or the pre-auth timeout
 *             end the session with one -ERR. Every other error is answered and the session reads on.
 */
import type { ProxyEnv } from './env.js';
import { sessionId } from './env.js';
import type { ClientConn } from './conn.js';
import { loginAndRelay, PreauthReader, logDisconnect, logPlaintextRefused, plaintextAllowed, saslBase64, type Credentials, type LoginState, type SaslTails } from './login.js';
import { mechanismsFor, offeredMechanism, startMechanism } from './sasl/registry.js';
import type { Ended } from './sasl/types.js';
import { alpnCallback, handshakeTimeoutMs } from './tls.js';
import { Pop3Framer, type Pop3Frame } from './pop3-framer.js';
import { MAX_BAD_COMMANDS, MAX_AUTH_FAILURES, MAX_PREAUTH_COMMANDS, POP3_MAX_LINE, SASL_MAX_LINE } from '../limits.js';

const PRIVACY = '-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.\r\n';
type Line = Pop3Frame | { readonly kind: 'eof' };

export class Pop3Session {
  private readonly framer = new Pop3Framer();
  private readonly st: LoginState;
  private bad = 0;
  private commands = 0;
  /** the USER given before PASS (bytes as sent); forgotten at STLS */
  private user: Buffer | null = null;
  private relayed = false;
  private readonly reader: PreauthReader;
  private readonly env: ProxyEnv;
  private readonly conn: ClientConn;

  constructor(env: ProxyEnv, conn: ClientConn) {
    this.env = env;
    this.conn = conn;
    this.st = { proto: 'pop3', sid: sessionId(), started: Date.now(), attempts: 0, lastUser: null, lastMethod: null };
    this.reader = new PreauthReader(env, conn, '-ERR Disconnected for inactivity.\r\n');
  }

  /** Next line (without its CRLF); `max` counts the whole line, CRLF included. */
  private async line(max: number): Promise<Line> {
    for (;;) {
      const f = this.framer.next(max);
      if (f !== null) return f;
      const c = await this.reader.read();
      if (c === null) return { kind: 'eof' };
      this.framer.feed(c);
    }
  }

  private caps(): string {
    const allowed = plaintextAllowed(this.env, this.conn);
    const lines = ['CAPA', 'TOP', 'UIDL', 'RESP-CODES', 'PIPELINING', 'AUTH-RESP-CODE'];
    if (!this.conn.secure && this.conn.canTls && this.env.tls) lines.push('STLS');
    if (allowed) lines.push('USER');
    const sasl = this.usableMechanisms();
    if (sasl.length > 0) lines.push(`SASL ${sasl.join(' ')}`);
    return `+OK\r\n${lines.join('\r\n')}\r\n.\r\n`;
  }

  private usableMechanisms(): string[] {
    return mechanismsFor(this.env, this.conn)
      .filter((m) => m.usable)
      .map((m) => m.mechanism.name);
  }

  async run(): Promise<void> {
    // every way out of the pre-auth loop closes the connection (a relayed one is the relay's)
    await this.reader.run(() => this.loop(), () => this.relayed);
  }

  private bye(text: string, why: string): void {
    this.conn.end(`-ERR ${text}\r\n`);
    logDisconnect(this.env, this.conn, this.st, why);
  }

  /** The client went away (or timed out): log why, close. */
  private gone(): void {
    this.reader.gone(this.st);
  }

  private async loop(): Promise<void> {
    const { conn, env } = this;
    conn.write('+OK PigeonDeliver ready.\r\n');
    for (;;) {
      const r = await this.line(POP3_MAX_LINE);
      if (r.kind === 'eof') return this.gone();
      if (r.kind === 'too-long') return this.bye('Line too long.', 'line too long');
      if (++this.commands > MAX_PREAUTH_COMMANDS) return this.bye('Too many commands before login.', 'too many commands');
      const l = r.line;
      if (l.includes(0)) {
        if (this.badCommand('NUL byte in command.')) return;
        continue;
      }
      const sp = l.indexOf(0x20);
      const verb = (sp < 0 ? l : l.subarray(0, sp)).toString('latin1').toUpperCase();
      const arg = sp < 0 ? Buffer.alloc(0) : l.subarray(sp + 1);
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
          // nothing said before the handshake counts inside TLS: pipelined commands, a USER
          this.framer.rest();
          this.user = null;
          try {
            await conn.startTls(env.tls, { timeoutMs: handshakeTimeoutMs(env.instance), alpn: alpnCallback('pop3') });
          } catch (e) {
            env.log.log('info', 'pop3-login', `Disconnected (TLS handshaking: ${(e as Error).message}):`, { rip: conn.peer.rip, session: this.st.sid });
            return;
          }
          break;
        case 'USER':
          if (!plaintextAllowed(env, conn)) {
            conn.write(PRIVACY);
            logPlaintextRefused(env, conn, this.st);
            break;
          }
          if (arg.length === 0) {
            if (this.badCommand('USER expects a user name.')) return;
            break;
          }
          this.user = Buffer.from(arg);
          conn.write('+OK\r\n');
          break;
        case 'PASS': {
          if (this.user === null) {
            conn.write('-ERR No username given.\r\n');
            break;
          }
          const user = this.user;
          this.user = null;
          if (await this.login({ kind: 'password', user, password: arg }, 'PLAIN')) return;
          break;
        }
        case 'AUTH':
          if (await this.auth(arg.toString('latin1'))) return;
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

  /**
   * One SASL step: the initial response when given, else a `+ prompt` and the client's line.
   * Returns the data, or true (session over) / false (command answered) when the step ended it.
   */
  private async step(initial: string | undefined, prompt: string): Promise<Buffer | boolean> {
    let data: Buffer | null;
    if (initial !== undefined) data = saslBase64(initial);
    else {
      this.conn.write(`+ ${prompt}\r\n`);
      const r = await this.line(SASL_MAX_LINE);
      if (r.kind === 'eof') {
        this.gone();
        return true;
      }
      if (r.kind === 'too-long') {
        this.bye('Line too long.', 'line too long');
        return true;
      }
      const s = r.line.toString('latin1').trim();
      if (s === '*') {
        this.conn.write('-ERR Authentication aborted by client.\r\n');
        return false;
      }
      data = s === '' ? Buffer.alloc(0) : saslBase64(s);
    }
    if (data === null) return this.badCommand('Invalid base64 data.');
    return data;
  }

  private async auth(arg: string): Promise<boolean> {
    const { conn, env } = this;
    const [mechRaw, ir, extra] = arg.split(' ');
    const mech = (mechRaw ?? '').toUpperCase();
    if (mech === '') {
      conn.write(`+OK\r\n${this.usableMechanisms().map((m) => `${m}\r\n`).join('')}.\r\n`);
      return false;
    }
    const offered = offeredMechanism(env, conn, mech);
    if (offered === null) {
      conn.write('-ERR Unsupported authentication mechanism.\r\n');
      return false;
    }
    if (extra !== undefined) return this.badCommand('AUTH expects a mechanism and at most an initial response.');
    if (!offered.usable) {
      conn.write(PRIVACY);
      logPlaintextRefused(env, conn, this.st);
      return false;
    }
    const x = await startMechanism(offered.mechanism, env, ir ?? null, (initial, challenge) => this.step(initial ?? undefined, challenge.toString('base64')));
    return 'ended' in x ? x.ended : this.login(x.creds, offered.mechanism.name, x.tails, x.over);
  }

  private afterFailure(): boolean {
    if (this.st.attempts >= MAX_AUTH_FAILURES) {
      this.bye('[AUTH] Too many invalid authentication attempts.', 'auth failed');
      return true;
    }
    return false;
  }

  /** `sasl`/`over`: a SASL mechanism's last rounds, and whether the client ended the command inside them. */
  private async login(creds: Credentials, method: string, sasl: SaslTails = {}, over: () => Ended | null = () => null): Promise<boolean> {
    const r = await loginAndRelay(this.env, this.conn, this.st, creds, method, {
      tag: null,
      sasl,
      leftover: () => this.framer.rest(),
      replies: {
        tempfail: '-ERR [SYS/TEMP] Temporary authentication failure.\r\n',
        failed: '-ERR [AUTH] Authentication failed.\r\n',
        limit: (reason) => `-ERR [IN-USE] ${reason}\r\n`,
        unavailable: '-ERR [SYS/TEMP] Internal error occurred. Refer to server log for more information.\r\n',
      },
      relaying: () => {
        this.reader.stop();
        this.relayed = true;
      },
    });
    if (over() === true) return true;
    return r === 'failed' ? this.afterFailure() : r === 'relayed';
  }
}
