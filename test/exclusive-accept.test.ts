// Issue 15: `pigeon serve --workers N` makes each worker's wait on the shared listening sockets
// exclusive (EPOLLEXCLUSIVE, src/exclusive-accept.ts): the kernel wakes one idle worker per new
// connection instead of every one of them. Checked where an administrator would look (the
// workers' epoll registrations in /proc/PID/fdinfo) and by what must not change: every
// connection is still accepted and served, one at a time and many at once, after the listener is
// closed and opened again, in one process and in serve's two workers.
import t from 'tap';
import { readFileSync, readdirSync, readlinkSync } from 'node:fs';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { ImapFlow } from 'imapflow';
import { exclusiveAccept } from '../src/exclusive-accept.js';
import { makeInstance, serve } from './helpers/instance.js';
import { waitFor } from './helpers/delivery-env.js';
import { descendants, proc } from './helpers/procs.js';

const EPOLLEXCLUSIVE = 1 << 28;

/** The event masks with which `pid`'s epoll sets watch `fd` (one per epoll set that has it). */
function registrations(pid: number | 'self', fd: number): number[] {
  const out: number[] = [];
  for (const e of readdirSync(`/proc/${pid}/fd`)) {
    let target = '';
    try {
      target = readlinkSync(`/proc/${pid}/fd/${e}`);
    } catch {
      continue;
    }
    if (target !== 'anon_inode:[eventpoll]') continue;
    for (const m of readFileSync(`/proc/${pid}/fdinfo/${e}`, 'utf8').matchAll(/^tfd:\s+(\d+)\s+events:\s+([0-9a-f]+)/gm)) {
      if (Number(m[1]) === fd) out.push(parseInt(m[2] ?? '0', 16));
    }
  }
  return out;
}

/** The descriptor of `inode` (a socket) in `pid`, or null. */
function fdOfInode(pid: number, inode: string): number | null {
  for (const e of readdirSync(`/proc/${pid}/fd`)) {
    try {
      if (readlinkSync(`/proc/${pid}/fd/${e}`) === `socket:[${inode}]`) return Number(e);
    } catch {
      /* closed meanwhile */
    }
  }
  return null;
}

/** The inode of the socket listening on 127.0.0.1:`port` (/proc/net/tcp, state 0A). */
function listeningInode(port: number): string {
  const want = `0100007F:${port.toString(16).toUpperCase().padStart(4, '0')}`;
  for (const line of readFileSync('/proc/net/tcp', 'utf8').split('\n').slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f[1] === want && f[3] === '0A' && f[9] !== undefined) return f[9];
  }
  throw new Error(`nothing listens on 127.0.0.1:${port}`);
}

const handleFd = (s: Server): number => (s as unknown as { _handle: { fd: number } })._handle.fd;

/** An echo server on loopback, listening. */
async function echoServer(port = 0): Promise<Server> {
  const s = createServer((c) => c.pipe(c));
  await new Promise<void>((res, rej) => {
    s.once('error', rej);
    s.listen(port, '127.0.0.1', res);
  });
  return s;
}

/** Connect, send a line, get it back. */
function echo(port: number, text: string): Promise<string> {
  return new Promise((res, rej) => {
    const c: Socket = connect(port, '127.0.0.1', () => c.write(`${text}\n`));
    let got = '';
    c.setEncoding('utf8');
    c.on('data', (d: string) => {
      got += d;
      if (got.endsWith('\n')) {
        c.destroy();
        res(got.trim());
      }
    });
    c.on('error', rej);
  });
}

const portOf = (s: Server): number => {
  const a = s.address();
  return typeof a === 'object' && a ? a.port : 0;
};

t.test('one process: the listener is watched with EPOLLEXCLUSIVE and accepts as before, also after it is closed and opened again', async (t) => {
  const errors: string[] = [];
  const onError = (text: string): void => void errors.push(text);
  const s = await echoServer();
  const fd = handleFd(s);
  t.equal(await exclusiveAccept(s, onError), true, 'done');
  const masks = registrations('self', fd);
  t.equal(masks.length, 1, 'the listening socket is in one epoll set (libuv’s)');
  t.ok(((masks[0] ?? 0) & EPOLLEXCLUSIVE) !== 0, 'with EPOLLEXCLUSIVE', { mask: (masks[0] ?? 0).toString(16) });
  t.ok(((masks[0] ?? 0) & 1) !== 0, 'and EPOLLIN, as libuv registered it');
  const port = portOf(s);
  const one: string[] = [];
  for (let i = 0; i < 40; i++) one.push(await echo(port, `one ${i}`));
  t.same(one, Array.from({ length: 40 }, (_, i) => `one ${i}`), '40 connections one after another: each accepted and answered');
  const many = await Promise.all(Array.from({ length: 40 }, (_, i) => echo(port, `many ${i}`)));
  t.same(many, Array.from({ length: 40 }, (_, i) => `many ${i}`), '40 connections at once: each accepted and answered');
  await new Promise<void>((res) => s.close(() => res()));
  t.same(registrations('self', fd), [], 'closed: its registration is gone with it (libuv removes an exclusive one as any other)');
  const again = await echoServer(port);
  t.equal(await exclusiveAccept(again, onError), true, 'a listener opened again on the same port: done again');
  t.equal(await echo(port, 'again'), 'again', 'and it accepts');
  t.equal(await exclusiveAccept(again, onError), true, 'a second call on the same listener changes nothing and succeeds');
  t.equal(await echo(port, 'twice'), 'twice', 'it still accepts');
  await new Promise<void>((res) => again.close(() => res()));
  t.equal(await exclusiveAccept(again, onError), false, 'a closed listener: nothing done');
  t.same(errors, [], 'no error reported');
});

