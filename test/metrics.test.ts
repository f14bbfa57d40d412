// Issue #17 item 1: one scrape of `pigeon serve --workers 2` is the whole process tree. Real
// Dovecot behind the proxy, imapflow logins spread over both workers (the log names the pid of
// each login), a refused login, one LMTP delivery; then GET /metrics is parsed with an
// independent Prometheus text parser (parse-prometheus-text-format) and the families must add up
// to what this test did, whichever worker did it.
import t from 'tap';
import { ImapFlow } from 'imapflow';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { request } from 'node:http';
import { createRequire } from 'node:module';
import { makeInstance, serve } from './helpers/instance.js';
import { useBackend } from './helpers/backends.js';
import { dataOf, lmtpDialog } from './helpers/delivery-lmtp.js';
import { msg } from './helpers/delivery-env.js';

interface Sample {
  readonly value?: string;
  readonly labels?: Record<string, string>;
  readonly buckets?: Record<string, string>;
  readonly count?: string;
  readonly sum?: string;
}
interface Family {
  readonly name: string;
  readonly help: string;
  readonly type: string;
  readonly metrics: Sample[];
}
const parsePrometheus = createRequire(import.meta.url)('parse-prometheus-text-format') as (text: string) => Family[];

const ALICE = 'alice@example.test';
const BOB = 'bob@example.test';
const inst = makeInstance(t, { listen: ['imap=127.0.0.1:0', 'lmtp=127.0.0.1:0', 'metrics=127.0.0.1:0'], users: { [ALICE]: 'secret', [BOB]: 'b0b' } });
if (!useBackend(t, inst, 'dovecot')) process.exit(1);
const srv = await serve(t, inst, 2);
const imapPort = srv.ports['imap'] ?? 0;

function imap(user: string, pass: string): ImapFlow {
  return new ImapFlow({ host: '127.0.0.1', port: imapPort, secure: false, doSTARTTLS: false, auth: { user, pass }, logger: false, emitLogs: false, connectionTimeout: 60_000 } as ConstructorParameters<typeof ImapFlow>[0]);
}

function logLines(re: RegExp): string[] {
  return readFileSync(join(inst.dir, 'pigeon.log'), 'utf8')
    .split('\n')
    .filter((l) => re.test(l));
}

/** Wait for the proxy's log to hold `n` lines matching `re` (the event, as the admin sees it). */
async function logged(re: RegExp, n: number): Promise<string[]> {
  for (;;) {
    const l = logLines(re);
    if (l.length >= n) return l;
    await new Promise((r) => setTimeout(r, 50));
  }
}

function scrape(): Promise<{ status: number; type: string; body: string }> {
  return new Promise((resolve, reject) => {
    const q = request({ host: '127.0.0.1', port: srv.ports['metrics'] ?? 0, path: '/metrics' }, (r) => {
      let body = '';
      r.setEncoding('utf8');
      r.on('data', (d: string) => (body += d));
      r.on('end', () => resolve({ status: r.statusCode ?? 0, type: String(r.headers['content-type']), body }));
    });
    q.on('error', reject);
    q.end();
  });
}

function family(fs: readonly Family[], name: string): Family | undefined {
  return fs.find((f) => f.name === name);
}

/** The value of the series of `name` whose labels include `labels` (summed if several match). */
function valueOf(fs: readonly Family[], name: string, labels: Record<string, string> = {}): number {
  const f = family(fs, name);
  let v = 0;
  for (const s of f?.metrics ?? []) if (Object.entries(labels).every(([k, x]) => s.labels?.[k] === x)) v += Number(s.value ?? s.count ?? 0);
  return v;
}

const pidOf = (line: string): string => /pigeon\[(\d+)\]/.exec(line)?.[1] ?? '?';

