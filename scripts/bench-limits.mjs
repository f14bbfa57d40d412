#!/usr/bin/env node
/**
 * NAME        scripts/bench-limits — what this machine allows at all, for the bench table's "limits" rows
 * SYNOPSIS    node scripts/bench-limits.mjs [--quick] [--json-out FILE]
 * DESCRIPTION tcp_stream: one loopback TCP stream between two processes (1 MiB writes, counted by a
 *               receiver process that discards), MiB/s — the ceiling for a large FETCH/RETR;
 *             fsync: the durable Maildir protocol alone on this disk (exclusive create in tmp/,
 *               write 4 KB, fsync, close, rename into new/, fsync new/), sequential and 4 parallel,
 *               operations/s — the ceiling for a delivery agent that fsyncs like Dovecot.
 *             Medians of several rounds. Temp files live under os.tmpdir() and are removed.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { durableWriter } from './bench-lib.mjs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const argv = process.argv.slice(2);
const opt = (name, d) => {
  const i = argv.indexOf(`--${name}`);
  return i >= 0 ? argv[i + 1] : d;
};
const QUICK = argv.includes('--quick');
const ROUNDS = Number(opt('rounds', QUICK ? 3 : 5));
const JSON_OUT = opt('json-out', null);
const median = (a) => [...a].sort((x, y) => x - y)[Math.floor((a.length - 1) / 2)];
const r1 = (x) => Math.round(x * 10) / 10;
setTimeout(() => {
  console.error('bench-limits: time limit reached');
  process.exit(1);
}, 120_000).unref();

// --------------------------------------------------------------- one loopback TCP stream
const receiver = spawn(
  process.execPath,
  [
    '-e',
    `const s = require('node:net').createServer((c) => { let n = 0; c.on('data', (d) => { n += d.length; }); c.on('end', () => c.end(String(n))); });
     s.listen(0, '127.0.0.1', () => process.stdout.write(s.address().port + '\\n'));`,
  ],
  { stdio: ['ignore', 'pipe', 'inherit'] },
);
process.on('exit', () => receiver.kill('SIGKILL'));
const port = await new Promise((res) => receiver.stdout.once('data', (d) => res(Number(String(d).trim()))));
const STREAM_BYTES = (QUICK ? 256 : 1024) * 1048576;
const chunk = Buffer.alloc(1048576, 0x78);
async function stream() {
  const s = connect(port, '127.0.0.1');
  await new Promise((r) => s.once('connect', r));
  const t0 = process.hrtime.bigint();
  let reply = '';
  s.on('data', (d) => (reply += d));
  const done = new Promise((r) => s.once('end', r));
  for (let sent = 0; sent < STREAM_BYTES; sent += chunk.length) if (!s.write(chunk)) await new Promise((r) => s.once('drain', r));
  s.end();
  await done;
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  if (Number(reply) !== STREAM_BYTES) throw new Error(`receiver counted ${reply}`);
  return STREAM_BYTES / secs / 1048576;
}
await stream(); // warm-up
const tcp = [];
for (let i = 0; i < ROUNDS; i++) tcp.push(await stream());
receiver.kill('SIGKILL');

// --------------------------------------------------------------- fsync'd create+rename
const base = mkdtempSync(join(tmpdir(), 'pigeon-bench-limits-'));
process.on('exit', () => rmSync(base, { recursive: true, force: true }));
for (const d of ['tmp', 'new']) mkdirSync(join(base, d));
const MESSAGE = Buffer.alloc(4096, 0x61);
const durableWrite = durableWriter(base, MESSAGE);
async function fsyncRate(conc, ms) {
  let n = 0;
  const t0 = Date.now();
  await Promise.all(
    Array.from({ length: conc }, async () => {
      while (Date.now() - t0 < ms) {
        await durableWrite();
        n++;
      }
    }),
  );
  return n / ((Date.now() - t0) / 1000);
}
const fs1 = [];
const fs4 = [];
const MS = QUICK ? 600 : 1500;
for (let i = 0; i < ROUNDS; i++) {
  fs1.push(await fsyncRate(1, MS));
  fs4.push(await fsyncRate(4, MS));
}

const result = {
  rounds: ROUNDS,
  tcp_stream_MiBps: { median: r1(median(tcp)), raw: tcp.map(r1), bytes: STREAM_BYTES },
  fsync_create_rename_per_s: { sequential: r1(median(fs1)), parallel_4: r1(median(fs4)), raw: { sequential: fs1.map(r1), parallel_4: fs4.map(r1) }, disk_dir: tmpdir() },
};
if (JSON_OUT) (await import('node:fs')).writeFileSync(JSON_OUT, `${JSON.stringify(result, null, 2)}\n`);
console.log(`\nLimits (medians of ${ROUNDS} rounds): one loopback TCP stream ${result.tcp_stream_MiBps.median} MiB/s; fsync'd create+rename ${result.fsync_create_rename_per_s.sequential}/s sequential, ${result.fsync_create_rename_per_s.parallel_4}/s with 4 in parallel (${tmpdir()})`);
process.exit(0);
