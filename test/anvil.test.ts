// The node state service on its own: client keys from parsed addresses (IPv6 /48) and the
// proxy's loopback test on them (src/proxy/conn.ts), trusted
// networks, the record table (per-IP eviction, global eviction, user+IP slots), and the service
// process itself — two starters at once end with one service, a stale socket file is replaced,
// an idle service exits, a removed socket stops it, and a client that cannot reach any service
// falls back to per-process state and says so once.
import t from 'tap';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { connect, createServer } from 'node:net';
import { clientKey, NetworkList, canonicalIp } from '../src/ip.js';
import { isLoopback, unmapIp as unmap } from '../src/ip.js';
import { AnvilState } from '../src/anvil/state.js';
import { AnvilClient } from '../src/anvil/client.js';
import { openRunDir } from '../src/anvil/run-dir.js';
import { ROOT, CLI, makeInstance, scratchDir } from './helpers/instance.js';
import { owned } from './helpers/reaper.js';
import { createRequire } from 'node:module';
import type * as Ipaddr from 'ipaddr.js';
import { parseReply, parseRequest, replySchema, requestSchema } from '../src/anvil/protocol.js';

const MAIN = join(ROOT, 'dist', 'src', 'anvil', 'main.js');

t.test('penalty keys come from the parsed address: IPv6 /48, IPv4-mapped as IPv4', async (t) => {
  t.equal(clientKey('2001:db8::1'), clientKey('2001:db8::2'), '2001:db8::1 and 2001:db8::2 share a /48');
  t.equal(clientKey('2001:db8::1'), clientKey('2001:db8:0:1::5'), '2001:db8:0:1::5 is in the same /48');
  t.equal(clientKey('2001:db8::1'), clientKey('2001:0DB8:0000:0000:0000:0000:0000:0001'), 'the uncompressed spelling is the same address');
  t.not(clientKey('2001:db8::1'), clientKey('2001:db9::1'), '2001:db9::1 is another /48');
  t.not(clientKey('2001:db8::1'), clientKey('2001:db8:1::1'), '2001:db8:1::/48 is another /48');
  t.equal(clientKey('2001:db8::1'), '2001:db8::/48');
  t.equal(clientKey('::ffff:192.0.2.7'), '192.0.2.7', 'IPv4-mapped IPv6 is the IPv4 address');
  t.equal(clientKey('192.0.2.7'), '192.0.2.7');
  t.not(clientKey('192.0.2.7'), clientKey('192.0.2.8'), 'IPv4 addresses are counted one by one');
  t.equal(clientKey(''), '', 'no address (a local pipe) keys as itself');
  t.equal(canonicalIp('::ffff:10.1.2.3'), '10.1.2.3');
});

t.test('connection addresses are parsed, not matched as text: the loopback test and the logged form', async (t) => {
  // login.plaintext=loopback trusts exactly these: 127.0.0.0/8 and ::1, however spelled
  for (const a of ['127.0.0.1', '127.5.6.7', '::1', '0:0:0:0:0:0:0:1', '0000::0001', '::ffff:127.0.0.1', '::ffff:7f00:1', '::FFFF:127.0.0.2']) t.ok(isLoopback(unmap(a)), `${a} is loopback`);
  for (const a of ['10.0.0.1', '::ffff:10.0.0.1', '::2', 'fe80::1', '2001:db8::1', '128.0.0.1', '::127.0.0.1', 'localhost', '127.0.0.1.example']) t.notOk(isLoopback(unmap(a)), `${a} is not loopback`);
  t.ok(isLoopback(unmap(undefined)), 'no address (a unix socket) is local');
  t.equal(unmap('::ffff:7f00:1'), '127.0.0.1', 'an IPv4-mapped address in hex is logged as IPv4');
  t.equal(unmap('::FFFF:192.0.2.7'), '192.0.2.7', 'in upper case too');
  t.equal(unmap('2001:0DB8:0000:0000:0000:0000:0000:0001'), '2001:db8::1', 'IPv6 in its canonical form');
  t.equal(unmap('::127.0.0.1'), '::7f00:1', 'an IPv4-compatible address (::/96, as inet_ntop prints it) is no IPv4-mapped one');
  t.not(clientKey('::192.0.2.7'), clientKey('192.0.2.7'), 'nor does it share the IPv4 address\'s penalty');
});

