#!/usr/bin/env node
// Delivery throughput, 4 KB messages, in one run on this machine, ROUNDS rounds (default 5) of:
//   node -e 0       a bare Node start: the floor for `pigeon deliver` under pipe(8), timed the
//                   same way (one process per message, as the mail user, with pipe(8)'s near-empty
//                   environment, sequential and parallel)
//   pigeon deliver  one process per message, as Postfix pipe(8) runs it (user=mail: the uid of
//                   mail_user), sequential and parallel, two ways: handed off to the instance's
//                   running `pigeon serve` (its hand-off socket, run_dir 0750 root:mail as README
//                   says), and in-process (PIGEON_DELIVER_HANDOFF=0: the mailbox is written in the
//                   deliver process itself)
//   LMTP            one `pigeon` LMTP server process (what `pigeon serve` runs), 1 and C connections
//   dovecot-lda     Dovecot's own MDA, same message, same disk, sequential and parallel
//   fsync bound     the disk's limit for the durable Maildir protocol itself (exclusive create,
//                   write, fsync, rename into new/, fsync new/) — no MDA can beat it per stream
// Each round runs every row in 5 short blocks taken in turn (below: the two rows of a ratio are
// timed over the same seconds). Each row keeps every round; the summary gives the worst round (the
// issue's targets hold for the worst round) and the median. Prints one JSON object, then a human summary. Needs a built tree
// (npm run build: tsc, then dist/src/cli.js with the deliver path inlined; tsc alone measures
// a hand-off that loads eight module files), root (to run as the mail uid) and Dovecot (dovecot-core).
// Usage: node scripts/bench-delivery.mjs [--n 200] [--concurrency 8] [--rounds 5] [--json-only]
//   BENCH_SERVE_NODE_ARGS="..." are given to node for `pigeon serve` (as in bench-proxy.mjs), e.g.
//   --interrupt-budget=67584 for V8's default tier-up budget instead of serve's own (src/hot-flags.ts)
//   --n: LMTP messages per round and row; `pigeon deliver`, node -e 0 and dovecot-lda run
//   n/8 (sequential) and n/4 (parallel) processes per round (at least 8), the fsync bound max(n, 500),
//   each rounded up to 5 whole blocks (parallel blocks: whole waves of --concurrency processes)
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync, mkdirSync, chownSync, readdirSync, existsSync, chmodSync, renameSync } from 'node:fs';
import { durableWriter } from './bench-lib.mjs';
import { tmpdir, cpus } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import net from 'node:net';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const CLI = join(ROOT, 'dist', 'src', 'cli.js');
// the `pigeon` command (package.json bin, scripts/link-pigeon.sh): what pipe(8) runs
const PIGEON = join(ROOT, 'dist', 'src', 'cli.cjs');
const LDA = '/usr/lib/dovecot/dovecot-lda';
const argv = process.argv.slice(2);
const arg = (name, d) => {
  const i = argv.indexOf(`--${name}`);
  return i >= 0 ? Number(argv[i + 1]) : d;
};
const N = arg('n', 200);
const C = arg('concurrency', 8);
const ROUNDS = Math.max(1, arg('rounds', 5));
const NSEQ = Math.max(8, Math.round(N / 8));
const NPAR = Math.max(8, Math.round(N / 4));
const jsonOnly = argv.includes('--json-only');
const MAIL_UID = 8;

if (!existsSync(CLI) || !existsSync(PIGEON)) {
  console.error(`${existsSync(CLI) ? PIGEON : CLI} missing: run "npm run build" first`);
  process.exit(1);
}

const body = `${'The quick brown fox jumps over the lazy dog. 0123456789 abcdefghij\n'.repeat(58)}`;
const MESSAGE = Buffer.from(`From: bob@remote.test\nTo: alice@example.test\nSubject: bench\nMessage-ID: <bench@remote.test>\n\n${body}`.padEnd(4095, 'x').slice(0, 4095) + '\n');

