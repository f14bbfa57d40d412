/**
 * NAME        src/proxy/imap-session — IMAP4rev1 before authentication (RFC 3501/9051)
 * DESCRIPTION State not-authenticated: CAPABILITY, NOOP, LOGOUT, STARTTLS, LOGIN, AUTHENTICATE
 *             (the node's SASL mechanisms, src/proxy/sasl/; SASL-IR; `*` cancels), ID (RFC
 *             2971), ENABLE (answered and ignored, as Dovecot does). The next command is read only when the current one has settled.
 *             A synchronising literal is invited (`+ OK`) only for a command that takes one
 *             before login (LOGIN, ID); any other gets its tagged answer instead. After a
 *             successful login the backend answers the client's tag itself (`OK [CAPABILITY …]
 *             Logged in`) and the proxy only relays bytes. STARTTLS discards everything the client
 *             sent before the handshake. Phases for logs: banner → login → relay.
 * DIAGNOSTICS [AUTHENTICATIONFAILED] for every refused authentication (after the failure delay),
 *             [UNAVAILABLE] for any outage (database, backend), [PRIVACYREQUIRED] for plaintext
 *             auth without TLS where not allowed. Limits (src/limits.ts): command and SASL line
 *             size, literal size, `(` nesting, 3 bad commands, 3 failed logins, pre-auth idle and
 *             absolute timeouts — each ends with one `* BYE`. Every other error is answered and
 *             the session reads on.
 */
import type { ProxyEnv } from './env.js';
import { sessionId } from './env.js';
import type { ClientConn } from './conn.js';
import { ImapFramer, parseCommand, ParseError, argBytes, argAscii, peekCommand, type Arg, type Frame, type Command } from './imap-framer.js';
import { loginAndRelay, PreauthReader, logDisconnect, logPlaintextRefused, plaintextAllowed, saslBase64, type Credentials, type LoginState, type SaslTails } from './login.js';
import { mechanismsFor, offeredMechanism, startMechanism } from './sasl/registry.js';
import type { Ended } from './sasl/types.js';
import { alpnCallback, handshakeTimeoutMs } from './tls.js';
import { MAX_BAD_COMMANDS, MAX_AUTH_FAILURES, MAX_PREAUTH_COMMANDS, SASL_MAX_LINE, ID_MAX_PAIRS, ID_MAX_FIELD, ID_MAX_VALUE } from '../limits.js';

const BASE_CAPS = 'IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL-';
/** commands that may carry a literal before login; any other is refused instead of invited */
const TAKES_LITERAL = new Set(['LOGIN', 'ID']);
/** commands of the authenticated state: "log in first", not "unknown" */
const AFTER_LOGIN = new Set(['SELECT', 'EXAMINE', 'LIST', 'LSUB', 'STATUS', 'FETCH', 'APPEND', 'CREATE', 'DELETE', 'RENAME', 'SUBSCRIBE', 'UNSUBSCRIBE', 'IDLE', 'NAMESPACE', 'GETQUOTAROOT', 'SEARCH', 'STORE', 'COPY', 'MOVE', 'UID', 'EXPUNGE', 'CLOSE', 'UNSELECT', 'CHECK']);

const PRIVACY = 'NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.';

/** One SASL response: data, `*` (cancel), bad base64, a terminal framing error, or the client gone. */
type SaslLine = { kind: 'data'; data: Buffer } | { kind: 'cancel' } | { kind: 'bad' } | { kind: 'fatal'; text: string } | { kind: 'eof' };

export class ImapSession {
  private readonly framer: ImapFramer;
  private readonly st: LoginState;
  private bad = 0;
  private commands = 0;
  private readonly reader: PreauthReader;
  /** the connection went to a backend: it is the relay's now */
  private relayed = false;
  private readonly env: ProxyEnv;
  private readonly conn: ClientConn;
  /** the node's answer to this connection's admission, when it was not in before the greeting */
  private readonly admitted: Promise<boolean> | null;

  constructor(env: ProxyEnv, conn: ClientConn, admitted?: Promise<boolean>) {
    this.env = env;
    this.conn = conn;
    this.admitted = admitted ?? null;
    this.framer = new ImapFramer(env.instance.config.limits.max_line);
    this.st = { proto: 'imap', sid: sessionId(), started: Date.now(), attempts: 0, lastUser: null, lastMethod: null };
    this.reader = new PreauthReader(env, conn, '* BYE Disconnected for inactivity.\r\n');
  }

  capabilities(): string {
    let c = BASE_CAPS;
    if (!this.conn.secure && this.conn.canTls && this.env.tls) c += ' STARTTLS';
    if (!plaintextAllowed(this.env, this.conn)) c += ' LOGINDISABLED';
    for (const m of mechanismsFor(this.env, this.conn)) if (m.usable) c += ` AUTH=${m.mechanism.name}`;
    return c;
  }