t.test('one scrape of serve --workers 2 adds up every worker', async (t) => {
  // logins until both workers served some (the kernel spreads connections; the log says which pid)
  let logins = 0;
  for (; logins < 80; ) {
    const c = imap(ALICE, 'secret');
    await c.connect();
    await c.logout();
    logins++;
    const pids = new Set(logLines(/imap-login: Login: user=<alice@example\.test>/).map(pidOf));
    if (logins >= 6 && pids.size >= 2) break;
  }
  const byPid = new Map<string, number>();
  for (const l of logLines(/imap-login: Login: user=<alice@example\.test>/)) byPid.set(pidOf(l), (byPid.get(pidOf(l)) ?? 0) + 1);
  t.equal(byPid.size, 2, `logins were served by both workers: ${JSON.stringify([...byPid])}`);

  // a refused login, and two sessions that stay open during the scrape
  await t.rejects(imap(BOB, 'wrong').connect(), 'a wrong password is refused');
  const open = [imap(ALICE, 'secret'), imap(BOB, 'b0b')];
  t.teardown(() => Promise.all(open.map((c) => c.logout().catch(() => undefined))));
  for (const c of open) await c.connect();
  await logged(/imap-login: auth failed/, 1);
  // every session that logged out has ended in its worker (the gauge went down before this line)
  await logged(/imap\(alice@example\.test\): Disconnected: Logged out/, logins);

  // one message over LMTP
  const { d, greeting } = await lmtpDialog(t, srv.ports['lmtp'] ?? 0);
  t.match(greeting, /^220 /);
  t.match(await d.cmd('MAIL FROM:<carol@remote.test>'), /^250 /);
  t.match(await d.cmd(`RCPT TO:<${ALICE}>`), /^250 /);
  t.match(await d.cmd('DATA'), /^354 /);
  d.send(dataOf(msg({ subject: 'counted' })));
  t.match(await d.line(), /^250 2\.0\.0 /);
  await d.cmd('QUIT');

  const r = await scrape();
  t.equal(r.status, 200, 'GET /metrics answers');
  t.match(r.type, /^text\/plain; version=0\.0\.4/, 'in the Prometheus text format');
  const fs = parsePrometheus(r.body);
  const expect: Record<string, string> = {
    pigeon_logins_total: 'COUNTER',
    pigeon_sessions: 'GAUGE',
    pigeon_backend_start_duration_seconds: 'HISTOGRAM',
    pigeon_peer_handoffs_sent_total: 'COUNTER',
    pigeon_deliveries_total: 'COUNTER',
    pigeon_delivery_duration_seconds: 'HISTOGRAM',
    pigeon_db_errors_total: 'COUNTER',
  };
  for (const [name, type] of Object.entries(expect)) {
    const f = family(fs, name);
    t.equal(f?.type, type, `${name} is a ${type.toLowerCase()} (# TYPE)`);
    t.ok((f?.help ?? '') !== '', `${name} has # HELP`);
  }
  for (const f of fs) t.not(f.type, 'UNTYPED', `${f.name}: typed`);

  const ok = logins + 2;
  t.equal(valueOf(fs, 'pigeon_logins_total', { protocol: 'imap', result: 'ok' }), ok, `${ok} successful IMAP logins, summed over both workers`);
  t.equal(valueOf(fs, 'pigeon_logins_total', { protocol: 'imap', result: 'failed' }), 1, 'one refused login');
  t.equal(valueOf(fs, 'pigeon_sessions', { protocol: 'imap', backend: 'dovecot' }), 2, 'two IMAP sessions on Dovecot right now');
  // this parser folds a histogram's buckets by `le` and keeps _count only for unlabelled series:
  // with one series per histogram here, its +Inf bucket is the number of observations
  t.equal(Number(family(fs, 'pigeon_backend_start_duration_seconds')?.metrics[0]?.buckets?.['+Inf']), ok, 'one backend start observed per successful login');
  t.match(r.body, new RegExp(`^pigeon_backend_start_duration_seconds_count\\{protocol="imap",backend="dovecot",node="test1"\\} ${ok}$`, 'm'), 'labelled by protocol and backend');
  t.equal(valueOf(fs, 'pigeon_deliveries_total', { module: 'mailstore', status: 'delivered' }), 1, 'one delivery by the mailstore');
  t.equal(Number(family(fs, 'pigeon_delivery_duration_seconds')?.metrics[0]?.buckets?.['+Inf']), 1, 'one delivery timed');
  t.equal(valueOf(fs, 'pigeon_metrics_workers', { answered: 'yes' }), 2, 'both workers answered the scrape');
  t.equal(valueOf(fs, 'pigeon_metrics_workers', { answered: 'no' }), 0, 'none missing');
  for (const f of fs) for (const m of f.metrics) if (m.buckets === undefined) t.equal(m.labels?.['node'], 'test1', `${f.name}: node label`);

  const notFound = await new Promise<number>((resolve, reject) => {
    request({ host: '127.0.0.1', port: srv.ports['metrics'] ?? 0, path: '/nope' }, (res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    })
      .on('error', reject)
      .end();
  });
  t.equal(notFound, 404, 'anything but /metrics: 404');
  for (const c of open) await c.logout();
  await srv.stop();
});