const base = mkdtempSync(join(tmpdir(), 'pigeon-bench-'));
chmodSync(base, 0o755);
const inst = join(base, 'inst');
const run = (args, input) => spawnSync(process.execPath, [CLI, '-c', inst, ...args], { input: input ?? '' });
function must(r, what) {
  if (r.status !== 0) throw new Error(`${what}: ${r.stdout}${r.stderr}`);
}
must(run(['init', inst]), 'init');
must(run(['domain', 'add', 'example.test']), 'domain');
must(run(['user', 'add', 'alice@example.test', '--password-stdin'], 'x\n'), 'user');
must(run(['user', 'add', 'lmtp@example.test', '--password-stdin'], 'x\n'), 'user');
must(run(['deliver', '-f', 'bob@remote.test', 'alice@example.test'], MESSAGE), 'first delivery (allocation)');
must(run(['deliver', '-f', 'bob@remote.test', 'lmtp@example.test'], MESSAGE), 'first delivery (allocation)');
// pipe(8) runs `pigeon deliver` as user=mail (Postfix refuses root): as README's pipe(8) section
// says, that account writes the database and its directory and the log; it reads pigeon.yaml
const AS_MAIL = process.getuid?.() === 0;
if (AS_MAIL) {
  // and keeps the database in a directory of its own, so that the instance directory stays root's
  // (where root keeps the parsed configuration that the mail user's deliveries read)
  mkdirSync(join(inst, 'db'));
  for (const f of readdirSync(inst)) if (/^pigeon\.db/.test(f)) renameSync(join(inst, f), join(inst, 'db', f));
  writeFileSync(join(inst, 'conf.d', '10-db.yaml'), 'database: sqlite:db/pigeon.db\n');
  spawnSync('chown', ['-R', `${MAIL_UID}:${MAIL_UID}`, join(inst, 'db')]);
  for (const f of readdirSync(inst)) if (/^pigeon\.log/.test(f)) chownSync(join(inst, f), MAIL_UID, MAIL_UID);
  chownSync(join(inst, 'pigeon.yaml'), 0, MAIL_UID);
  chmodSync(join(inst, 'pigeon.yaml'), 0o640);
}
const asMail = AS_MAIL ? { uid: MAIL_UID, gid: MAIL_UID } : {};

// --- pigeon serve: the hand-off socket `pigeon deliver` finds through DIR/deliver-handoff.json ---
// run_dir reachable by the mail user's group (README, pipe(8)); serve as root, like a real one
const runDir = join(inst, 'run');
mkdirSync(runDir, { recursive: true, mode: 0o750 });
if (AS_MAIL) chownSync(runDir, 0, MAIL_UID);
const serveProc = spawn(process.execPath, [...(process.env.BENCH_SERVE_NODE_ARGS ?? '').split(' ').filter(Boolean), CLI, '-c', inst, 'serve', '--workers', '1'], { stdio: ['ignore', 'ignore', 'pipe'] });
process.on('exit', () => serveProc.kill());
await new Promise((res, rej) => {
  let err = '';
  serveProc.stderr.setEncoding('utf8');
  serveProc.stderr.on('data', (d) => {
    err += d;
    if (/pigeon: ready/.test(err)) res();
  });
  serveProc.once('exit', (c) => rej(new Error(`pigeon serve exited ${c}: ${err}`)));
});
serveProc.stderr.resume();

async function pool(n, conc, job) {
  let next = 0;
  const t0 = process.hrtime.bigint();
  await Promise.all(
    Array.from({ length: Math.min(conc, n) }, async () => {
      while (next < n) {
        next++;
        await job();
      }
    }),
  );
  return { messages: n, seconds: Number(process.hrtime.bigint() - t0) / 1e9 };
}

function spawnJob(cmd, args, opts) {
  return () =>
    new Promise((res, rej) => {
      const c = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'], ...opts });
      c.stdout.on('data', (d) => (err += d));
      let err = '';
      c.stderr.on('data', (d) => (err += d));
      c.on('error', rej);
      c.on('close', (code, sig) => (code === 0 ? res() : rej(new Error(`${cmd} exit ${code} ${sig}: ${err}`))));
      // node -e 0 reads no input: it may exit before the message is written (EPIPE), its exit status decides
      c.stdin.on('error', () => undefined);
      c.stdin.end(MESSAGE);
    });
}

