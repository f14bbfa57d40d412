// The PROXY protocol behind a real HAProxy (issue #17 item 2): listeners marked `,proxy` take v1
// (`send-proxy`) and v2 (`send-proxy-v2`) headers, on imaps before the TLS handshake, only from
// limits.trusted_proxies. Clients connect to HAProxy from other loopback addresses (127.0.0.5 …),
// HAProxy to pigeon from 127.0.0.1: the address the header names must be the one in pigeon's log,
// Dovecot's log, the failure delay and the per-IP limit.
import t from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { ImapFlow } from 'imapflow';
import { makeInstance, serve, freePort, type Inst } from './helpers/instance.js';
import { useBackend } from './helpers/backends.js';
import { requireProgram } from './helpers/programs.js';
import { owned, stopGroup } from './helpers/reaper.js';
import { Wire } from './helpers/wire.js';

const HAPROXY = '/usr/sbin/haproxy';
if (!requireProgram(t, HAPROXY, 'haproxy')) process.exit(process.env['PIGEON_TEST_ALLOW_MISSING'] === '1' ? 0 : 1);

const DELAY = 1500;
const inst = makeInstance(t, {
  listen: ['imap=127.0.0.1:0,proxy', 'imaps=127.0.0.1:0,proxy', 'lmtp=127.0.0.1:0,proxy'],
  users: { 'alice@example.test': 'secret' },
  conf: '  trusted_proxies: [127.0.0.1/32]\n  proxy_header_timeout_s: 2\n  preauth_per_ip: 2\n',
});
if (!useBackend(t, inst, 'dovecot')) process.exit(1);
writeFileSync(join(inst.dir, 'conf.d', '60-delay.yaml'), `limits:\n  auth_failure_delay_ms: ${DELAY}\n  auth_failure_delay_max_ms: ${DELAY}\n`);
const srv = await serve(t, inst);
const port = (p: string): number => {
  const n = srv.ports[p];
  if (n === undefined) throw new Error(`no ${p} listener: ${srv.stderr()}`);
  return n;
};

// HAProxy in front: one frontend per case, each forwarding to a pigeon listener
// beside the instance (a second t.testdir() would be the same directory, emptied)
const hdir = join(inst.dir, '..', 'haproxy');
mkdirSync(hdir);
const fe = { v1: await freePort(), v2: await freePort(), tls: await freePort(), lmtp: await freePort(), untrusted: await freePort() };
const cfg = `global
  maxconn 200
defaults
  mode tcp
  timeout connect 30s
  timeout client 120s
  timeout server 120s
listen imap_v1
  bind 127.0.0.1:${fe.v1}
  server pigeon 127.0.0.1:${port('imap')} send-proxy
listen imap_v2
  bind 127.0.0.1:${fe.v2}
  server pigeon 127.0.0.1:${port('imap')} send-proxy-v2
listen imaps_v2
  bind 127.0.0.1:${fe.tls}
  server pigeon 127.0.0.1:${port('imaps')} send-proxy-v2
listen lmtp_v1
  bind 127.0.0.1:${fe.lmtp}
  server pigeon 127.0.0.1:${port('lmtp')} send-proxy
listen imap_untrusted
  bind 127.0.0.1:${fe.untrusted}
  server pigeon 127.0.0.1:${port('imap')} source 127.0.0.3 send-proxy-v2
`;
writeFileSync(join(hdir, 'haproxy.cfg'), cfg);
const check = spawnSyncText(HAPROXY, ['-c', '-f', join(hdir, 'haproxy.cfg')]);
if (check.status !== 0) throw new Error(`haproxy -c refused the test configuration: ${check.text}`);
let hlog = '';
const haproxy = owned(spawn(HAPROXY, ['-db', '-f', join(hdir, 'haproxy.cfg')], { stdio: ['ignore', 'pipe', 'pipe'], detached: true }));
haproxy.stdout?.on('data', (d: Buffer) => (hlog += d.toString('utf8')));
haproxy.stderr?.on('data', (d: Buffer) => (hlog += d.toString('utf8')));
haproxy.once('exit', (code, sig) => (hlog += `haproxy exited (${code ?? sig})\n`));
t.teardown(() => stopGroup(haproxy));
// ready when every frontend accepts a connection (bounded poll: HAProxy has no readiness signal in -db mode)
for (const p of Object.values(fe)) await waitListening(p, 60_000, () => hlog);

function spawnSyncText(cmd: string, args: string[]): { status: number | null; text: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  return { status: r.status, text: `${r.stdout}${r.stderr}` };
}

