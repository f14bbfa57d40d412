// Two nodes on a private PostgreSQL server, for the database's faults (stopped, failing over):
// a login that reports the server's answer as it is, an "MTA" that keeps delivering over LMTP and
// retries what was deferred, and the count of each accepted message in the mailbox.
import { readFileSync, readdirSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import type { Test } from 'tap';
import { makeNode, lmtpSend, wireTo, type ClusterNode } from './cluster.js';
import { scratchDir } from './instance.js';

export const DOMAIN = 'example.test';

export function msg(subject: string): string {
  return `From: bob@example.test\r\nTo: someone@example.test\r\nSubject: ${subject}\r\nMessage-ID: <${subject.replace(/\W/g, '')}.${Math.random().toString(36).slice(2)}@test>\r\n\r\nhello\r\n`;
}

/** Two nodes, A (127.0.0.2) and B (127.0.0.3), on `url`; alice homed on A, bob on B, both with mail. */
export async function twoNodes(t: Test, url: string, conf = ''): Promise<{ A: ClusterNode; B: ClusterNode }> {
  const base = scratchDir(t);
  const A = await makeNode(t, base, 'A', '127.0.0.2', url, null, conf);
  const B = await makeNode(t, base, 'B', '127.0.0.3', url, A.dir, conf);
  A.run(['domain', 'add', DOMAIN]);
  for (const [u, home] of [
    ['alice', 'A'],
    ['bob', 'B'],
  ] as const) {
    const r = A.run(['user', 'add', `${u}@${DOMAIN}`, '--password-stdin', '--home', home], 'secret\n');
    if (r.status !== 0) throw new Error(`user add ${u}: ${r.stderr}`);
  }
  await Promise.all([A.start(), B.start()]);
  return { A, B };
}

/** The tagged answer to an IMAP LOGIN at node `n` (or the connection's error). */
export async function imapLogin(n: ClusterNode, user: string, pass = 'secret'): Promise<string> {
  try {
    const w = await wireTo(n.ip, n.ports['imap'] ?? 0);
    await w.until(/^\* OK/m);
    w.write(`a1 LOGIN ${user} ${pass}\r\n`);
    const line = (await w.until(/^a1 .*$/m, 60_000)).split(/\r?\n/).find((l) => l.startsWith('a1 ')) ?? '';
    w.write('a2 LOGOUT\r\n');
    w.close();
    return line;
  } catch (e) {
    return `error: ${(e as Error).message}`;
  }
}

/** The POP3 answer to USER/PASS at node `n`. */
export async function pop3Login(n: ClusterNode, user: string, pass = 'secret'): Promise<string> {
  try {
    const w = await wireTo(n.ip, n.ports['pop3'] ?? 0);
    await w.until(/^\+OK/m);
    w.write(`USER ${user}\r\nPASS ${pass}\r\n`);
    const got = await w.until(/^(\+OK Logged in|-ERR).*$/m, 60_000);
    w.write('QUIT\r\n');
    w.close();
    return got.split(/\r?\n/).find((l) => /^(\+OK Logged in|-ERR)/.test(l)) ?? '';
  } catch (e) {
    return `error: ${(e as Error).message}`;
  }
}

export interface Mta {
  readonly accepted: string[];
  readonly deferred: string[];
  /** stop after the message in hand is accepted (an MTA retries until then) */
  stop(): Promise<void>;
}

/** An MTA delivering to `rcpt` over LMTP at `n`, one message after another, retrying each deferral. */
export function mta(n: ClusterNode, rcpt: string, prefix: string): Mta {
  const accepted: string[] = [];
  const deferred: string[] = [];
  let stopping = false;
  const run = (async () => {
    for (let i = 0; !stopping; i++) {
      const subject = `${prefix} ${i}`;
      for (;;) {
        let r: string;
        try {
          r = (await lmtpSend(n, [rcpt], msg(subject)))[0] ?? '';
        } catch (e) {
          r = `error: ${(e as Error).message}`;
        }
        if (r.startsWith('250')) break;
        deferred.push(r);
        await new Promise((res) => setTimeout(res, 200)); // the MTA's retry pace, not a wait for anything
      }
      accepted.push(subject);
    }
  })();
  return {
    accepted,
    deferred,
    stop: async () => {
      stopping = true;
      await run;
    },
  };
}

/** How often each Subject is in `user`'s Maildir on node `n`. */
export function subjectCounts(n: Pick<ClusterNode, 'dir'>, user: string): Map<string, number> {
  const d = join(n.dir, 'mail', DOMAIN, user);
  const out = new Map<string, number>();
  for (const s of ['new', 'cur']) {
    if (!existsSync(join(d, s))) continue;
    for (const f of readdirSync(join(d, s))) {
      const subject = /^Subject: (.*)$/m.exec(readFileSync(join(d, s, f), 'utf8'))?.[1]?.trim() ?? '';
      out.set(subject, (out.get(subject) ?? 0) + 1);
    }
  }
  return out;
}

/** Accepted subjects that are not in the mailbox exactly once (empty: none lost, none doubled). */
export function notExactlyOnce(counts: Map<string, number>, accepted: readonly string[]): string[] {
  return accepted.filter((s) => counts.get(s) !== 1).map((s) => `${s}: ${counts.get(s) ?? 0}`);
}

// the bounded poll of a condition the cluster tests share (test/helpers/cluster.ts)
export { until } from './cluster.js';

/** How many lines of `log` match `re`. */
export function lines(log: string, re: RegExp): number {
  return log.split('\n').filter((l) => re.test(l)).length;
}
