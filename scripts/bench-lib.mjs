/**
 * NAME        scripts/bench-lib — what the protocol benchmarks share (bench-proxy, bench-cluster)
 * DESCRIPTION Command-line options; the process tree of a started daemon and killing all of it at
 *             exit (the scratch directory too); statistics; a raw IMAP/POP3 client that waits for a
 *             reply pattern (`open`, `until`) and counts a large transfer without buffering it
 *             (`drain`); the durable Maildir protocol alone, the disk's bound (`durableWriter`, also
 *             bench-delivery and bench-limits).
 */
import { readFileSync, readdirSync, rmSync } from 'node:fs';
import { connect, createServer } from 'node:net';
import { connect as tlsConnect } from 'node:tls';
import { open as openFile, rename as renameFile } from 'node:fs/promises';
import { join } from 'node:path';

/** `--name VALUE` from argv, else `d`. */
export const option = (argv) => (name, d) => {
  const i = argv.indexOf(`--${name}`);
  return i >= 0 ? argv[i + 1] : d;
};

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export function procTable() {
  const t = new Map();
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const s = readFileSync(`/proc/${d}/stat`, 'latin1');
      const r = s.lastIndexOf(')');
      const f = s.slice(r + 2).split(' ');
      t.set(Number(d), { pid: Number(d), comm: s.slice(s.indexOf('(') + 1, r), ppid: Number(f[1]), state: f[0] });
    } catch {
      /* gone */
    }
  }
  return t;
}

/** `root` and every live descendant. */
export function tree(root) {
  const t = procTable();
  const kids = new Map();
  for (const p of t.values()) {
    if (!kids.has(p.ppid)) kids.set(p.ppid, []);
    kids.get(p.ppid).push(p);
  }
  const out = t.has(root) ? [t.get(root)] : [];
  const st = [root];
  while (st.length) {
    for (const k of kids.get(st.pop()) ?? []) {
      out.push(k);
      st.push(k.pid);
    }
  }
  return out.filter((p) => p.state !== 'Z');
}

function killTree(pid) {
  for (const p of tree(pid)) {
    try {
      process.kill(p.pid, 'SIGKILL');
    } catch {
      /* gone */
    }
  }
}

/** At exit (also on SIGINT/SIGTERM): kill the trees of `roots` (child processes) and remove `base`. */
export function cleanupAtExit(base, roots) {
  let cleaned = false;
  process.on('exit', () => {
    if (cleaned) return;
    cleaned = true;
    for (const r of roots) killTree(r.pid);
    try {
      rmSync(base, { recursive: true, force: true });
    } catch {
      /* best effort */
    }
  });
  for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => process.exit(130));
}

/** SIGTERM, wait up to 15 s for the whole tree (profiles are written at a graceful exit), then kill it. */
export async function stopServe(p) {
  p.kill('SIGTERM');
  const t0 = Date.now();
  while (tree(p.pid).length > 0 && Date.now() - t0 < 15_000) await sleep(100);
  killTree(p.pid);
}

export const freePort = (host = '127.0.0.1') =>
  new Promise((res, rej) => {
    const s = createServer();
    s.once('error', rej);
    s.listen(0, host, () => {
      const p = s.address().port;
      s.close(() => res(p));
    });
  });

export const quantile = (a, p) => {
  const s = [...a].sort((x, y) => x - y);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(p * s.length) - 1))];
};
export const median = (a) => quantile(a, 0.5);
export const r2 = (x) => (x === null || x === undefined || Number.isNaN(x) ? null : Math.round(x * 100) / 100);

/** A client connection: `c.buf` collects text for `until`; `c.sink` takes raw data instead (`drain`). */
export function open(port, { host = '127.0.0.1', tls = false, localAddress, noDelay = false } = {}) {
  return new Promise((resolve, reject) => {
    const s = tls ? tlsConnect({ host, port, localAddress, rejectUnauthorized: false }) : connect({ host, port, localAddress });
    const c = { s, buf: '', waiter: null, sink: null, closed: false, err: null };
    if (noDelay) s.setNoDelay(true);
    s.on('data', (d) => {
      if (c.sink) return c.sink(d);
      c.buf += d.toString('latin1');
      c.waiter?.();
    });
    s.on('error', (e) => {
      c.err = e;
      c.waiter?.();
      reject(e);
    });
    s.on('close', () => {
      c.closed = true;
      c.waiter?.();
    });
    s.once(tls ? 'secureConnect' : 'connect', () => resolve(c));
  });
}

/** Wait until `re` matches the received text; returns the text up to the match and consumes it. */
export function until(c, re, ms = 60_000) {
  return new Promise((res, rej) => {
    const t = setTimeout(() => {
      c.waiter = null;
      rej(new Error(`timeout waiting for ${re}: ${JSON.stringify(c.buf.slice(-200))}`));
    }, ms);
    const check = () => {
      const m = re.exec(c.buf);
      if (m) {
        c.waiter = null;
        clearTimeout(t);
        const out = c.buf.slice(0, m.index + m[0].length);
        c.buf = c.buf.slice(m.index + m[0].length);
        res(out);
      } else if (c.closed || c.err) {
        c.waiter = null;
        clearTimeout(t);
        rej(new Error(`connection closed waiting for ${re}: ${JSON.stringify(c.buf.slice(-200))} ${c.err?.message ?? ''}`));
      } else c.waiter = check;
    };
    check();
  });
}