t.test('a socket\'s IPv4 address is answered without parsing exactly as ipaddr.js would answer it', async (t) => {
  const ipaddr = createRequire(import.meta.url)('ipaddr.js') as typeof Ipaddr;
  const octets = [0, 1, 9, 10, 99, 100, 127, 199, 200, 249, 250, 255];
  let n = 0;
  for (const a of octets)
    for (const b of [0, 255, 7])
      for (const d of octets) {
        const ip = `${a}.${b}.${a === 127 ? 1 : 2}.${d}`;
        const parsed = ipaddr.parse(ip);
        if (canonicalIp(ip) !== parsed.toString() || clientKey(ip) !== parsed.toString() || isLoopback(ip) !== (parsed.range() === 'loopback')) t.fail(`${ip}: ${canonicalIp(ip)} ${clientKey(ip)} ${isLoopback(ip)}`);
        n++;
      }
  t.equal(n, 432, 'every address was compared');
  // not a socket's spelling: parsed as before
  t.equal(canonicalIp('010.1.2.3'), ipaddr.parse('010.1.2.3').toString(), 'a leading zero is parsed (ipaddr.js reads it as octal)');
  t.equal(canonicalIp('256.1.2.3'), '256.1.2.3', 'no address: itself');
  t.notOk(isLoopback('127.0.0.1.example'), 'not an address');
});

t.test('the node state protocol: the hand check of hot requests and replies gives what the schemas give', async (t) => {
  const same = (what: string, v: unknown, fast: (v: unknown) => unknown, schema: { parse(v: unknown): unknown }): void => {
    let a: unknown;
    let b: unknown;
    try {
      a = { ok: fast(v) };
    } catch {
      a = 'refused';
    }
    try {
      b = { ok: schema.parse(v) };
    } catch {
      b = 'refused';
    }
    t.same(a, b, `${what}: ${JSON.stringify(v)}`);
  };
  const long = 'x'.repeat(1025);
  const requests: unknown[] = [
    { id: 1, op: 'conn.open', conn: '7', ip: '127.0.0.1', proto: 'imap', trusted: false, max_per_ip: 10, max_total: 1000 },
    { id: 1, op: 'conn.open', conn: '7', ip: '127.0.0.1', proto: 'imap', trusted: 'no', max_per_ip: 10, max_total: 1000 },
    { id: 1, op: 'conn.open', conn: '7', ip: '127.0.0.1', proto: 'imap', trusted: false, max_per_ip: -1, max_total: 1000 },
    { id: 1, op: 'conn.open', conn: '7', ip: '127.0.0.1', proto: 'imap', trusted: false, max_per_ip: 1.5, max_total: 1000 },
    { id: 1, op: 'conn.open', conn: '7', ip: '127.0.0.1', proto: 'imap', trusted: false, max_per_ip: 10 },
    { id: 1, op: 'conn.open', conn: long, ip: '127.0.0.1', proto: 'imap', trusted: false, max_per_ip: 10, max_total: 1000 },
    { id: 2, op: 'conn.login', conn: '7', user: 'bob@example.test', session: 'abc', max_userip: 10, extra: 'dropped' },
    { id: 2, op: 'conn.login', conn: '7', user: 'x'.repeat(1024), session: 'abc', max_userip: 100_000_000 },
    { id: 2, op: 'conn.login', conn: '7', user: 'bob', session: 'abc', max_userip: 100_000_001 },
    { id: 3, op: 'conn.held', conn: '7', held: false },
    { id: 3, op: 'conn.held', conn: '7', held: 0 },
    { id: 4, op: 'conn.close', conn: '7' },
    { id: 4, op: 'conn.close', conn: 7 },
    { id: 5, op: 'conn.logout', conn: '7' },
    { id: 6, op: 'penalty.get', key: '127.0.0.1' },
    { id: 6, op: 'penalty.fail', key: '2001:db8::/48' },
    { id: 6, op: 'penalty.clear', key: null },
    { id: 7, op: 'conn.backend', conn: '7', backend: 'dovecot' },
    { id: -1, op: 'conn.close', conn: '7' },
    { id: '1', op: 'conn.close', conn: '7' },
    { op: 'conn.close', conn: '7' },
    { id: 8, op: 'hello', pid: 42, role: 'worker' },
    { id: 8, op: 'list' },
    { id: 8, op: 'kick', user: 'bob' },
    { id: 8, op: 'toString', conn: '7' },
    { id: 8, op: '__proto__', conn: '7' },
    { id: 8, op: 'nope' },
    [{ id: 1, op: 'conn.close', conn: '7' }],
    null,
    'conn.close',
  ];
  for (const r of requests) same('request', r, parseRequest, requestSchema);
  const replies: unknown[] = [
    { id: 1, result: {} },
    { id: 1, result: { admitted: true, evicted: 0 }, extra: 1 },
    { id: 1, result: [] },
    { id: 1, result: null },
    { id: 1.5, result: {} },
    { id: 1, error: 'unknown' },
    { ev: 'end', conn: '7', reason: 'evicted' },
    { ev: 'start', conn: '7', reason: 'evicted' },
    {},
    [],
  ];
  for (const r of replies) same('reply', r, parseReply, replySchema);
});

