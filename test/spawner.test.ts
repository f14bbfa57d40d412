// Issue 15 (proxy part): `pigeon serve` workers start handed-off backends through a spawner
// process (src/proxy/spawner.ts), not by forking themselves. Real Dovecot behind `pigeon serve
// --workers 1` (the process serve started is the worker), raw IMAP clients on plain TCP.
// - a login's Dovecot imap is the spawner's child, and neither the worker nor the spawner keeps a
//   copy of the client socket (the session's bytes never pass through the proxy again); Dovecot's
//   own log lines still reach our log under the user's prefix;
// - the spawner killed while sessions run: they are ended (their exits could no longer be seen),
//   with their logout lines and their user+IP slots freed, and the next login starts a new
//   spawner;
// - a login in flight when the spawner dies gets NO [UNAVAILABLE] at once, not a hang, and the
//   same connection can log in again;
// - a Dovecot that dies at start without a word (exit 89) still gets the proxy's `* BYE
//   [UNAVAILABLE]` to the client, now said by the spawner;
// - an imaps login's Dovecot is the spawner's child as well, on one end of a local socket pair
//   whose other end the worker relays to the TLS client (no fork of the worker); kick and the
//   logout line with its byte counts work as for any relayed session.
import t from 'tap';
import { readFileSync, readdirSync, readlinkSync, rmSync, writeFileSync } from 'node:fs';
import { descendants, holds, proc } from './helpers/procs.js';
import { join } from 'node:path';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { connect as tlsConnect } from 'node:tls';
import { requireProgram } from './helpers/programs.js';
import { makeInstance, serve } from './helpers/instance.js';
import { useBackend } from './helpers/backends.js';
import { Wire, untilText } from './helpers/wire.js';

const ALICE = 'alice@example.test';
const inst = makeInstance(t, { listen: ['imap=127.0.0.1:0'], users: { [ALICE]: 'secret' } });
if (!useBackend(t, inst, 'dovecot')) process.exit(1);

const log = (): string => readFileSync(join(inst.dir, 'pigeon.log'), 'utf8');

/** The inode of the proxy's end of the client connection whose client port is `clientPort`. */
function serverSideInode(listenPort: number, clientPort: number): string | null {
  const hex = (n: number): string => n.toString(16).toUpperCase().padStart(4, '0');
  for (const l of readFileSync('/proc/net/tcp', 'utf8').split('\n').slice(1)) {
    const f = l.trim().split(/\s+/);
    if (f[1]?.endsWith(`:${hex(listenPort)}`) && f[2]?.endsWith(`:${hex(clientPort)}`)) return f[9] ?? null;
  }
  return null;
}

async function login(port: number, tag = 'a1'): Promise<{ w: Wire; answer: string }> {
  const w = await Wire.open(port);
  await w.until(/^\* OK/m);
  w.write(`${tag} LOGIN ${ALICE} secret\r\n`);
  return { w, answer: await w.until(new RegExp(`^${tag} (OK|NO|BAD)`, 'm')) };
}