// --- node -e 0 and pigeon deliver: one process per message ----------------------------------
// with pipe(8)'s environment (export_environment: next to nothing), not this script's: a
// NODE_EXTRA_CA_CERTS or NODE_OPTIONS inherited from the bench's shell would be paid by every
// process of these rows, the floor included (the system CA bundle in NODE_EXTRA_CA_CERTS costs
// a node start ≈ 35 ms of CPU here, more than the bare start itself) and hide what deliver adds
const PIPE_ENV = { PATH: '/usr/bin:/bin' };
const nodeJob = spawnJob(process.execPath, ['-e', '0'], { ...asMail, env: PIPE_ENV });
const deliverArgv = [PIGEON, '-c', inst, 'deliver', '-f', 'bob@remote.test', 'alice@example.test'];
const deliverJob = spawnJob(process.execPath, deliverArgv, { ...asMail, env: { ...PIPE_ENV, PIGEON_DELIVER_HANDOFF: '0' } });
const handoffJob = spawnJob(process.execPath, deliverArgv, { ...asMail, env: PIPE_ENV });
// the hand-off row must measure hand-offs: one delivery, and serve's log (stderr) names it
{
  const before = readdirSync(join(inst, 'mail', 'example.test', 'alice', 'new')).length;
  await handoffJob();
  if (readdirSync(join(inst, 'mail', 'example.test', 'alice', 'new')).length !== before + 1) throw new Error('hand-off: no delivery');
  if (!existsSync(join(inst, 'deliver-handoff.json'))) throw new Error('pigeon serve offers no hand-off (deliver-handoff.json missing)');
}

// --- LMTP ----------------------------------------------------------------------------------
const serverCode = `
  const { loadInstance } = await import(${JSON.stringify(join(ROOT, 'dist/src/instance.js'))});
  const { openStore } = await import(${JSON.stringify(join(ROOT, 'dist/src/store.js'))});
  const { createLmtpServer, listenLmtp } = await import(${JSON.stringify(join(ROOT, 'dist/src/delivery/lmtp.js'))});
  const instance = loadInstance(${JSON.stringify(inst)});
  const store = await openStore(instance.config.database, { baseDir: instance.dir });
  const srv = await listenLmtp(createLmtpServer({ instance, store, logger: { log() {} } }), { host: '127.0.0.1', port: 0, path: null });
  process.stdout.write(srv.address().port + '\\n');
`;
const server = spawn(process.execPath, ['--input-type=module', '-e', serverCode], { stdio: ['ignore', 'pipe', 'inherit'] });
process.on('exit', () => server.kill());
const port = await new Promise((res) => server.stdout.once('data', (d) => res(Number(String(d).trim()))));
const dataLines = `${MESSAGE.toString('latin1').replace(/\n/g, '\r\n').replace(/^\./gm, '..')}.\r\n`;

async function lmtpConnection(count) {
  const s = net.connect({ host: '127.0.0.1', port });
  s.on('error', (e) => console.error(`bench-delivery: LMTP connection: ${e.message}`));
  let buf = '';
  const waiters = [];
  const lines = [];
  s.on('data', (d) => {
    buf += d.toString('latin1');
    let i;
    while ((i = buf.indexOf('\r\n')) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 2);
      if (!/^\d{3} /.test(line)) continue;
      const w = waiters.shift();
      if (w) w(line);
      else lines.push(line);
    }
  });
  const reply = () => (lines.length > 0 ? Promise.resolve(lines.shift()) : new Promise((r) => waiters.push(r)));
  const expect = async (re) => {
    const l = await reply();
    if (!re.test(l)) throw new Error(`LMTP: unexpected ${l}`);
  };
  await expect(/^220 /);
  s.write('LHLO bench\r\n');
  await expect(/^250 /);
  for (let i = 0; i < count; i++) {
    // pipelined like Postfix's lmtp client: MAIL, RCPT, DATA
    s.write('MAIL FROM:<bob@remote.test>\r\nRCPT TO:<lmtp@example.test>\r\nDATA\r\n');
    await expect(/^250 /);
    await expect(/^250 /);
    await expect(/^354 /);
    s.write(dataLines);
    await expect(/^250 /);
  }
  s.end('QUIT\r\n');
}
/** `count` messages over `conns` connections opened for them (count / conns each). */
async function lmtpBench(count, conns) {
  const per = Math.ceil(count / conns);
  const t0 = process.hrtime.bigint();
  await Promise.all(Array.from({ length: conns }, () => lmtpConnection(per)));
  return { messages: per * conns, seconds: Number(process.hrtime.bigint() - t0) / 1e9 };
}