t.test('trusted networks: CIDR lists of both families, mapped addresses, bad entries refused', async (t) => {
  const n = new NetworkList(['192.0.2.0/24', '2001:db8::/32', '198.51.100.7']);
  t.ok(n.has('192.0.2.200'));
  t.ok(n.has('::ffff:192.0.2.1'), 'an IPv4-mapped client address matches the IPv4 network');
  t.ok(n.has('2001:db8:ffff::1'));
  t.ok(n.has('198.51.100.7'), 'a single address is a /32');
  t.notOk(n.has('198.51.100.8'));
  t.notOk(n.has('192.0.3.1'));
  t.notOk(n.has('2001:db9::1'));
  t.notOk(n.has(''), 'no address matches nothing');
  t.throws(() => new NetworkList(['192.0.2.0/33']), /not a CIDR network/);
  t.throws(() => new NetworkList(['example.org']), /not an IP address/);
});

t.test('records: per-IP and global limits evict the oldest unauthenticated connection', async (t) => {
  const s = new AnvilState();
  const lim = { perIp: 3, total: 5 };
  const c = { ip: '192.0.2.1', proto: 'imap', trusted: false };
  for (const id of ['a', 'b', 'c']) t.match(s.open(1, 11, id, c, lim, 0), { admitted: true, evicted: [] });
  const r = s.open(2, 22, 'd', c, lim, 1);
  t.match(r, { admitted: true, evicted: [{ owner: 1, conn: 'a' }] }, 'the 4th from one address evicts the oldest of that address');
  t.equal(s.counts(0).preauth, 3);
  // logged-in sessions never count per IP
  t.match(s.login(1, 'b', 'u1@x', 's1', 10), { ok: true });
  t.match(s.open(1, 11, 'e', c, lim, 2), { admitted: true, evicted: [] }, 'a login frees its per-IP place');
  // trusted addresses are exempt from the per-IP count
  for (const id of ['t1', 't2', 't3', 't4']) s.close(3, id);
  t.equal(s.total(), 4, 'sessions (held) and preauth count in all');
  const trusted = { ip: '198.51.100.1', proto: 'imap', trusted: true };
  const g = s.open(3, 33, 't1', trusted, lim, 3);
  t.match(g, { admitted: true, evicted: [] });
  const g2 = s.open(3, 33, 't2', trusted, lim, 4);
  t.match(g2, { admitted: true, evicted: [{ conn: 'c' }] }, 'the global limit evicts the oldest preauth of the node');
  // handed-off sessions do not count in all
  s.setHeld(1, 'b', false);
  t.equal(s.total(), 4);
  // only sessions left: a full node refuses
  const full = new AnvilState();
  full.open(1, 1, 'x', c, { perIp: 9, total: 1 }, 0);
  full.login(1, 'x', 'u@x', 's', 10);
  t.match(full.open(1, 1, 'y', c, { perIp: 9, total: 1 }, 1), { admitted: false, why: 'max_connections' }, 'nothing unauthenticated to evict: refused');
  t.equal(s.dropOwner(1), 2, 'an owner that goes away takes its records along');
});