export const GREETING = /^\* OK[^\r\n]*\r\n/m;

/** Send with `write`, count bytes until `done` matches the tail (the client must not be the bottleneck). */
export async function drain(c, write, done) {
  let bytes = 0;
  let tail = '';
  const t0 = process.hrtime.bigint();
  await new Promise((res, rej) => {
    const t = setTimeout(() => rej(new Error('transfer timed out')), 60_000);
    c.sink = (d) => {
      bytes += d.length;
      tail = (tail + d.subarray(-200).toString('latin1')).slice(-200);
      if (done.test(tail)) {
        clearTimeout(t);
        res();
      }
    };
    c.s.once('close', () => rej(new Error('closed during transfer')));
    write();
  });
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  c.sink = null;
  return { MiBps: bytes / secs / 1048576, bytes };
}

/** Any uncaught failure or the time limit: print `name: failed`, the log tails, exit 1. */
export function failLoudly(name, logTails, limitSeconds) {
  for (const ev of ['uncaughtException', 'unhandledRejection']) {
    process.on(ev, (e) => {
      console.error(`${name}: failed:`, e?.stack ?? e);
      logTails();
      process.exit(1);
    });
  }
  setTimeout(() => {
    console.error(`${name}: time limit reached, giving up`);
    logTails();
    process.exit(1);
  }, limitSeconds * 1000).unref();
}

/**
 * In a selected IMAP session: FETCH message 1 `count` + 1 times (the first warms the session up —
 * page cache, buffers — and is not counted); median MiB/s. Each transfer must be ≥ `minBytes`.
 */
export async function fetchRate(c, count, minBytes) {
  const rates = [];
  for (let i = 0; i <= count; i++) {
    const r = await drain(c, () => c.s.write(`f${i} FETCH 1 BODY.PEEK[]\r\n`), new RegExp(`\\r\\nf${i} OK[^\\r]*\\r\\n$`));
    if (r.bytes < minBytes) throw new Error(`FETCH returned ${r.bytes} bytes`);
    if (i > 0) rates.push(r.MiBps);
  }
  return median(rates);
}

/** POP3: log in, RETR 1 `count` + 1 times (the first not counted), QUIT; median MiB/s. */
export async function retrRate(c, user, pass, count, minBytes) {
  await until(c, /^\+OK[^\r\n]*\r\n/m);
  c.s.write(`USER ${user}\r\n`);
  await until(c, /^\+OK[^\r\n]*\r\n/m);
  c.s.write(`PASS ${pass}\r\n`);
  const r = await until(c, /^[+-](OK|ERR)[^\r\n]*\r\n/m);
  if (!r.startsWith('+OK')) throw new Error(`POP3 login of ${user} failed: ${r}`);
  const rates = [];
  for (let i = 0; i <= count; i++) {
    const x = await drain(c, () => c.s.write('RETR 1\r\n'), /\r\n\.\r\n$/);
    if (x.bytes < minBytes) throw new Error(`RETR returned ${x.bytes} bytes`);
    if (i > 0) rates.push(x.MiBps);
  }
  c.s.write('QUIT\r\n');
  return median(rates);
}

/**
 * One LMTP connection that delivers `count` messages to `rcpt`, pipelined like Postfix's lmtp
 * client (MAIL, RCPT and DATA in one write): every answer must be the expected one.
 */
export async function lmtpSession(port, { host = '127.0.0.1', localAddress, rcpt, count, message }) {
  const c = await open(port, { host, localAddress });
  const reply = async (re) => {
    const r = await until(c, /^\d{3} [^\r\n]*\r\n/m);
    const last = r.trim().split('\r\n').pop();
    if (!re.test(last)) throw new Error(`LMTP: unexpected ${JSON.stringify(last)}`);
  };
  await reply(/^220 /);
  c.s.write('LHLO bench.test\r\n');
  await reply(/^250 /);
  for (let i = 0; i < count; i++) {
    c.s.write(`MAIL FROM:<bob@remote.test>\r\nRCPT TO:<${rcpt}>\r\nDATA\r\n`);
    await reply(/^250 /);
    await reply(/^250 /);
    await reply(/^354 /);
    c.s.write(`${message}.\r\n`);
    await reply(/^250 /);
  }
  c.s.end('QUIT\r\n');
}

/**
 * The durable Maildir protocol alone, one message at a time: exclusive create in DIR/tmp, write,
 * fsync, rename into DIR/new, fsync DIR/new (the disk's bound for any MDA; DIR/tmp and DIR/new must
 * exist). Returns the function that writes one message.
 */
export function durableWriter(dir, message) {
  let counter = 0;
  return async () => {
    const name = `${Date.now()}.${process.pid}.${counter++}`;
    const fh = await openFile(join(dir, 'tmp', name), 'wx', 0o600);
    await fh.write(message, 0, message.length, 0);
    await fh.sync();
    await fh.close();
    await renameFile(join(dir, 'tmp', name), join(dir, 'new', name));
    const dh = await openFile(join(dir, 'new'), 'r');
    await dh.sync();
    await dh.close();
  };
}