// --- dovecot-lda -----------------------------------------------------------------------------
let ldaJob = null;
let ldaNote = null;
if (existsSync(LDA) && process.getuid?.() === 0) {
  const home = join(base, 'lda-home');
  mkdirSync(home);
  chownSync(home, MAIL_UID, MAIL_UID);
  const conf = join(base, 'dovecot.conf');
  writeFileSync(conf, 'mail_location = maildir:~/Maildir\nlog_path = /dev/null\npostmaster_address = postmaster@example.test\nssl = no\n', { mode: 0o644 });
  ldaJob = spawnJob(LDA, ['-c', conf, '-f', 'bob@remote.test', '-a', 'alice@example.test'], {
    uid: MAIL_UID,
    gid: MAIL_UID,
    env: { USER: 'alice', HOME: home, PATH: '/usr/bin:/bin' },
  });
  await ldaJob(); // create the Maildir
} else ldaNote = existsSync(LDA) ? 'needs root (runs as the mail uid)' : `${LDA} missing (Debian package dovecot-core)`;

// --- fsync bound -----------------------------------------------------------------------------
const fdir = join(base, 'fsync');
for (const d of ['tmp', 'new']) mkdirSync(join(fdir, d), { recursive: true });
const durableWrite = durableWriter(fdir, MESSAGE);

// --- rounds: every row in every round, in short blocks taken in turn --------------------------
// A ratio compares two rows of one round (deliver against node -e 0, LMTP against the fsync
// bound). Run one row after the other, each row's few seconds see a different moment of this
// shared VM, whose speed swings by a third from one second to the next (node -e 0 alone, 4 at
// once: 83 and 62 starts/s in consecutive rounds of one run): the round's ratio then measures the
// machine as much as pigeon. So a round runs every row in BLOCKS short blocks, in turn, and the
// order of the rows is reversed every other block (each row sees both neighbours and both ends of
// a cycle): the two rows of a ratio stand next to each other in every cycle and are timed over the
// same stretch of the round. A row's figure for the round is its messages over its own seconds,
// summed over its blocks; what one message does is unchanged (one process per message, or one
// LMTP connection per block and stream, count / streams messages each). Parallel blocks are whole
// waves (a multiple of the concurrency), so that no block ends with fewer processes running than
// another row's.
const BLOCKS = 5;
const share = (n, conc) => Math.max(conc, Math.ceil(n / BLOCKS / conc) * conc);
const ROWS = ['node_seq', 'node_par', 'handoff_seq', 'handoff_par', 'deliver_seq', 'deliver_par', 'lmtp_1', 'lmtp_c', 'lda_seq', 'lda_par', 'fsync_seq', 'fsync_par'];
const NFSYNC = Math.max(N, 500);
/** How a row's block runs `n` messages `conc` at a time: one process (or one fsync'd write) per job, or LMTP connections. */
const jobs = (job) => (n, conc) => pool(n, conc, job);
/** One block of each row, in the order a cycle takes them (pairs of a ratio side by side): [row, concurrency, messages a round, run]. */
const CYCLE = [
  ['node_seq', 1, NSEQ, jobs(nodeJob)],
  ['handoff_seq', 1, NSEQ, jobs(handoffJob)],
  ['deliver_seq', 1, NSEQ, jobs(deliverJob)],
  ...(ldaJob ? [['lda_seq', 1, NSEQ, jobs(ldaJob)]] : []),
  ['node_par', C, NPAR, jobs(nodeJob)],
  ['handoff_par', C, NPAR, jobs(handoffJob)],
  ['deliver_par', C, NPAR, jobs(deliverJob)],
  ...(ldaJob ? [['lda_par', C, NPAR, jobs(ldaJob)]] : []),
  ['lmtp_1', 1, N, lmtpBench],
  ['fsync_seq', 1, NFSYNC, jobs(durableWrite)],
  ['lmtp_c', C, N, lmtpBench],
  ['fsync_par', C, NFSYNC, jobs(durableWrite)],
];
const per = Object.fromEntries(ROWS.map((k) => [k, []]));
for (let r = 0; r < ROUNDS; r++) {
  const sum = Object.fromEntries(CYCLE.map(([k, concurrency]) => [k, { messages: 0, concurrency, seconds: 0 }]));
  for (let b = 0; b < BLOCKS; b++) {
    for (const [k, conc, n, run] of b % 2 === 0 ? CYCLE : [...CYCLE].reverse()) {
      const x = await run(share(n, conc), conc);
      sum[k].messages += x.messages;
      sum[k].seconds += x.seconds;
    }
  }
  for (const [k, x] of Object.entries(sum)) {
    per[k].push({ messages: x.messages, concurrency: x.concurrency, seconds: +x.seconds.toFixed(3), per_second: +(x.messages / x.seconds).toFixed(1) });
  }
  if (!jsonOnly) console.error(`bench-delivery: round ${r + 1}/${ROUNDS} done`);
}
server.kill();
serveProc.kill();