t.test('records: sessions per user+IP', async (t) => {
  const s = new AnvilState();
  const lim = { perIp: 100, total: 100 };
  for (let i = 0; i < 3; i++) {
    s.open(1, 1, `c${i}`, { ip: '192.0.2.1', proto: 'imap', trusted: false }, lim, i);
    t.match(s.login(1, `c${i}`, 'alice@x', `s${i}`, 3), { ok: true });
  }
  s.open(1, 1, 'c3', { ip: '192.0.2.1', proto: 'pop3', trusted: false }, lim, 3);
  t.match(s.login(1, 'c3', 'alice@x', 's3', 3), { ok: false, why: 'userip', count: 3 }, 'the 4th session of alice from that address is refused');
  s.open(1, 1, 'o', { ip: '192.0.2.2', proto: 'imap', trusted: false }, lim, 4);
  t.match(s.login(1, 'o', 'alice@x', 'so', 3), { ok: true }, 'another address has its own count');
  s.close(1, 'c0');
  t.match(s.login(1, 'c3', 'alice@x', 's3', 3), { ok: true }, 'a closed session frees its slot');
  t.match(s.login(1, 'gone', 'alice@x', 's', 3), { ok: false, why: 'gone' });
  t.same(
    s.list({ user: 'alice@x' }).map((r) => r.session).sort(),
    ['s1', 's2', 's3', 'so'],
    'records list the sessions of a user (who/kick later)',
  );
});

/** Start the service as a one-shot process would: detached main.js, its answer on fd 3. */
function startService(dir: string, idleMs = 60_000): { child: ChildProcess; said: Promise<string> } {
  const child = owned(spawn(process.execPath, [MAIN, dir, '--idle-ms', String(idleMs)], { stdio: ['ignore', 'ignore', 'inherit', 'pipe'], detached: true }));
  const pipe = child.stdio[3];
  const said = new Promise<string>((resolve) => {
    let s = '';
    pipe?.on('data', (d: Buffer) => (s += d.toString()));
    pipe?.on('close', () => resolve(s.trim()));
  });
  return { child, said };
}

function exited(c: ChildProcess): Promise<number | null> {
  return c.exitCode !== null ? Promise.resolve(c.exitCode) : new Promise((r) => c.once('exit', (code) => r(code)));
}

function newClient(dir: string, autostart = false): { client: AnvilClient; logs: string[] } {
  const logs: string[] = [];
  const client = new AnvilClient({ runDir: dir, role: 'test', autostart, servicePath: MAIN, log: (level, msg) => logs.push(`${level}: ${msg}`) });
  return { client, logs };
}

t.test('service: two starters at once end with one service', async (t) => {
  const dir = join(scratchDir(t), 'run');
  mkdirSync(dir, { mode: 0o700 });
  const a = startService(dir);
  const b = startService(dir);
  t.teardown(() => {
    a.child.kill();
    b.child.kill();
  });
  const [sa, sb] = await Promise.all([a.said, b.said]);
  t.same([sa, sb].sort(), ['ready', 'taken'], 'one serves, the other finds it serving and leaves');
  t.equal(await exited(sa === 'taken' ? a.child : b.child), 0, 'the second starter exits 0');
  const sock = statSync(join(dir, 'anvil.sock'));
  t.ok(sock.isSocket(), 'the socket exists');
  t.equal(sock.mode & 0o777, 0o660, 'mode 0660');
  // both clients reach the same state
  const c1 = newClient(dir).client;
  const c2 = newClient(dir).client;
  t.teardown(() => {
    c1.shutdown();
    c2.shutdown();
  });
  t.equal(await c1.penaltyFail('192.0.2.9'), 1);
  t.equal(await c2.penaltyFail('192.0.2.9'), 2, 'a failure counted by one process is seen by the next');
  t.ok(c1.shared && c2.shared);
});