/** Dovecot imap serving the connection whose client port is `clientPort`, once it runs. */
async function imapOf(worker: number, port: number, clientPort: number): Promise<number> {
  const inode = serverSideInode(port, clientPort);
  if (inode === null) throw new Error('no such connection');
  for (const end = Date.now() + 60_000; ; ) {
    const pid = descendants(worker, '/usr/lib/dovecot/imap').find((p) => holds(p, inode));
    if (pid !== undefined) return pid;
    if (Date.now() > end) throw new Error(`no Dovecot imap holds the connection from port ${clientPort} after 60 s`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

t.test('a plain IMAP login: Dovecot is the spawner’s child, and the proxy keeps no copy of the client socket', async (t) => {
  const s = await serve(t, inst);
  const port = s.ports['imap'] ?? 0;
  const worker = s.child.pid ?? 0;
  const { w, answer } = await login(port);
  t.match(answer, /^a1 OK \[CAPABILITY /m, 'Dovecot answered the login');
  const imap = await imapOf(worker, port, w.sock.localPort ?? 0);
  const parent = proc(imap)?.ppid ?? 0;
  t.not(parent, worker, 'the worker did not fork it');
  t.match(proc(parent)?.cmd, /^pigeon: spawner/, 'its parent is the spawner');
  t.equal(proc(parent)?.ppid, worker, "the worker's own spawner");
  // (the spawner keeps one: if Dovecot's imap exits 89 at start, it says `* BYE [UNAVAILABLE]`)
  t.notOk(holds(worker, serverSideInode(port, w.sock.localPort ?? 0) ?? ''), 'the worker closed its copy of the client socket');
  w.write('a2 SELECT INBOX\r\na3 LOGOUT\r\n');
  t.match(await w.until(/^a3 OK/m), /^a2 OK .*Select completed/m, 'the session works');
  t.ok(await w.waitClosed(), 'and ends');
  const l = await untilText(log, /imap\(alice@example\.test\): Disconnected: Logged out \(socket handed to the backend\)/);
  t.match(l, /imap\(alice@example\.test\): Disconnected: Logged out \(socket handed to the backend\)/, 'our logout line');
  t.match(l, /imap\(alice@example\.test\): Info: Disconnected: Logged out in=\d+ out=\d+.*rip=127\.0\.0\.1/, "Dovecot's own line, through the spawner's stderr, under the user's prefix with rip=");
});

t.test('an imaps login: Dovecot is the spawner’s child too, on a local socket pair the worker relays; kick and the logout line as before', async (t) => {
  const ti = makeInstance(t, { listen: ['imaps=127.0.0.1:0'], users: { [ALICE]: 'secret' } });
  if (!useBackend(t, ti, 'dovecot')) return;
  const s = await serve(t, ti);
  const port = s.ports['imaps'] ?? 0;
  const worker = s.child.pid ?? 0;
  const ca = readFileSync(join(ti.dir, 'certs', 'ca.crt'));
  const tlsLogin = async (): Promise<{ w: Wire; answer: string }> => {
    const sock = tlsConnect({ host: '127.0.0.1', port, ca: [ca], servername: 'localhost' });
    await once(sock, 'secureConnect');
    const w = new Wire(sock);
    await w.until(/^\* OK/m);
    w.write(`a1 LOGIN ${ALICE} secret\r\n`);
    return { w, answer: await w.until(/^a1 (OK|NO|BAD)/m) };
  };
  const { w, answer } = await tlsLogin();
  t.match(answer, /^a1 OK \[CAPABILITY /m, 'Dovecot answered the login (its tagged OK came through the pair and the TLS relay)');
  // its tagged OK has arrived: it runs
  const imaps = descendants(worker, '/usr/lib/dovecot/imap');
  t.equal(imaps.length, 1, "one Dovecot imap below the worker");
  const imap = imaps[0] ?? 0;
  const parent = proc(imap)?.ppid ?? 0;
  t.not(parent, worker, 'the worker did not fork it');
  t.match(proc(parent)?.cmd, /^pigeon: spawner/, 'its parent is the spawner');
  t.match(readlinkSync(`/proc/${imap}/fd/0`), /^socket:/, 'its input is a socket (the far end of the pair), not a pipe');
  w.write('a2 SELECT INBOX\r\na3 LOGOUT\r\n');
  t.match(await w.until(/^a3 OK/m), /^a2 OK .*Select completed/m, 'the session works');
  t.ok(await w.waitClosed(), 'and ends');
  const tlog = (): string => readFileSync(join(ti.dir, 'pigeon.log'), 'utf8');
  t.match(await untilText(tlog, /imap\(alice@example\.test\): Disconnected: Logged out in=\d+ out=\d+/), /imap\(alice@example\.test\): Disconnected: Logged out in=\d+ out=\d+: session=/, 'the logout line counts the relayed bytes');
  const k = await tlsLogin();
  t.match(k.answer, /^a1 OK/m);
  t.match(ti.run(['kick', ALICE]).stdout, /^kicked 1 session\(s\) of alice@example\.test\n/, 'pigeon kick finds the session');
  t.ok(await k.w.waitClosed(), 'and ends it');
  t.match(await untilText(tlog, /Disconnected: Kicked/), /imap\(alice@example\.test\): Disconnected: Kicked in=\d+ out=\d+/, 'logged as kicked');
  // the spawner dies under a TLS session: its Dovecot is stopped, the relay ends, the slot is freed
  const d = await tlsLogin();
  t.match(d.answer, /^a1 OK/m);
  process.kill(parent, 'SIGKILL');
  t.ok(await d.w.waitClosed(), 'a TLS session whose spawner died is ended');
  const l = await untilText(tlog, /the spawner process exited \(SIGKILL\)[^\n]*\n(.*\n)*.*Disconnected: Logged out in=/);
  t.match(l, /imap\(alice@example\.test\): Warning: the spawner process exited \(SIGKILL\)/, 'it says why it ended');
  t.match(l, /the spawner process exited \(SIGKILL\)[^\n]*\n(.*\n)*.*imap\(alice@example\.test\): Disconnected: Logged out in=\d+ out=\d+/, 'and logs its logout line');
  t.same(JSON.parse(ti.run(['who', '--json']).stdout), [], 'no session left in who');
  const e = await tlsLogin();
  t.match(e.answer, /^a1 OK \[CAPABILITY /m, 'the next TLS login works, through a new spawner');
  e.w.write('a2 LOGOUT\r\n');
  await e.w.until(/^a2 OK/m);
});

t.test('an imaps login whose Dovecot imap dies at start (exit 89): the TLS client gets * BYE [UNAVAILABLE] through the pair', async (t) => {
  const ti = makeInstance(t, { listen: ['imaps=127.0.0.1:0'], users: { [ALICE]: 'secret' } });
  if (!useBackend(t, ti, 'dovecot')) return;
  const bin = join(ti.dir, 'imap-exit-89');
  writeFileSync(bin, '#!/bin/sh\nexit 89\n', { mode: 0o755 });
  writeFileSync(join(ti.dir, 'conf.d', '60-exit-89.yaml'), 'dovecot:\n  imap: ' + bin + '\n');
  const s = await serve(t, ti);
  const sock = tlsConnect({ host: '127.0.0.1', port: s.ports['imaps'] ?? 0, ca: [readFileSync(join(ti.dir, 'certs', 'ca.crt'))], servername: 'localhost' });
  await once(sock, 'secureConnect');
  const w = new Wire(sock);
  await w.until(/^\* OK/m);
  w.write(`a1 LOGIN ${ALICE} secret\r\n`);
  t.match(await w.until(/^\* BYE/m), /^\* BYE \[UNAVAILABLE\] Internal error occurred/m, "the proxy's last words for it, over TLS");
  t.ok(await w.waitClosed(), 'and the connection closes');
  const tlog = (): string => readFileSync(join(ti.dir, 'pigeon.log'), 'utf8');
  t.match(await untilText(tlog, /Disconnected: Logged out in=/), /imap\(alice@example\.test\): Disconnected: Logged out in=\d+ out=\d+/, 'its logout line');
});

t.test("Dovecot is told the host's canonical name (DOVECOT_HOSTDOMAIN, as Dovecot's master does), not left to resolve it at every start", async (t) => {
  if (!requireProgram(t, '/usr/bin/strace', 'strace')) return;
  const s = await serve(t, inst);
  const port = s.ports['imap'] ?? 0;
  const worker = s.child.pid ?? 0;
  // a first login starts the spawner; the worker looks the name up in the background meanwhile
  const first = await login(port);
  t.match(first.answer, /^a1 OK/m);
  const spawner = proc(await imapOf(worker, port, first.w.sock.localPort ?? 0))?.ppid ?? 0;
  first.w.write('a2 LOGOUT\r\n');
  await first.w.until(/^a2 OK/m);
  // the files the next imaps open, seen from their spawner (a resolver run opens /etc/hosts)
  const out = join(inst.dir, 'strace-open.txt');
  const st = spawn('/usr/bin/strace', ['-f', '-e', 'trace=openat', '-o', out, '-p', String(spawner)], { stdio: ['ignore', 'ignore', 'pipe'] });
  t.teardown(() => {
    if (st.exitCode === null) st.kill('SIGKILL');
  });
  // strace says on stderr when it has attached to the spawner
  await new Promise<void>((res, rej) => {
    let err = '';
    st.stderr?.setEncoding('utf8');
    const onData = (d: string): void => {
      err += d;
      if (err.includes(`Process ${spawner} attached`)) {
        st.stderr?.off('data', onData);
        res();
      }
    };
    st.stderr?.on('data', onData);
    st.once('exit', (c) => rej(new Error(`strace exited ${c}: ${err}`)));
  });
  const resolved = (l: string): boolean => /"\/etc\/(hosts|host\.conf|resolv\.conf)"/.test(l);
  const opensOf = (pid: number): string[] => readFileSync(out, 'utf8').split('\n').filter((l) => l.startsWith(`${pid} `) && /openat\(/.test(l));
  // logins until one's imap starts without resolving the host name: the worker's lookup, begun
  // at the first login, has answered by then (each imap has exited, its opens are all in the log)
  let clean: { pid: number; opened: string[] } | null = null;
  const seen: number[] = [];
  for (let i = 0; i < 20 && clean === null; i++) {
    const { w, answer } = await login(port);
    t.match(answer, /^a1 OK/m);
    const imap = await imapOf(worker, port, w.sock.localPort ?? 0);
    w.write('a2 LOGOUT\r\n');
    await w.until(/^a2 OK/m);
    t.ok(await w.waitClosed());
    const opened = opensOf(imap);
    seen.push(opened.length);
    if (opened.length > 0 && !opened.some(resolved)) clean = { pid: imap, opened };
  }
  st.kill('SIGINT');
  await new Promise((r) => st.once('exit', r));
  t.ok(clean !== null, "a login's imap started without resolving the host name (no /etc/hosts, host.conf, resolv.conf opened)", { opens_per_imap: seen });
});

t.test('the spawner killed: running sessions end with their logout lines, the next login starts a new one', async (t) => {
  const s = await serve(t, inst);
  const port = s.ports['imap'] ?? 0;
  const worker = s.child.pid ?? 0;
  const a = await login(port);
  t.match(a.answer, /^a1 OK/m);
  const imap = await imapOf(worker, port, a.w.sock.localPort ?? 0);
  const spawner = proc(imap)?.ppid ?? 0;
  t.match(proc(spawner)?.cmd, /^pigeon: spawner/);
  process.kill(spawner, 'SIGKILL');
  t.ok(await a.w.waitClosed(), "the orphaned session was ended (its exit could not be seen any more)");
  const l = await untilText(log, /Disconnected: Logged out \(socket handed to the backend\)/);
  t.match(l, new RegExp(`spawner: Error: spawner \\(pid ${spawner}\\) exited \\(SIGKILL\\); 1 sessions ended, 0 starts failed`), 'the death is logged once, with what it cost');
  t.match(l, /imap\(alice@example\.test\): Warning: the spawner process exited \(SIGKILL\)/, 'the session says why it ended');
  t.match(l, /imap\(alice@example\.test\): Disconnected: Logged out \(socket handed to the backend\)/, 'and logs its logout line');
  const who = inst.run(['who', '--json']);
  t.same(JSON.parse(who.stdout), [], 'no session left in who (the user+IP slot is free)');
  const b = await login(port);
  t.match(b.answer, /^a1 OK \[CAPABILITY /m, 'a new login works');
  const imap2 = await imapOf(worker, port, b.w.sock.localPort ?? 0);
  const spawner2 = proc(imap2)?.ppid ?? 0;
  t.not(spawner2, spawner, 'through a new spawner');
  t.match(proc(spawner2)?.cmd, /^pigeon: spawner/);
  b.w.write('a2 LOGOUT\r\n');
  await b.w.until(/^a2 OK/m);
});

t.test('a login in flight when the spawner dies gets NO [UNAVAILABLE], then the same connection logs in', async (t) => {
  const s = await serve(t, inst);
  const port = s.ports['imap'] ?? 0;
  const worker = s.child.pid ?? 0;
  // a first session, to find the spawner
  const a = await login(port);
  const spawner = proc(await imapOf(worker, port, a.w.sock.localPort ?? 0))?.ppid ?? 0;
  t.match(proc(spawner)?.cmd, /^pigeon: spawner/);
  a.w.write('a2 LOGOUT\r\n');
  await a.w.until(/^a2 OK/m);
  // stopped, it takes requests into its channel but starts nothing
  process.kill(spawner, 'SIGSTOP');
  const starts = (): number => (log().match(/spawner: Debug: starting \/usr\/lib\/dovecot\/imap/g) ?? []).length;
  const before = starts();
  const w = await Wire.open(port);
  await w.until(/^\* OK/m);
  w.write(`b1 LOGIN ${ALICE} secret\r\n`);
  // the worker sent the request (its debug line), and the stopped spawner cannot have answered it
  for (const end = Date.now() + 60_000; starts() <= before && Date.now() < end; ) await new Promise((r) => setTimeout(r, 50));
  t.ok(starts() > before, 'the worker asked the spawner');
  t.equal(w.closed, false, 'the login waits for the spawner');
  process.kill(spawner, 'SIGKILL');
  const answer = await w.until(/^b1 (OK|NO|BAD)/m);
  t.match(answer, /^b1 NO \[UNAVAILABLE\]/m, 'a temporary failure, at once');
  t.match(await untilText(log, /starts failed/), /Backend failure: start-failed: cannot start dovecot imap: the spawner process exited \(SIGKILL\)/, 'logged as a backend failure');
  w.write(`b2 LOGIN ${ALICE} secret\r\n`);
  t.match(await w.until(/^b2 (OK|NO|BAD)/m), /^b2 OK \[CAPABILITY /m, 'the same connection logs in through a new spawner');
  w.write('b3 NOOP\r\nb4 LOGOUT\r\n');
  t.match(await w.until(/^b4 OK/m), /^b3 OK/m, 'and Dovecot has the connection');
});

t.test('a Dovecot imap that dies at start (exit 89) without a word: the client gets * BYE [UNAVAILABLE] through the spawner', async (t) => {
  const bin = join(inst.dir, 'imap-exit-89');
  writeFileSync(bin, '#!/bin/sh\nexit 89\n', { mode: 0o755 });
  const conf = join(inst.dir, 'conf.d', '60-exit-89.yaml');
  writeFileSync(conf, 'dovecot:\n  imap: ' + bin + '\n');
  t.teardown(() => rmSync(conf, { force: true }));
  const s = await serve(t, inst);
  const logouts = (): number => (log().match(/imap\(alice@example\.test\): Disconnected: Logged out \(socket handed to the backend\)/g) ?? []).length;
  const before = logouts();
  const { w, answer } = await login(s.ports['imap'] ?? 0);
  const all = answer + (await w.until(/^\* BYE/m));
  t.match(all, /^\* BYE \[UNAVAILABLE\] Internal error occurred/m, "the proxy's last words for it");
  t.ok(await w.waitClosed(), 'and the connection closes');
  for (const end = Date.now() + 60_000; logouts() <= before && Date.now() < end; ) await new Promise((r) => setTimeout(r, 50));
  t.equal(logouts(), before + 1, 'its logout line');
});

t.test('the spawner starts backends with vfork (native/pigeon_spawn.c); PIGEON_SPAWN=fork goes back to Node’s fork and says so', async (t) => {
  if (!requireProgram(t, '/usr/bin/strace', 'strace')) return;
  for (const mode of ['native', 'fork'] as const) {
    if (mode === 'fork') process.env['PIGEON_SPAWN'] = 'fork';
    const s = await serve(t, inst);
    delete process.env['PIGEON_SPAWN'];
    const port = s.ports['imap'] ?? 0;
    const worker = s.child.pid ?? 0;
    // a first login starts the spawner
    const a = await login(port);
    const spawner = proc(await imapOf(worker, port, a.w.sock.localPort ?? 0))?.ppid ?? 0;
    t.match(proc(spawner)?.cmd, /^pigeon: spawner/);
    const out = join(inst.dir, `strace-${mode}`);
    const st = spawn('/usr/bin/strace', ['-e', 'trace=fork,vfork,clone,clone3', '-o', out, '-p', String(spawner)], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    // strace says on stderr when it has attached
    await new Promise<void>((r) => st.stderr.on('data', (d: Buffer) => ((err += String(d)), err.includes(`Process ${spawner} attached`) ? r() : undefined)));
    const b = await login(port, 'b1');
    t.match(b.answer, /^b1 OK \[CAPABILITY /m, 'the second login');
    const imap = await imapOf(worker, port, b.w.sock.localPort ?? 0);
    t.equal(proc(imap)?.ppid, spawner, 'started by the traced spawner');
    st.kill('SIGINT');
    await new Promise((r) => st.once('exit', r));
    const trace = readFileSync(out, 'utf8');
    if (mode === 'native') {
      t.match(trace, new RegExp(`^vfork\\(\\)\\s+= ${imap}$`, 'm'), 'vfork started it');
      t.notMatch(trace, /^clone3?\(.*SIGCHLD/m, 'the spawner did not fork itself');
    } else {
      t.match(trace, new RegExp(`^clone3?\\(.*SIGCHLD.*= ${imap}$`, 'm'), 'Node forked the spawner to start it');
      t.match(await untilText(log, /starting backends with Node's child_process: PIGEON_SPAWN=fork/), /spawner/, 'the log says why');
    }
    for (const [w, tag] of [[a.w, 'a9'], [b.w, 'b9']] as const) {
      w.write(`${tag} LOGOUT\r\n`);
      await w.until(new RegExp(`^${tag} OK`, 'm'));
    }
    await s.stop();
  }
});