const med = (a) => {
  const s = [...a].sort((x, y) => x - y);
  return s.length ? (s[(s.length - 1) >> 1] + s[s.length >> 1]) / 2 : null;
};
/** A row: the worst round (fewest messages per second), the median, every round. */
function summary(rounds) {
  if (rounds.length === 0) return null;
  const rates = rounds.map((x) => x.per_second);
  const worst = rounds.reduce((a, b) => (b.per_second < a.per_second ? b : a));
  return { ...worst, worst_per_second: worst.per_second, median_per_second: +med(rates).toFixed(1), rounds: rates };
}
/** Per round: a / b of per-message cost (b's rate / a's rate); the worst (highest) and the median. */
function costRatio(a, b) {
  const rs = a.map((x, i) => (b[i] ? b[i].per_second / x.per_second : null)).filter((x) => x !== null);
  return rs.length ? { worst: +Math.max(...rs).toFixed(2), median: +med(rs).toFixed(2), rounds: rs.map((x) => +x.toFixed(2)) } : null;
}
/** Per round: a's rate / b's rate; the worst (lowest) and the median. */
function rateRatio(a, b) {
  const rs = a.map((x, i) => (b[i] ? x.per_second / b[i].per_second : null)).filter((x) => x !== null);
  return rs.length ? { worst: +Math.min(...rs).toFixed(2), median: +med(rs).toFixed(2), rounds: rs.map((x) => +x.toFixed(2)) } : null;
}
const nodeSeq = summary(per.node_seq);
const nodePar = summary(per.node_par);
const handoffSeq = summary(per.handoff_seq);
const handoffPar = summary(per.handoff_par);
const deliverSeq = summary(per.deliver_seq);
const deliverPar = summary(per.deliver_par);
const lmtp1 = summary(per.lmtp_1);
const lmtpC = summary(per.lmtp_c);
const ldaSeq = summary(per.lda_seq);
const ldaPar = summary(per.lda_par);
const fsyncSeq = summary(per.fsync_seq);
const fsyncPar = summary(per.fsync_par);
const stored = readdirSync(join(inst, 'mail', 'example.test', 'alice', 'new')).length + readdirSync(join(inst, 'mail', 'example.test', 'lmtp', 'new')).length;
rmSync(base, { recursive: true, force: true });