t.test('service: a stale socket file is replaced; a removed socket stops the service', async (t) => {
  const dir = join(scratchDir(t), 'run');
  mkdirSync(dir, { mode: 0o700 });
  // a service that was killed leaves its socket file behind
  const killed = startService(dir);
  t.equal(await killed.said, 'ready');
  killed.child.kill('SIGKILL');
  await exited(killed.child);
  t.ok(existsSync(join(dir, 'anvil.sock')), 'the killed service left its socket file');
  const rd = openRunDir(dir, { create: false });
  t.teardown(() => rd.close());
  const refused = await new Promise<string>((r) => connect(rd.at('anvil.sock')).once('error', (e: NodeJS.ErrnoException) => r(e.code ?? '')).once('connect', () => r('connected')));
  t.equal(refused, 'ECONNREFUSED', 'nobody listens on it');
  const next = startService(dir);
  t.teardown(() => next.child.kill());
  t.equal(await next.said, 'ready', 'a new service replaces the stale file');
  const { client } = newClient(dir);
  t.teardown(() => client.shutdown());
  t.equal(await client.penaltyFail('x'), 1);
  t.ok(client.shared, 'and serves');
  client.shutdown();
  rmSync(join(dir, 'anvil.sock'));
  t.equal(await exited(next.child), 0, 'its socket removed (the instance deleted), the service exits');
});

t.test('service: an auto-started service exits when idle', async (t) => {
  const dir = join(scratchDir(t), 'run');
  mkdirSync(dir, { mode: 0o700 });
  const s = startService(dir, 0);
  t.teardown(() => s.child.kill());
  t.equal(await s.said, 'ready');
  const { client } = newClient(dir);
  await client.penaltyGet('x');
  client.shutdown();
  t.equal(await exited(s.child), 0, 'no client, no record, no penalty: it exits');
  t.notOk(existsSync(join(dir, 'anvil.sock')), 'and removes its socket');
});

t.test('client: a service that stops answering → the waiting requests are answered per process after ANVIL_REQUEST_MS, said once', async (t) => {
  const dir = join(scratchDir(t), 'run');
  mkdirSync(dir, { mode: 0o700 });
  // a service that takes the connection and reads the requests, and never answers
  const heard: string[] = [];
  const silent = createServer((s) => s.on('data', (d: Buffer) => heard.push(d.toString())));
  // through the checked directory's descriptor, as the service does (the path is too long for a socket)
  const rd = openRunDir(dir, { create: false });
  await new Promise<void>((r) => silent.listen(rd.at('anvil.sock'), r));
  t.teardown(() => {
    silent.close();
    rd.close();
  });
  const { client, logs } = newClient(dir);
  t.teardown(() => client.shutdown());
  const first = client.penaltyFail('192.0.2.1');
  const second = client.penaltyGet('192.0.2.1');
  t.equal(await first, 1, 'the failure is counted per process');
  t.equal((await second).count, 1, 'and the lookup waiting with it sees it');
  t.notOk(client.shared);
  t.ok(heard.join('').includes('"op":"penalty.fail"'), 'the requests had reached the service');
  t.equal(logs.length, 1, 'said once');
  t.match(logs[0], /lost the node state service \(no answer within 5000 ms\).*per process until it is back/);
});

