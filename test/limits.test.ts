// Node-wide connection limits and failure penalties through a real `pigeon serve --workers 2`
// with real Dovecot, imapflow and raw sockets from 127.0.0.1 (one address: a webmail server or
// an office behind NAT): logged-in sessions never count per IP, 100 unauthenticated connections
// from one address are fine by default, the per-IP limit evicts the oldest, trusted networks are
// exempt, the user+IP limit refuses the 11th session, the global limit counts what the proxy
// holds (not sessions handed to Dovecot), the failure delay doubles across workers and across
// one-shot inetd and Postfix spawn processes; and `serve` with a port in use exits 75 with one line.
import t, { type Test } from 'tap';
import { ImapFlow } from 'imapflow';
import { readFileSync, writeFileSync, existsSync, chownSync, statSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { spawn, spawnSync, execFileSync } from 'node:child_process';
import { createServer } from 'node:net';
import { makeInstance, serve, freePort, CLI, type Inst } from './helpers/instance.js';
import { Wire } from './helpers/wire.js';
import { requireProgram } from './helpers/programs.js';
import { startPostfix } from './helpers/postfix.js';
import { openStore } from '../src/store.js';
import { hashPassword } from '../auth/schemes.js';
import { AnvilClient } from '../src/anvil/client.js';
import type { Results } from '../src/anvil/protocol.js';
import { owned, stopGroup } from './helpers/reaper.js';

// tap's per-file timeout for this file: it ran 76 s alone on a lightly loaded machine, and two
// suites at once on 2 cores make a file take 2-3 times as long (the default is 180 s, .taprc)
t.setTimeout(420_000);

/** `n` users user0..user(n-1)@example.test with password `pw` (one cheap hash, written directly). */
async function addUsers(inst: Inst, n: number): Promise<string[]> {
  const db = join(inst.dir, 'pigeon.db');
  const store = await openStore(db);
  try {
    const hash = await hashPassword(Buffer.from('pw'), 'SSHA256');
    await store.addDomain('example.test');
    const users = Array.from({ length: n }, (_, i) => `user${i}@example.test`);
    for (const u of users) await store.addUser(u, hash, null);
    return users;
  } finally {
    await store.close();
  }
}

function imap(port: number, user: string, pass = 'pw', secure = false, ca?: Buffer): ImapFlow {
  return new ImapFlow({
    host: '127.0.0.1',
    port,
    secure,
    doSTARTTLS: false,
    ...(ca ? { tls: { ca: [ca], servername: 'localhost' } } : {}),
    auth: { user, pass },
    logger: false,
    emitLogs: false,
    connectionTimeout: 30_000,
  } as ConstructorParameters<typeof ImapFlow>[0]);
}

/**
 * A connection the node has admitted: greeted, and a first command answered (an IMAP connection
 * is greeted at once and reads no command before the node's admission has answered).
 */
async function greeted(port: number): Promise<Wire> {
  const w = await Wire.open(port);
  const g = await w.until(/\r\n/);
  if (!g.startsWith('* OK')) throw new Error(`no greeting: ${JSON.stringify(g)}`);
  w.write('g0 NOOP\r\n');
  const n = await w.until(/g0 .*\r\n/);
  if (!/^g0 OK/m.test(n)) throw new Error(`not admitted: ${JSON.stringify(n)}`);
  return w;
}

/** Run `fn` over `items` with at most `n` at a time. */
async function pool<T, R>(items: readonly T[], n: number, fn: (x: T) => Promise<R>): Promise<R[]> {
  const out: R[] = [];
  let next = 0;
  await Promise.all(
    Array.from({ length: n }, async () => {
      while (next < items.length) {
        const i = next++;
        out[i] = await fn(items[i] as T);
      }
    }),
  );
  return out;
}

/** The node state service's records, as `pigeon who` will show them. */
async function nodeState(t: Test, inst: Inst): Promise<Results['list']> {
  const c = new AnvilClient({ runDir: join(inst.dir, 'run'), role: 'test', autostart: false, log: () => {} });
  t.teardown(() => c.shutdown());
  const l = await c.list();
  if (!c.shared) throw new Error('the node state service is not running');
  c.shutdown();
  return l;
}

/** Wait until the node state satisfies `ok` (a worker's update reaches the service a moment after its client saw the answer). */
async function nodeStateUntil(t: Test, inst: Inst, ok: (l: Results['list']) => boolean, ms = 60_000): Promise<Results['list']> {
  const deadline = Date.now() + ms;
  for (;;) {
    const l = await nodeState(t, inst);
    if (ok(l) || Date.now() > deadline) return l;
    await new Promise((r) => setTimeout(r, 50));
  }
}

function logText(inst: Inst): string {
  return readFileSync(join(inst.dir, 'pigeon.log'), 'utf8');
}

/** Wait until the log holds `n` lines matching `re` (the event the proxy logs). */
async function logLines(inst: Inst, re: RegExp, n: number, ms = 60_000): Promise<string[]> {
  const deadline = Date.now() + ms;
  for (;;) {
    const lines = logText(inst)
      .split('\n')
      .filter((l) => re.test(l));
    if (lines.length >= n || Date.now() > deadline) return lines;
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** A failed LOGIN on a fresh connection: how long the answer took, and the process that served it. */
async function failOnce(port: number, inst: Inst, nth: number): Promise<{ ms: number; pid: string }> {
  const w = await greeted(port);
  const start = Date.now();
  w.write(`f${nth} LOGIN user0@example.test wrong\r\n`);
  const r = await w.until(new RegExp(`f${nth} (OK|NO|BAD).*\\r\\n`), 30_000);
  const ms = Date.now() - start;
  w.close();
  if (!/NO \[AUTHENTICATIONFAILED\]/.test(r)) throw new Error(`expected a failure, got ${JSON.stringify(r)}`);
  const lines = await logLines(inst, /imap-login: auth failed/, nth);
  const pid = /pigeon\[(\d+)\]/.exec(lines[nth - 1] ?? '')?.[1] ?? '?';
  return { ms, pid };
}

async function succeed(port: number): Promise<void> {
  const w = await greeted(port);
  w.write('s1 LOGIN user0@example.test pw\r\n');
  const r = await w.until(/s1 (OK|NO|BAD).*\r\n/, 30_000);
  if (!/s1 OK/.test(r)) throw new Error(`login failed: ${r}`);
  w.write('s2 LOGOUT\r\n');
  await w.until(/s2 OK/);
  w.close();
}

t.test('one address, two workers: logged-in sessions never count per IP', async (t) => {
  // the per-IP limit lowered to 10: 50 users from one address all get in anyway
  const inst = makeInstance(t, { listen: ['imap=127.0.0.1:0'], conf: '  preauth_per_ip: 10\n' });
  const users = await addUsers(inst, 50);
  const srv = await serve(t, inst, 2);
  const port = srv.ports['imap'] ?? 0;
  const clients = await pool(users, 8, async (u) => {
    const c = imap(port, u);
    await c.connect();
    return c;
  });
  t.teardown(() => Promise.all(clients.map((c) => c.logout().catch(() => {}))));
  t.equal(clients.length, 50, 'all 50 logged in');
  const opened = await Promise.all(clients.map((c) => c.mailboxOpen('INBOX').then(() => true, () => false)));
  t.equal(opened.filter(Boolean).length, 50, 'and all 50 sessions work at once');
  t.notMatch(logText(inst), /Too many connections|Connection refused|evicted/, 'nothing was refused or evicted');
  // a LOGIN written with the connect, before the greeting and the node's admission: answered after both
  const early = await Wire.open(port);
  t.teardown(() => early.close());
  early.write('e1 LOGIN user0@example.test pw\r\n');
  t.match(await early.until(/e1 .*\r\n/), /^\* OK \[CAPABILITY [^\r\n]*\r\ne1 OK \[CAPABILITY [^\]]*\] Logged in/, 'a LOGIN sent before the greeting: greeted, then logged in');
  early.write('e2 LOGOUT\r\n');
  await early.until(/e2 OK.*\r\n/);
  early.close();
  // end every session and the daemon here, so no backend writes into the test directory as it goes
  await Promise.all(clients.map((c) => c.logout().catch(() => {})));
  await srv.stop();
});

t.test('one address, default limits: 100 unauthenticated connections at once are all served', async (t) => {
  const inst = makeInstance(t, { listen: ['imap=127.0.0.1:0'] });
  const srv = await serve(t, inst, 2);
  const port = srv.ports['imap'] ?? 0;
  const wires = await Promise.all(Array.from({ length: 100 }, () => greeted(port)));
  t.teardown(() => wires.forEach((w) => w.close()));
  wires.forEach((w, i) => w.write(`n${i} NOOP\r\n`));
  const answers = await Promise.all(wires.map((w, i) => w.until(new RegExp(`n${i} .*\\r\\n`))));
  t.equal(answers.filter((a, i) => new RegExp(`n${i} OK`).test(a)).length, 100, 'every one answers NOOP: none refused, none evicted');
  t.equal((await nodeState(t, inst)).counts.preauth, 100, 'the node counts 100 unauthenticated connections (both workers together)');
  wires.forEach((w) => w.close());
  await srv.stop();
});

t.test('per-IP limit: node-wide, the next connection evicts the oldest; trusted networks are exempt', async (t) => {
  const inst = makeInstance(t, { listen: ['imap=127.0.0.1:0', 'pop3=127.0.0.1:0'], conf: '  preauth_per_ip: 20\n' });
  const srv = await serve(t, inst, 2);
  const port = srv.ports['imap'] ?? 0;
  const wires: Wire[] = [];
  t.teardown(() => wires.forEach((w) => w.close()));
  for (let i = 0; i < 20; i++) wires.push(await greeted(port));
  t.equal((await nodeState(t, inst)).counts.preauth, 20, '20 unauthenticated connections from one address, on two workers');
  // the 21st is served; the oldest one (the first) is told and closed
  wires.push(await greeted(port));
  t.match(await wires[0]?.until(/BYE.*\r\n/), /\* BYE Connection limit reached: closing the oldest connection that has not logged in\./, 'the oldest gets one BYE');
  t.ok(await wires[0]?.waitClosed(), 'and is closed');
  for (const [i, w] of wires.slice(1).entries()) {
    w.write(`k${i} NOOP\r\n`);
    t.match(await w.until(new RegExp(`k${i} .*\\r\\n`)), new RegExp(`k${i} OK`), `connection ${i + 2} still served`);
  }
  t.equal((await nodeState(t, inst)).counts.preauth, 20, 'still 20 counted');
  t.match(logText(inst), /imap-login: Disconnected \(connection limit reached: evicted as the oldest connection that had not logged in\): rip=127\.0\.0\.1/);
  // POP3 shares the count: its connection evicts the oldest IMAP one
  const p = await Wire.open(srv.ports['pop3'] ?? 0);
  t.teardown(() => p.close());
  t.match(await p.until(/\r\n/), /^\+OK/);
  t.match(await wires[1]?.until(/BYE.*\r\n/), /\* BYE Connection limit reached/, 'a POP3 connection from the same address evicts the oldest IMAP one');

  t.test('a trusted network is exempt', async (t) => {
    const i2 = makeInstance(t, { listen: ['imap=127.0.0.1:0'], conf: '  preauth_per_ip: 5\n  trusted_networks: [192.0.2.0/24, 127.0.0.0/8]\n' });
    const s2 = await serve(t, i2, 2);
    const ws = await Promise.all(Array.from({ length: 12 }, () => greeted(s2.ports['imap'] ?? 0)));
    t.teardown(() => ws.forEach((w) => w.close()));
    t.equal((await nodeState(t, i2)).counts.preauth, 12, '12 unauthenticated connections from a trusted address, limit 5');
    ws.forEach((w, i) => w.write(`n${i} NOOP\r\n`));
    const answers = await Promise.all(ws.map((w, i) => w.until(new RegExp(`n${i} .*\\r\\n`))));
    t.equal(answers.filter((a, i) => new RegExp(`n${i} OK`).test(a)).length, 12, 'none was evicted');
  });
});

t.test('user+IP: the 11th session of one user from one address is refused, a closed one frees its place', async (t) => {
  const inst = makeInstance(t, { listen: ['imap=127.0.0.1:0', 'pop3=127.0.0.1:0'] });
  await addUsers(inst, 1);
  const srv = await serve(t, inst, 2);
  const port = srv.ports['imap'] ?? 0;
  const ten: ImapFlow[] = [];
  t.teardown(() => Promise.all(ten.map((c) => c.logout().catch(() => {}))));
  for (let i = 0; i < 10; i++) {
    const c = imap(port, 'user0@example.test');
    await c.connect();
    ten.push(c);
  }
  t.equal(ten.length, 10, 'ten sessions of user0 from 127.0.0.1');
  const w = await greeted(port);
  t.teardown(() => w.close());
  w.write('a1 LOGIN user0@example.test pw\r\n');
  t.match(await w.until(/a1 .*\r\n/), /^a1 NO \[LIMIT\] Maximum number of connections from user\+IP exceeded \(mail_max_userip_connections=10\)\r\n$/, 'the 11th: NO [LIMIT], Dovecot\'s words');
  const p = await Wire.open(srv.ports['pop3'] ?? 0);
  t.teardown(() => p.close());
  await p.until(/\r\n/);
  p.write('USER user0@example.test\r\nPASS pw\r\n');
  t.match(await p.until(/^-ERR.*\r\n/m), /-ERR \[IN-USE\] Maximum number of connections from user\+IP exceeded \(mail_max_userip_connections=10\)/, 'POP3: -ERR [IN-USE]');
  t.match(logText(inst), /imap-login: Maximum number of connections from user\+IP exceeded \(mail_max_userip_connections=10\): user=<user0@example\.test>, rip=127\.0\.0\.1/);
  t.notMatch(logText(inst), /auth failed/, 'a refusal by the limit is no auth failure (fail2ban)');
  // one session ends: its place is free again
  await ten.pop()?.logout();
  await logLines(inst, /imap\(user0@example\.test\): Disconnected: Logged out/, 1);
  w.write('a2 LOGIN user0@example.test pw\r\n');
  t.match(await w.until(/a2 .*\r\n/), /a2 OK \[CAPABILITY/, 'the same connection logs in once a session has ended');
  w.write('a3 LOGOUT\r\n');
  await w.until(/a3 OK/);
  await Promise.all(ten.map((c) => c.logout().catch(() => {})));
  await srv.stop();
});

t.test('global limit: counts what the proxy holds; handed-off sessions do not; the oldest unauthenticated is evicted', async (t) => {
  const inst = makeInstance(t, { listen: ['imap=127.0.0.1:0', 'imaps=127.0.0.1:0', 'pop3=127.0.0.1:0'], conf: '  max_connections: 4\n' });
  const users = await addUsers(inst, 10);
  const srv = await serve(t, inst, 2);
  const port = srv.ports['imap'] ?? 0;
  const ca = readFileSync(join(inst.dir, 'certs', 'ca.crt'));
  const all: ImapFlow[] = [];
  t.teardown(() => Promise.all(all.map((c) => c.logout().catch(() => {}))));
  // six plain-TCP sessions: the socket goes to Dovecot, which counts them, not the proxy
  for (const u of users.slice(0, 6)) {
    const c = imap(port, u);
    await c.connect();
    all.push(c);
  }
  const handed = await nodeStateUntil(t, inst, (l) => l.counts.held === 0);
  t.equal(handed.counts.held, 0, 'six sessions handed to Dovecot: none held by the proxy');
  t.equal(handed.counts.sessions, 6, 'and the six are known to the node (who/kick)');
  // four TLS sessions: relayed through the proxy, so counted
  const relayed: ImapFlow[] = [];
  for (const u of users.slice(6, 10)) {
    const c = imap(srv.ports['imaps'] ?? 0, u, 'pw', true, ca);
    await c.connect();
    relayed.push(c);
    all.push(c);
  }
  const held = await nodeState(t, inst);
  t.equal(held.counts.held, 4, 'four relayed sessions held');
  const full = await Wire.open(port);
  t.teardown(() => full.close());
  // a LOGIN sent at once, before the node has answered the admission: never read
  full.write('x1 LOGIN user0@example.test pw\r\n');
  // greeted at once (as Dovecot's imap-login does), then the node's answer: refused
  t.match(await full.until(/BYE.*\r\n/), /^\* OK \[CAPABILITY [^\r\n]*\r\n\* BYE Too many connections, try again later\.\r\n$/, 'full with sessions only: the greeting, then refused with one BYE');
  t.ok(await full.waitClosed());
  t.equal(await full.until(/x1/), '', 'and the LOGIN sent before the answer got none');
  t.equal((await nodeState(t, inst)).counts.sessions, held.counts.sessions, 'no session started from it');
  // POP3 cannot take a +OK greeting back: it waits for the node's answer, and gets only the -ERR
  const fullPop = await Wire.open(srv.ports['pop3'] ?? 0);
  t.teardown(() => fullPop.close());
  fullPop.write('USER user0@example.test\r\n');
  t.equal(await fullPop.until(/\r\n/), '-ERR [SYS/TEMP] Too many connections, try again later.\r\n', 'POP3, full: one -ERR, no greeting before it');
  t.ok(await fullPop.waitClosed());
  t.match(logText(inst), /Connection refused \(too many connections: limits\.max_connections, none unauthenticated to evict\): rip=127\.0\.0\.1/);
  // a relayed session ends: one place
  await relayed.pop()?.logout();
  await logLines(inst, /\): Disconnected: Logged out in=\d+ out=\d+: session=</, 1);
  const first = await greeted(port);
  t.teardown(() => first.close());
  const second = await greeted(port);
  t.teardown(() => second.close());
  t.match(await first.until(/BYE.*\r\n/), /\* BYE Connection limit reached/, 'the next one evicts the oldest unauthenticated connection');
  second.write('n1 NOOP\r\n');
  t.match(await second.until(/n1 .*\r\n/), /n1 OK/);
  second.close();
  await Promise.all(all.map((c) => c.logout().catch(() => {})));
  await srv.stop();
});

t.test('failure delay: doubles per failure from one address across the workers', async (t) => {
  const inst = makeInstance(t, { listen: ['imap=127.0.0.1:0'] });
  writeFileSync(join(inst.dir, 'conf.d', '60-delay.yaml'), 'limits:\n  auth_failure_delay_ms: 200\n');
  await addUsers(inst, 1);
  const srv = await serve(t, inst, 2);
  const port = srv.ports['imap'] ?? 0;
  // rounds of two failures on fresh connections, a success in between (it clears the penalty),
  // until two failures in a row were served by different workers
  let nth = 0;
  let crossed = 0;
  for (let round = 0; round < 12 && crossed < 2; round++) {
    const a = await failOnce(port, inst, ++nth);
    const b = await failOnce(port, inst, ++nth);
    t.ok(a.ms >= 200, `round ${round}: the first failure waited ${a.ms} ms (base 200)`);
    t.ok(b.ms >= 400, `round ${round}: the second failure waited ${b.ms} ms (2x base), worker ${a.pid} then ${b.pid}`);
    if (a.pid !== b.pid) crossed++;
    await succeed(port);
  }
  t.ok(crossed >= 1, `two consecutive failures landed on different workers ${crossed} times`);
  // the third failure in a row: 4x
  const f1 = await failOnce(port, inst, ++nth);
  const f2 = await failOnce(port, inst, ++nth);
  const f3 = await failOnce(port, inst, ++nth);
  t.ok(f1.ms >= 200 && f2.ms >= 400 && f3.ms >= 800, `200/400/800 ms at least: ${f1.ms}/${f2.ms}/${f3.ms}`);
});

t.test('failure delay: doubles across one-shot processes under openbsd-inetd', async (t) => {
  if (!requireProgram(t, '/usr/sbin/inetd', 'openbsd-inetd')) return;
  const inst = makeInstance(t, {});
  writeFileSync(join(inst.dir, 'conf.d', '60-delay.yaml'), 'limits:\n  auth_failure_delay_ms: 200\n');
  await addUsers(inst, 1);
  const port = await freePort();
  const conf = join(inst.dir, 'inetd.conf');
  writeFileSync(conf, `127.0.0.1:${port} stream tcp nowait.2000 root ${process.execPath} node ${CLI} -c ${inst.dir} imap --forker inetd\n`);
  const inetd = owned(spawn('/usr/sbin/inetd', ['-d', conf], { stdio: 'ignore', detached: true }));
  t.teardown(() => stopGroup(inetd));
  const deadline = Date.now() + 60_000; // the program starts and binds: seconds under load
  for (;;) {
    try {
      (await Wire.open(port)).close();
      break;
    } catch (e) {
      if (Date.now() > deadline) throw e;
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  const times: number[] = [];
  for (let i = 1; i <= 3; i++) times.push((await failOnce(port, inst, i)).ms);
  t.ok((times[0] ?? 0) >= 200, `first failure ${times[0]} ms`);
  t.ok((times[1] ?? 0) >= 400, `second failure (another process) ${times[1]} ms: 2x`);
  t.ok((times[2] ?? 0) >= 800, `third failure (another process) ${times[2]} ms: 4x`);
  const pids = new Set((await logLines(inst, /imap-login: auth failed/, 3)).map((l) => /pigeon\[(\d+)\]/.exec(l)?.[1]));
  t.equal(pids.size, 3, 'three processes');
  // the one-shot processes started one service for the node, detached
  const st = await nodeState(t, inst);
  t.teardown(() => {
    try {
      process.kill(st.pid, 'SIGTERM');
    } catch {
      /* gone */
    }
  });
  t.equal(st.counts.penalties, 1, 'one penalty entry, for 127.0.0.1');
  const services = execFileSync('pgrep', ['-f', `pigeon-anvil ${join(inst.dir, 'run')}`], { encoding: 'utf8' }).trim().split('\n');
  t.same(services, [String(st.pid)], 'one node state service for the instance');
});

t.test('failure delay: doubles across Postfix spawn(8) processes running as an unprivileged user', async (t) => {
  if (!requireProgram(t, '/usr/sbin/postfix', 'postfix')) return;
  const inst = makeInstance(t, {});
  writeFileSync(join(inst.dir, 'conf.d', '60-delay.yaml'), 'limits:\n  auth_failure_delay_ms: 200\n');
  await addUsers(inst, 1);
  // spawn(8) refuses root: pigeon runs as `mail`, which then owns the instance (and its run_dir)
  const chown = (p: string): void => {
    chownSync(p, 8, 8);
    if (statSync(p).isDirectory()) for (const e of readdirSync(p)) chown(join(p, e));
  };
  chown(inst.dir);
  const port = await freePort();
  startPostfix(t, `127.0.0.1:${port} inet n n n - 100 spawn -o command_time_limit=86400s -o daemon_timeout=86400s user=mail argv=${process.execPath} ${CLI} -c ${inst.dir} imap --forker postfix\n`);
  const deadline = Date.now() + 60_000; // the program starts and binds: seconds under load
  for (;;) {
    try {
      const w = await Wire.open(port);
      await w.until(/\r\n/);
      w.close();
      break;
    } catch (e) {
      if (Date.now() > deadline) throw e;
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  const a = await failOnce(port, inst, 1);
  const b = await failOnce(port, inst, 2);
  t.ok(a.ms >= 200, `first failure ${a.ms} ms`);
  t.ok(b.ms >= 400, `second failure, another process: ${b.ms} ms (2x)`);
  t.not(a.pid, b.pid, 'two processes');
  const run = join(inst.dir, 'run');
  t.equal(statSync(run).uid, 8, 'run_dir created by the spawn user');
  const pids = spawnSync('pgrep', ['-f', `pigeon-anvil ${run}`], { encoding: 'utf8' }).stdout.trim().split('\n').filter((x) => x !== '');
  t.teardown(() => pids.forEach((p) => process.kill(Number(p), 'SIGTERM')));
  t.equal(pids.length, 1, 'one node state service');
  t.match(readFileSync(`/proc/${pids[0] ?? 0}/status`, 'utf8'), /^Uid:\s+8\s/m, 'running as the spawn user, not root');
});

t.test('serve with a port in use: exit 75, one line, nothing left running', async (t) => {
  const busy = createServer();
  await new Promise<void>((r) => busy.listen(0, '127.0.0.1', r));
  t.teardown(() => busy.close());
  const addr = busy.address();
  const port = typeof addr === 'object' && addr ? addr.port : 0;
  for (const workers of [1, 2]) {
    const inst = makeInstance(t, { listen: [`imap=127.0.0.1:${port}`] });
    const child = owned(spawn(process.execPath, [CLI, '-c', inst.dir, 'serve', '--workers', String(workers)], { stdio: ['ignore', 'ignore', 'pipe'], detached: true }));
    let err = '';
    child.stderr?.setEncoding('utf8').on('data', (d: string) => (err += d));
    const code = await new Promise<number | null>((r) => child.once('exit', (c) => r(c)));
    t.equal(code, 75, `--workers ${workers}: exit 75`);
    t.equal(err, `pigeon: error: cannot listen on imap=127.0.0.1:${port}: EADDRINUSE\n`, `--workers ${workers}: one line on stderr, no stack trace`);
    const left = spawnSync('pgrep', ['-f', inst.dir], { encoding: 'utf8' }).stdout.trim();
    t.equal(left, '', `--workers ${workers}: no process of that instance left`);
    t.notOk(existsSync(join(inst.dir, 'run', 'anvil.sock')), `--workers ${workers}: the node state service's socket is gone`);
  }
});

