// A session received over the peer link, on the home node: started like a local plain-TCP login,
// by the worker's spawner on one end of a local socket pair, never forked by the worker itself
// (a fork of the worker blocked its event loop for milliseconds per received login). Real nodes
// (`pigeon serve` on 127.0.0.2 and .3, one SQLite file), real TLS 1.3 between them, Dovecot behind,
// imapflow and a raw POP3 client in front:
// - the Dovecot serving a user of B reached at A is a child of B's spawner, not of B's worker;
// - the session's bytes are exact both ways (a 3 MiB message by IMAP FETCH and by POP3 RETR);
// - LOGOUT/QUIT reach the client, and a client that just disconnects ends B's Dovecot too.
import t from 'tap';
import { ImapFlow } from 'imapflow';
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { makeNode, lmtpSend, wireTo, type ClusterNode } from './helpers/cluster.js';
import { untilText } from './helpers/wire.js';
import { scratchDir } from './helpers/instance.js';
import { requireProgram } from './helpers/programs.js';

t.setTimeout(420_000);

const DOMAIN = 'example.test';
const USER = `onb@${DOMAIN}`;
// a bound against a hang, never a pace: every wait ends on its event
const BOUND_MS = 60_000;

/** pid → parent pid and command line, of every process now */
function processes(): Map<number, { ppid: number; cmd: string }> {
  const out = new Map<number, { ppid: number; cmd: string }>();
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const st = readFileSync(`/proc/${d}/stat`, 'utf8');
      const ppid = Number(st.slice(st.lastIndexOf(')') + 2).split(' ')[1]);
      out.set(Number(d), { ppid, cmd: readFileSync(`/proc/${d}/cmdline`, 'utf8').replace(/\0/g, ' ') });
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

/**
 * The Dovecot imap/pop3 processes below node `n`'s serve process serving the mailbox of `user`
 * on that node (its mail_location names it; Dovecot's process title overwrites its environment).
 */
function dovecotsOf(n: ClusterNode, user: string): { pid: number; parent: string }[] {
  const [local, domain] = user.split('@');
  const mailbox = `=maildir:${join(n.dir, 'mail', domain ?? '', local ?? '')} `;
  const ps = processes();
  const root = n.child?.pid ?? -1;
  const below = (pid: number): boolean => {
    for (let p = ps.get(pid)?.ppid; p !== undefined && p > 1; p = ps.get(p)?.ppid) if (p === root) return true;
    return false;
  };
  const out: { pid: number; parent: string }[] = [];
  for (const [pid, p] of ps) {
    if (!/^\/usr\/lib\/dovecot\/(imap|pop3) /.test(p.cmd) || !p.cmd.includes(mailbox) || !below(pid)) continue;
    out.push({ pid, parent: ps.get(p.ppid)?.cmd ?? '?' });
  }
  return out;
}

t.test('a session received over the peer link: Dovecot started by the spawner, bytes exact both ways, ends with the client', async (t) => {
  if (!requireProgram(t, '/usr/lib/dovecot/imap', 'dovecot-imapd')) return;
  if (!requireProgram(t, '/usr/lib/dovecot/pop3', 'dovecot-pop3d')) return;
  const base = scratchDir(t);
  const A = await makeNode(t, base, 'A', '127.0.0.2', null, null);
  const B = await makeNode(t, base, 'B', '127.0.0.3', join(base, 'A', 'pigeon.db'), A.dir);
  A.run(['domain', 'add', DOMAIN]);
  t.equal(A.run(['user', 'add', USER, '--password-stdin', '--home', 'B'], 'secret\n').status, 0, 'user on B added');
  await Promise.all([A.start(), B.start()]);

  // 3 MiB of lines, some starting with a dot (POP3 dot-stuffs them, the client un-stuffs)
  const lines: string[] = [];
  for (let i = 0, size = 0; size < 3 * 1024 * 1024; i++) {
    const line = `${i % 97 === 0 ? '.' : ''}${randomBytes(54).toString('base64')}\r\n`;
    lines.push(line);
    size += line.length;
  }
  const body = lines.join('');
  const r = await lmtpSend(A, [USER], `From: bob@example.test\r\nTo: ${USER}\r\nSubject: big\r\n\r\n${body}`);
  t.match(r[0], /^250 /, 'delivered at A, stored on B');

  const c = new ImapFlow({ host: A.ip, port: A.ports['imap'] ?? 0, secure: false, doSTARTTLS: false, auth: { user: USER, pass: 'secret' }, logger: false, emitLogs: false, connectionTimeout: BOUND_MS });
  await c.connect();
  const lock = await c.getMailboxLock('INBOX');
  try {
    const d = dovecotsOf(B, USER);
    t.equal(d.length, 1, "one Dovecot serves the user's session on B");
    t.match(d[0]?.parent ?? '', /^pigeon: spawner/, "B's spawner started it: B's worker did not fork");
    t.equal(dovecotsOf(A, USER).length, 0, 'none on A: the mailbox is on B');
    const m = await c.fetchOne('1', { source: true });
    const src = m === false ? '' : (m.source?.toString('latin1') ?? '');
    t.equal(src.slice(src.indexOf('\r\n\r\n') + 4), body, 'IMAP FETCH through A: the body byte for byte');
  } finally {
    lock.release();
  }
  await c.logout(); // imapflow resolves on the tagged OK of LOGOUT: it crossed both relays
  await untilText(() => B.log(), /imap\(onb@example\.test\): Disconnected: Logged out/, BOUND_MS);
  t.equal(dovecotsOf(B, USER).length, 0, "B's Dovecot is gone after LOGOUT");

  const w = await wireTo(A.ip, A.ports['pop3'] ?? 0);
  await w.until(/^\+OK/m);
  w.write(`USER ${USER}\r\nPASS secret\r\n`);
  t.match(await w.until(/Logged in/, BOUND_MS), /\+OK Logged in/, 'POP3 login through A');
  t.match(dovecotsOf(B, USER)[0]?.parent ?? '', /^pigeon: spawner/, "POP3 too: B's spawner started Dovecot's pop3");
  w.write('RETR 1\r\n');
  const retr = await w.until(/\r\n\.\r\n/, BOUND_MS);
  const msg = retr.slice(retr.indexOf('\r\n') + 2, retr.length - '.\r\n'.length);
  const unstuffed = msg.replace(/^\./gm, '');
  t.equal(unstuffed.slice(unstuffed.indexOf('\r\n\r\n') + 4), body, 'POP3 RETR through A: the body byte for byte');
  w.write('QUIT\r\n');
  t.match(await w.until(/^\+OK.*\r\n/m, BOUND_MS), /^\+OK/m, 'QUIT answered through both relays');
  await w.waitClosed();

  // a client that just goes away: the link closes, B's Dovecot sees EOF and leaves
  const x = await wireTo(A.ip, A.ports['imap'] ?? 0);
  await x.until(/^\* OK/m);
  x.write(`a1 LOGIN ${USER} secret\r\n`);
  t.match(await x.until(/^a1 .*\r\n/m, BOUND_MS), /^a1 OK/m, 'logged in once more');
  const before = (B.log().match(/imap\(onb@example\.test\): Disconnected/g) ?? []).length;
  x.close();
  await untilText(() => (B.log().match(/imap\(onb@example\.test\): Disconnected/g) ?? []).length > before ? 'gone' : '', /gone/, BOUND_MS);
  t.equal(dovecotsOf(B, USER).length, 0, "a client that disconnected leaves no Dovecot on B");
});