t.test('client: an answered request leaves no timer that keeps a one-shot process alive', async (t) => {
  const dir = join(scratchDir(t), 'run');
  mkdirSync(dir, { mode: 0o700 });
  const svc = startService(dir);
  t.teardown(() => svc.child.kill());
  t.equal(await svc.said, 'ready');
  const script = `
    import { AnvilClient } from ${JSON.stringify(join(ROOT, 'dist', 'src', 'anvil', 'client.js'))};
    const c = new AnvilClient({ runDir: ${JSON.stringify(dir)}, role: 'test', autostart: false, log: () => {} });
    const before = process.getActiveResourcesInfo().filter((r) => r === 'Timeout').length;
    await c.penaltyFail('192.0.2.1');
    await Promise.all([c.penaltyGet('192.0.2.1'), c.penaltyClear('192.0.2.1')]);
    console.log(JSON.stringify({ shared: c.shared, timers: process.getActiveResourcesInfo().filter((r) => r === 'Timeout').length - before }));`;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8' });
  t.equal(r.status, 0, r.stderr);
  t.same(JSON.parse(r.stdout), { shared: true, timers: 0 }, 'answered by the service, no timer left referenced');
});

t.test('client: no service reachable → per-process state, logged once, nothing refused', async (t) => {
  const base = scratchDir(t);
  const open = join(base, 'world-writable');
  mkdirSync(open);
  chmodSync(open, 0o777);
  const { client, logs } = newClient(open, true);
  t.teardown(() => client.shutdown());
  t.equal(await client.penaltyFail('192.0.2.1'), 1);
  t.equal(await client.penaltyFail('192.0.2.1'), 2, 'the penalty still counts, per process');
  t.match(await client.open('1', { ip: '192.0.2.1', proto: 'imap', trusted: false }, { perIp: 5, total: 5 }, { ended: () => {} }), { admitted: true }, 'connections are admitted');
  t.notOk(client.shared);
  t.equal(logs.length, 1, 'said once');
  t.match(logs[0], /run_dir .*world-writable: writable by .*per process until it is back/);
  t.notOk(existsSync(join(open, 'anvil.sock')), 'nothing was created in a directory others can write to');
});

t.test('client: starts the service when none runs, in a run directory it creates', async (t) => {
  const dir = join(scratchDir(t), 'run');
  const { client, logs } = newClient(dir, true);
  t.teardown(() => client.shutdown());
  t.equal(await client.penaltyFail('192.0.2.1'), 1);
  t.ok(client.shared, 'the auto-started service answers');
  t.same(logs, []);
  t.equal(statSync(dir).mode & 0o777, 0o700, 'run_dir created 0700');
  const list = await client.list();
  t.equal(list.counts.penalties, 1);
  t.ok(list.pid > 0 && list.pid !== process.pid, 'a service process of its own');
  client.shutdown();
  process.kill(list.pid, 'SIGTERM');
});

t.test('a one-shot process whose run_dir is unusable still logs users in, and says why once', async (t) => {
  const inst = makeInstance(t, { users: { 'alice@example.test': 'pw' } });
  const open = join(inst.dir, 'open-run');
  mkdirSync(open);
  chmodSync(open, 0o777);
  writeFileSync(join(inst.dir, 'conf.d', '60-run.yaml'), `run_dir: ${open}\n`);
  const r = spawnSync(process.execPath, [CLI, '-c', inst.dir, 'imap', '--forker', 'stdio'], { input: 'a1 LOGIN alice@example.test wrong\r\na2 LOGIN alice@example.test pw\r\na3 LOGOUT\r\n', encoding: 'utf8' });
  t.equal(r.status, 0);
  t.match(r.stdout, /a1 NO \[AUTHENTICATIONFAILED\][\s\S]*a2 OK \[CAPABILITY/, 'the failure delay still applies (per process) and the login works');
  const log = readFileSync(join(inst.dir, 'pigeon.log'), 'utf8');
  const warnings = log.split('\n').filter((l) => /anvil: Warning: run_dir .*open-run: writable by its group and others \(mode 777\).*per process until it is back/.test(l));
  t.equal(warnings.length, 1, 'one warning for the whole session');
  t.notOk(existsSync(join(open, 'anvil.sock')), 'no socket in a directory anyone can write to');
});