const result = {
  message_bytes: MESSAGE.length,
  cpus: cpus().length,
  node: process.version,
  rounds: ROUNDS,
  blocks_per_round: BLOCKS,
  deliver_as: AS_MAIL ? `uid ${MAIL_UID} (as pipe(8) user=mail)` : `uid ${process.getuid?.()}`,
  deliver_env: `pipe(8)'s: ${Object.keys(PIPE_ENV).join(' ')} only`,
  node_start: { sequential: nodeSeq, parallel: nodePar },
  // in-process (PIGEON_DELIVER_HANDOFF=0) and handed off to the running pigeon serve
  pigeon_deliver: { sequential: deliverSeq, parallel: deliverPar },
  pigeon_deliver_handoff: { sequential: handoffSeq, parallel: handoffPar },
  pigeon_lmtp: { one_connection: lmtp1, parallel: lmtpC },
  dovecot_lda: ldaNote ? { skipped: ldaNote } : { sequential: ldaSeq, parallel: ldaPar },
  fsync_bound: { sequential: fsyncSeq, parallel: fsyncPar },
  // per-message cost of pigeon deliver over a bare node start (target ≤ 1.5), per round
  deliver_vs_node: { sequential: costRatio(per.deliver_seq, per.node_seq), parallel: costRatio(per.deliver_par, per.node_par) },
  handoff_vs_node: { sequential: costRatio(per.handoff_seq, per.node_seq), parallel: costRatio(per.handoff_par, per.node_par) },
  // LMTP over the disk's bound (target ≥ 0.8), per round
  lmtp_vs_fsync: { one_connection: rateRatio(per.lmtp_1, per.fsync_seq), parallel: rateRatio(per.lmtp_c, per.fsync_par) },
  stored_messages: stored,
};
console.log(JSON.stringify(result));
if (!jsonOnly) {
  const row = (name, r) => `  ${name.padEnd(34)} ${r ? `${String(r.worst_per_second).padStart(8)} msg/s worst round, ${String(r.median_per_second).padStart(8)} median   (${r.messages} msgs/round, concurrency ${r.concurrency})` : '  skipped'}`;
  const ratio = (name, x, target) => `  ${name.padEnd(34)} ${x ? `${String(x.worst).padStart(8)}× worst round, ${String(x.median).padStart(8)}× median   (target ${target}; rounds ${x.rounds.join(' ')})` : '  –'}`;
  console.log(`\nDelivery of ${MESSAGE.length}-byte messages, ${cpus().length} CPUs, Node ${process.version}, ${ROUNDS} rounds, deliver as ${result.deliver_as}, environment ${result.deliver_env}:`);
  console.log(row('node -e 0, sequential', nodeSeq));
  console.log(row(`node -e 0, ${C} parallel`, nodePar));
  console.log(row('pigeon deliver → serve, sequential', handoffSeq));
  console.log(row(`pigeon deliver → serve, ${C} parallel`, handoffPar));
  console.log(row('pigeon deliver in-process, seq', deliverSeq));
  console.log(row(`pigeon deliver in-process, ${C} par`, deliverPar));
  console.log(row('pigeon LMTP, 1 connection', lmtp1));
  console.log(row(`pigeon LMTP, ${C} connections`, lmtpC));
  console.log(row('dovecot-lda, sequential', ldaSeq));
  console.log(row(`dovecot-lda, ${C} parallel`, ldaPar));
  console.log(row('fsync bound (tmp→new), 1 stream', fsyncSeq));
  console.log(row(`fsync bound (tmp→new), ${C} streams`, fsyncPar));
  console.log(ratio('deliver→serve / node -e 0, seq', result.handoff_vs_node.sequential, '≤ 1.5×'));
  console.log(ratio(`deliver→serve / node -e 0, ${C} par`, result.handoff_vs_node.parallel, '≤ 1.5×'));
  console.log(ratio('deliver in-proc / node -e 0, seq', result.deliver_vs_node.sequential, '≤ 1.5×'));
  console.log(ratio(`deliver in-proc / node -e 0, ${C} par`, result.deliver_vs_node.parallel, '≤ 1.5×'));
  console.log(ratio('LMTP / fsync bound, 1 conn', result.lmtp_vs_fsync.one_connection, '≥ 0.8×'));
  console.log(ratio(`LMTP / fsync bound, ${C} conns`, result.lmtp_vs_fsync.parallel, '≥ 0.8×'));
  if (ldaNote) console.log(`  dovecot-lda skipped: ${ldaNote}`);
}