async function waitListening(p: number, ms: number, why: () => string): Promise<void> {
  const deadline = Date.now() + ms;
  for (;;) {
    const ok = await new Promise<boolean>((res) => {
      // from an address of its own, which no case below looks for
      const s = connect({ port: p, host: '127.0.0.1', localAddress: '127.0.0.99' });
      s.once('connect', () => {
        s.destroy();
        res(true);
      });
      s.once('error', () => res(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`haproxy did not listen on ${p}: ${why()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function logText(i: Inst): string {
  try {
    return readFileSync(join(i.dir, 'pigeon.log'), 'utf8');
  } catch {
    return '';
  }
}

/** Wait until the log has `n` lines matching `re` (the bound only stops a hang). */
async function logLines(re: RegExp, n = 1, ms = 60_000): Promise<string[]> {
  const deadline = Date.now() + ms;
  for (;;) {
    const lines = logText(inst)
      .split('\n')
      .filter((l) => re.test(l));
    if (lines.length >= n || Date.now() > deadline) return lines;
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** A raw client from `localAddress`. */
async function wire(p: number, localAddress: string): Promise<Wire> {
  const s: Socket = connect({ port: p, host: '127.0.0.1', localAddress });
  await new Promise<void>((res, rej) => {
    s.once('connect', () => res());
    s.once('error', rej);
  });
  return new Wire(s);
}

function client(p: number, localAddress: string, secure = false): ImapFlow {
  // imapflow hands its tls options to net.connect / tls.connect: localAddress picks the source
  return new ImapFlow({ host: '127.0.0.1', port: p, secure, tls: { rejectUnauthorized: false, localAddress } as never, auth: { user: 'alice@example.test', pass: 'secret' }, logger: false });
}

t.test('v1 and v2 through HAProxy: the client address is the one in the logs, Dovecot\'s included', async (t) => {
  t.match(srv.stderr(), /listening imap 127\.0\.0\.1:\d+ \(PROXY protocol\)/, 'the banner says which listeners expect a PROXY header');
  for (const [name, p, ip] of [
    ['send-proxy (v1)', fe.v1, '127.0.0.5'],
    ['send-proxy-v2', fe.v2, '127.0.0.6'],
  ] as const) {
    const c = client(p, ip);
    await c.connect();
    const lock = await c.getMailboxLock('INBOX');
    lock.release();
    await c.logout();
    const esc = ip.replace(/\./g, '\\.');
    const login = await logLines(new RegExp(`imap-login: Login: user=<alice@example\\.test>, method=\\w+, rip=${esc}, lip=127\\.0\\.0\\.1`));
    t.equal(login.length, 1, `${name}: pigeon logs the login with rip=${ip}`);
    const dovecot = await logLines(new RegExp(`imap\\(alice@example\\.test\\): Info: Disconnected: Logged out .*: rip=${esc}$`));
    t.ok(dovecot.length >= 1, `${name}: Dovecot's own log line carries ${ip} (the IP it was given)`);
  }
  t.notMatch(logText(inst), /rip=127\.0\.0\.1[,\s]/, 'no session was logged with HAProxy\'s address');
});

t.test('imaps: the PROXY v2 header comes before the TLS handshake', async (t) => {
  const c = client(fe.tls, '127.0.0.7', true);
  await c.connect();
  await c.logout();
  const login = await logLines(/imap-login: Login: user=<alice@example\.test>.*rip=127\.0\.0\.7.*TLS/);
  t.equal(login.length, 1, 'the TLS login is logged with rip=127.0.0.7');
});

t.test('refused: not from limits.trusted_proxies, no header, a malformed header', async (t) => {
  // HAProxy connecting from 127.0.0.3, which is not a trusted proxy
  const untrustedRe = /Connection refused \(PROXY: not from limits\.trusted_proxies\):.*rip=127\.0\.0\.3/;
  const before = (await logLines(untrustedRe, 0)).length; // HAProxy's readiness probe was one
  const c = client(fe.untrusted, '127.0.0.5');
  c.on('error', () => undefined);
  await t.rejects(c.connect(), 'a header from an untrusted address gets no session');
  t.equal((await logLines(untrustedRe, before + 1)).length, before + 1, 'logged with the untrusted address');

  // straight to the listener, no header: an IMAP client waits for the greeting, and gets none
  const d = client(port('imap'), '127.0.0.1');
  d.on('error', () => undefined);
  await t.rejects(d.connect(), 'a client without a header gets no greeting and is closed');
  t.equal((await logLines(/Connection refused \(PROXY: no PROXY header within 2 s\)/)).length, 1, 'the missing header is logged once the header timeout trips');

  const w = await wire(port('imap'), '127.0.0.1');
  w.write('a1 LOGIN alice@example.test secret\r\n');
  t.ok(await w.waitClosed(), 'IMAP instead of a header: closed');
  t.equal(await w.until(/(?!)/, 0), '', 'and nothing was said to it');
  t.equal((await logLines(/Connection refused \(PROXY: no PROXY header\):/)).length, 1, 'logged');

  for (const [what, bytes, re] of [
    ['a bad address', 'PROXY TCP4 300.1.2.3 127.0.0.1 1234 143\r\n', /PROXY: malformed v1 header/],
    ['an endless v1 line', `PROXY TCP4 ${'1'.repeat(200)}`, /PROXY: v1 header longer than 107 bytes/],
    ['an oversized v2 header', Buffer.concat([Buffer.from('0d0a0d0a000d0a515549540a2111ffff', 'hex'), Buffer.alloc(64)]), /PROXY: v2 header of 65551 bytes/],
  ] as const) {
    const m = await wire(port('imap'), '127.0.0.1');
    m.write(bytes);
    t.ok(await m.waitClosed(), `${what}: closed`);
    t.equal((await logLines(re)).length, 1, `${what}: logged`);
  }
});

t.test('the failure delay counts per real client address', async (t) => {
  // three failures from 127.0.0.8: from then on its next attempt also waits before the check
  const a = await wire(fe.v2, '127.0.0.8');
  await a.until(/^\* OK.*\r\n/);
  for (let i = 1; i <= 3; i++) {
    a.write(`f${i} LOGIN alice@example.test wrong\r\n`);
    t.match(await a.until(new RegExp(`f${i} NO.*\\r\\n`)), /NO \[AUTHENTICATIONFAILED\]/, `failure ${i} from 127.0.0.8`);
  }
  a.close();
  t.equal((await logLines(/auth failed \(bad-credentials\).*rip=127\.0\.0\.8/, 3)).length, 3, 'each failure is logged with rip=127.0.0.8');
  const timed = async (ip: string): Promise<number> => {
    const w = await wire(fe.v2, ip);
    await w.until(/^\* OK.*\r\n/);
    const start = Date.now();
    w.write('g1 LOGIN alice@example.test wrong\r\n');
    await w.until(/g1 NO.*\r\n/);
    w.close();
    return Date.now() - start;
  };
  const penalised = await timed('127.0.0.8');
  t.ok(penalised >= 2 * DELAY - 50, `127.0.0.8 waits its penalty and the failure delay (${penalised} ms >= ${2 * DELAY} ms)`);
  const fresh = await timed('127.0.0.9');
  // against the baseline measured here (the penalised address), not a fixed bound: load slows both
  t.ok(fresh >= DELAY - 50 && fresh < penalised, `127.0.0.9, through the same proxy, waits only the failure delay (${fresh} ms, less than 127.0.0.8's ${penalised} ms)`);
});

t.test('limits.preauth_per_ip counts the real client address', async (t) => {
  const evictedRe = /evicted as the oldest connection that had not logged in/;
  const before = (await logLines(evictedRe, 0)).length;
  const first = await wire(fe.v1, '127.0.0.10');
  await first.until(/^\* OK.*\r\n/);
  const second = await wire(fe.v1, '127.0.0.10');
  await second.until(/^\* OK.*\r\n/);
  const third = await wire(fe.v1, '127.0.0.10');
  await third.until(/^\* OK.*\r\n/);
  t.ok(await first.waitClosed(), 'a third unauthenticated connection from 127.0.0.10 evicts its oldest');
  const lines = await logLines(evictedRe, before + 1);
  t.match(lines[before] ?? '', /rip=127\.0\.0\.10/, 'the eviction names 127.0.0.10');
  const other = await wire(fe.v1, '127.0.0.11');
  t.match(await other.until(/^\* OK.*\r\n/), /^\* OK/, '127.0.0.11 through the same proxy is greeted');
  // a command answered: the node has admitted it (greetings do not wait for that)
  other.write('n1 NOOP\r\n');
  t.match(await other.until(/n1 .*\r\n/), /n1 OK/, 'and served');
  t.equal((await logLines(evictedRe, 0)).length, before + 1, 'and evicted no one');
  for (const w of [second, third, other]) w.close();
});

t.test('lmtp: the header is read before smtp-server sees a byte', async (t) => {
  const w = await wire(fe.lmtp, '127.0.0.12');
  t.match(await w.until(/^220 .*\r\n/), /^220 /, 'greeted through HAProxy');
  w.write('LHLO client.test\r\n');
  t.match(await w.until(/^250 .*\r\n/m), /250[ -]/, 'LHLO answered (the PROXY line never reached the LMTP session)');
  w.write('QUIT\r\n');
  w.close();
  const d = await wire(port('lmtp'), '127.0.0.1');
  d.write('LHLO client.test\r\n');
  t.ok(await d.waitClosed(), 'LMTP without a header is closed');
  t.ok((await logLines(/lmtp: Warning: Connection refused \(PROXY: no PROXY header\)/)).length >= 1, 'and logged');
});