t.test('serve --workers 2: each worker watches every listener with EPOLLEXCLUSIVE; logins one after another and at once all work', async (t) => {
  const users: Record<string, string> = {};
  for (let i = 0; i < 8; i++) users[`u${i}@example.test`] = 'pw';
  const inst = makeInstance(t, { listen: ['imap=127.0.0.1:0', 'pop3=127.0.0.1:0'], users });
  const srv = await serve(t, inst, 2);
  const pid = srv.child.pid ?? 0;
  // serve's workers are its own children (node:cluster); a process a worker forks (its spawner,
  // its mail writer) shows the worker's command line until it execs, so "serve" in the command
  // line alone is not enough: it is how a worker's child was once taken for the new worker
  const workers = (): number[] =>
    descendants(pid, process.execPath).filter((p) => {
      try {
        return proc(p)?.ppid === pid && readFileSync(`/proc/${p}/cmdline`, 'utf8').includes('\0serve\0');
      } catch {
        return false; // exited meanwhile
      }
    });
  await waitFor('two workers', () => workers().length === 2);
  for (const proto of ['imap', 'pop3'] as const) {
    const inode = listeningInode(srv.ports[proto] ?? 0);
    // a worker reports ready once its own listeners are exclusive; the ready line comes from the first
    const exclusive = (w: number): boolean => {
      const fd = fdOfInode(w, inode);
      return fd !== null && registrations(w, fd).some((m) => (m & EPOLLEXCLUSIVE) !== 0);
    };
    await waitFor(`both workers' ${proto} registrations`, () => workers().every(exclusive));
    for (const w of workers()) {
      const fd = fdOfInode(w, inode);
      t.ok(fd !== null, `worker ${w} holds the ${proto} listener`);
      t.same(
        registrations(w, fd ?? -1).map((m) => (m & EPOLLEXCLUSIVE) !== 0),
        [true],
        `worker ${w} watches the ${proto} listener once, with EPOLLEXCLUSIVE`,
      );
    }
  }
  const port = srv.ports['imap'] ?? 0;
  const login = async (user: string): Promise<boolean> => {
    const c = new ImapFlow({ host: '127.0.0.1', port, secure: false, doSTARTTLS: false, auth: { user, pass: 'pw' }, logger: false, emitLogs: false, connectionTimeout: 30_000 } as ConstructorParameters<typeof ImapFlow>[0]);
    await c.connect();
    const ok = c.authenticated !== false;
    await c.logout();
    return ok;
  };
  let seq = 0;
  for (let i = 0; i < 24; i++) if (await login(`u${i % 8}@example.test`)) seq++;
  t.equal(seq, 24, '24 logins one after another: all logged in and out');
  const par = await Promise.all(Array.from({ length: 8 }, (_, i) => login(`u${i}@example.test`)));
  t.equal(par.filter(Boolean).length, 8, '8 logins at once: all logged in and out');
  // a worker that dies takes its registration with it; the one the primary starts instead registers its own
  const [victim, other] = workers();
  process.kill(victim ?? 0, 'SIGKILL');
  await waitFor('the primary restarting the killed worker', () => new RegExp(`worker ${victim} exited \\(SIGKILL\\); restarting`).test(srv.stderr()));
  const imapInode = listeningInode(port);
  const replaced = (): number[] => workers().filter((w) => w !== victim && w !== other);
  let fresh = 0;
  await waitFor('the new worker', () => {
    const r = replaced();
    fresh = r[0] ?? 0;
    return r.length === 1;
  });
  // it logs that it started once its listeners are exclusive
  await waitFor('the new worker started', () => readFileSync(`${inst.dir}/pigeon.log`, 'utf8').includes(`pigeon started (pid ${fresh},`)).catch((e: unknown) => {
    // say what there was, should it ever time out again
    const log = readFileSync(`${inst.dir}/pigeon.log`, 'utf8').split('\n').slice(-25).join('\n');
    throw new Error(`${e instanceof Error ? e.message : String(e)} (pid ${fresh}; serve's workers now: ${workers().join(', ')}; end of pigeon.log:\n${log}\nserve's stderr:\n${srv.stderr().slice(-2000)})`);
  });
  t.same(
    registrations(fresh, fdOfInode(fresh, imapInode) ?? -1).map((m) => (m & EPOLLEXCLUSIVE) !== 0),
    [true],
    'the worker started in place of the killed one watches the imap listener with EPOLLEXCLUSIVE',
  );
  let after = 0;
  for (let i = 0; i < 12; i++) if (await login(`u${i % 8}@example.test`)) after++;
  t.equal(after, 12, '12 logins one after another after the restart: all logged in and out');
  t.notMatch(readFileSync(`${inst.dir}/pigeon.log`, 'utf8'), /cannot make accepting exclusive/, 'no listener error in the log');
  await srv.stop();
});