  /** Wait for more bytes from the client; false at EOF or timeout. */
  private async more(): Promise<boolean> {
    const chunk = await this.reader.read();
    if (chunk === null) return false;
    this.framer.feed(chunk);
    return true;
  }

  private async nextFrame(): Promise<Frame | null> {
    for (;;) {
      const f = this.framer.next();
      if (f) return f;
      if (!(await this.more())) return null;
    }
  }

  /** Run the session to its end (logout, disconnect, or the end of the relayed backend session). */
  async run(): Promise<void> {
    // every way out of the pre-auth loop closes the connection (a relayed one is the relay's)
    await this.reader.run(() => this.loop(), () => this.relayed);
  }

  /** The client went away (or timed out): log why, close. */
  private gone(): void {
    this.reader.gone(this.st);
  }

  /** A limit was hit: one final `* BYE`, then close. */
  private bye(text: string): void {
    this.env.log.log('info', 'imap-login', `Disconnected (${text}):`, { rip: this.conn.peer.rip, lip: this.conn.peer.lip, session: this.st.sid });
    this.conn.end(`* BYE ${text}\r\n`);
  }

  private async loop(): Promise<void> {
    const { conn } = this;
    conn.write(`* OK [CAPABILITY ${this.capabilities()}] PigeonDeliver ready.\r\n`);
    // greeted while the node decides on the connection (as Dovecot's imap-login greets at once):
    // no command is read before it has; refused, the caller has written the `* BYE`
    if (this.admitted && !(await this.admitted)) return;
    for (;;) {
      const f = await this.nextFrame();
      if (f === null) return this.gone();
      if (f.kind === 'error') return this.bye(f.text);
      if (f.kind === 'continue') {
        if (this.literalRefused(f.parts)) return;
        continue;
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

  /**
   * A synchronising literal was announced: invite it (`+ OK`) only for a command that takes one
   * before login; otherwise answer the tag now, so the client never sends the literal. True when
   * the session is over (too many bad commands).
   */
  private literalRefused(parts: readonly Buffer[]): boolean {
    const head = peekCommand(parts[0]);
    if (head && TAKES_LITERAL.has(head.name)) {
      if (head.name === 'LOGIN' && !plaintextAllowed(this.env, this.conn)) {
        // never invite a password in clear text
        this.framer.refuse();
        this.conn.write(`${head.tag} ${PRIVACY}\r\n`);
        return false;
      }
      this.framer.accept();
      this.conn.write('+ OK\r\n');
      return false;
    }
    this.framer.refuse();
    if (!head) return this.badCommand(null, 'Error in IMAP command: Invalid tag');
    return this.badCommand(head.tag, AFTER_LOGIN.has(head.name) ? 'Please log in first.' : 'Unknown command.');
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
      case 'ENABLE':
        // RFC 5161 allows ENABLE only after login; Dovecot answers it anyway, and so do we
        conn.write(`* ENABLED\r\n${t} OK ENABLE ignored in non-authenticated state.\r\n`);
        return false;
      case 'STARTTLS': {
        if (conn.secure) return this.badCommand(t, 'TLS is already active.');
        if (!conn.canTls || !env.tls) {
          conn.write(`${t} NO STARTTLS is not available on this connection.\r\n`);
          return false;
        }
        conn.write(`${t} OK Begin TLS negotiation now.\r\n`);
        this.framer.rest(); // commands pipelined after STARTTLS are discarded, never answered inside TLS
        try {
          await conn.startTls(env.tls, { timeoutMs: handshakeTimeoutMs(env.instance), alpn: alpnCallback('imap') });
        } catch (e) {
          env.log.log('info', 'imap-login', `Disconnected (TLS handshaking: ${(e as Error).message}):`, { rip: conn.peer.rip, lip: conn.peer.lip, session: this.st.sid });
          return true;
        }
        return false;
      }
      case 'LOGIN': {
        if (cmd.args.length !== 2) return this.badCommand(t, 'LOGIN expects user and password.');
        const user = argBytes(cmd.args[0]);
        const password = argBytes(cmd.args[1]);
        if (user === null || password === null) return this.badCommand(t, 'LOGIN expects user and password.');
        if (!plaintextAllowed(env, conn)) {
          conn.write(`${t} ${PRIVACY}\r\n`);
          logPlaintextRefused(env, conn, this.st);
          return false;
        }
        return this.login(t, { kind: 'password', user, password }, 'PLAIN');
      }
      case 'AUTHENTICATE':
        return this.authenticate(cmd);
      default:
        return this.badCommand(t, AFTER_LOGIN.has(cmd.name) ? 'Please log in first.' : 'Unknown command.');
    }
  }

  private id(cmd: Command): boolean {
    const a = cmd.args[0];
    if (cmd.args.length !== 1 || !a || (a.type !== 'nil' && a.type !== 'list')) return this.badCommand(cmd.tag, 'ID expects a list or NIL.');
    if (a.type === 'list') {
      if (a.items.length % 2 !== 0 || a.items.length > ID_MAX_PAIRS * 2) return this.badCommand(cmd.tag, 'Invalid ID parameters.');
      for (let i = 0; i < a.items.length; i += 2) {
        const k = argBytes(a.items[i]);
        const v: Arg | undefined = a.items[i + 1];
        if (k === null || k.length > ID_MAX_FIELD || (v && v.type !== 'nil' && (argBytes(v)?.length ?? ID_MAX_VALUE + 1) > ID_MAX_VALUE)) {
          return this.badCommand(cmd.tag, 'Invalid ID parameters.');
        }
      }
    }
    this.conn.write(`* ID ("name" "PigeonDeliver")\r\n${cmd.tag} OK ID completed.\r\n`);
    return false;
  }

  /** Read one SASL response line (raw: no literal or list syntax). */
  private async saslLine(): Promise<SaslLine> {
    for (;;) {
      const f = this.framer.nextLine(SASL_MAX_LINE);
      if (f?.kind === 'error') return { kind: 'fatal', text: f.text };
      if (f?.kind === 'line') {
        const s = f.line.toString('latin1').trim();
        if (s === '*') return { kind: 'cancel' };
        const data = s === '' ? Buffer.alloc(0) : saslBase64(s);
        return data === null ? { kind: 'bad' } : { kind: 'data', data };
      }
      if (!(await this.more())) return { kind: 'eof' };
    }
  }

  /**
   * One SASL step: the initial response when given, else a `+ prompt` and the client's line.
   * Returns the data, or true/false as from dispatch when the step ended the command.
   */
  private async step(tag: string, initial: string | null, prompt: string): Promise<Buffer | boolean> {
    let r: SaslLine;
    if (initial !== null) {
      const data = saslBase64(initial);
      r = data === null ? { kind: 'bad' } : { kind: 'data', data };
    } else {
      this.conn.write(`+ ${prompt}\r\n`);
      r = await this.saslLine();
    }
    switch (r.kind) {
      case 'data':
        return r.data;
      case 'eof':
        this.gone();
        return true;
      case 'fatal':
        this.bye(r.text);
        return true;
      case 'cancel':
        this.conn.write(`${tag} BAD Authentication aborted by client.\r\n`);
        return false;
      case 'bad':
        return this.badCommand(tag, 'Invalid base64 data in continued response.');
    }
  }

  private async authenticate(cmd: Command): Promise<boolean> {
    const { conn, env } = this;
    const t = cmd.tag;
    const mech = argAscii(cmd.args[0])?.toUpperCase();
    if (!mech || cmd.args.length > 2) return this.badCommand(t, 'AUTHENTICATE expects a mechanism.');
    const offered = offeredMechanism(env, conn, mech);
    if (offered === null) {
      conn.write(`${t} NO Unsupported authentication mechanism.\r\n`);
      return false;
    }
    if (!offered.usable) {
      conn.write(`${t} ${PRIVACY}\r\n`);
      logPlaintextRefused(env, conn, this.st);
      return false;
    }
    const ir = cmd.args.length === 2 ? argAscii(cmd.args[1]) : null;
    if (cmd.args.length === 2 && ir === null) return this.badCommand(t, 'Invalid base64 data in initial response.');
    const x = await startMechanism(offered.mechanism, env, ir, (initial, challenge) => this.step(t, initial, challenge.toString('base64')));
    return 'ended' in x ? x.ended : this.login(t, x.creds, offered.mechanism.name, x.tails, x.over);
  }

  private afterFailure(): boolean {
    if (this.st.attempts >= MAX_AUTH_FAILURES) {
      this.conn.end('* BYE Too many invalid authentication attempts.\r\n');
      logDisconnect(this.env, this.conn, this.st, 'auth failed');
      return true;
    }
    return false;
  }

  /** `sasl`/`over`: a SASL mechanism's last rounds, and whether the client ended the command inside them. */
  private async login(tag: string, creds: Credentials, method: string, sasl: SaslTails = {}, over: () => Ended | null = () => null): Promise<boolean> {
    const r = await loginAndRelay(this.env, this.conn, this.st, creds, method, {
      tag,
      sasl,
      leftover: () => this.framer.rest(),
      replies: {
        tempfail: `${tag} NO [UNAVAILABLE] Temporary authentication failure.\r\n`,
        failed: `${tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n`,
        limit: (reason) => `${tag} NO [LIMIT] ${reason}\r\n`,
        unavailable: `${tag} NO [UNAVAILABLE] Internal error occurred. Refer to server log for more information.\r\n`,
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
