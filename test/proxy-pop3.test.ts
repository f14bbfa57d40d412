// POP3 through `pigeon serve` to the real backends — Dovecot, then Courier (the same cases,
// parameterised): USER/PASS, AUTH PLAIN, STAT, UIDL, RETR, DELE, QUIT, STLS with the instance CA;
// the deleted message is gone from the Maildir the backend serves; a missing backend binary; a
// TLS session's backend runs on a local socket pair of which the worker keeps no copy.
import t from 'tap';
import { readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { makeInstance, serve, putMessage, message } from './helpers/instance.js';
import { BACKENDS, useBackend, binaryConf, courierBinaries } from './helpers/backends.js';
import { descendants, holds, socketInode } from './helpers/procs.js';
import { Wire } from './helpers/wire.js';

for (const backend of BACKENDS) {
  t.test(`backend ${backend}`, async (t) => {
    const inst = makeInstance(t, { listen: ['pop3=127.0.0.1:0', 'pop3s=127.0.0.1:0'], users: { 'alice@example.test': 'secret' } });
    if (!useBackend(t, inst, backend)) return;
    // 16 sessions of one user from one address at once (the pipelining case below): above the
    // default limits.max_userip_connections of 10, which is not what that case is about
    writeFileSync(join(inst.dir, 'conf.d', '60-userip.yaml'), 'limits:\n  max_userip_connections: 64\n');
    const srv = await serve(t, inst);
    const port = srv.ports['pop3'] ?? 0;
    const ca = readFileSync(join(inst.dir, 'certs', 'ca.crt'));
    // the proxy greets with Dovecot's words; courierpop3d greets the client itself
    const LOGGED_IN = backend === 'courier' ? /^\+OK logged in\./ : /^\+OK Logged in\./;

    async function login(w: Wire, user = 'alice@example.test', pass = 'secret'): Promise<string> {
      await w.until(/^\+OK.*\r\n/);
      w.write(`USER ${user}\r\n`);
      await w.until(/\r\n/);
      w.write(`PASS ${pass}\r\n`);
      return w.until(/\r\n/);
    }

    t.test('USER/PASS, STAT, UIDL, RETR, DELE, QUIT', async (t) => {
      const w = await Wire.open(port);
      t.teardown(() => w.close());
      t.match(await login(w), LOGGED_IN);
      const show = JSON.parse(inst.run(['user', 'show', 'alice@example.test', '--json']).stdout) as { allocation: { path: string } };
      const maildir = show.allocation.path;
      w.write('QUIT\r\n');
      await w.waitClosed();
      putMessage(maildir, message('pop one', 'first body'));
      putMessage(maildir, message('pop two', 'second body'));
      const w2 = await Wire.open(port);
      t.match(await login(w2), LOGGED_IN);
      w2.write('STAT\r\n');
      t.match(await w2.until(/\r\n/), /^\+OK 2 \d+/);
      w2.write('UIDL 1\r\n');
      // the UIDL forms differ (backends.md §2.6): switching backends makes clients re-download
      t.match(await w2.until(/\r\n/), backend === 'courier' ? /^\+OK 1 UID1-\d+\r\n/ : /^\+OK 1 [0-9a-f]{16}\r\n/, `${backend}'s UIDL form`);
      w2.write('RETR 1\r\n');
      const m = await w2.until(/\r\n\.\r\n/);
      t.match(m, /Subject: pop (one|two)/);
      w2.write('DELE 1\r\n');
      t.match(await w2.until(/\r\n/), /^\+OK/);
      w2.write('QUIT\r\n');
      t.match(await w2.until(/\r\n/), /^\+OK/);
      await w2.waitClosed();
      const files = [...readdirSync(join(maildir, 'cur')), ...readdirSync(join(maildir, 'new'))];
      t.equal(files.length, 1, 'one message left in the Maildir after DELE + QUIT');
    });

    t.test('AUTH PLAIN with initial response, and a wrong password', async (t) => {
      const w = await Wire.open(port);
      t.teardown(() => w.close());
      await w.until(/\r\n/);
      w.write('CAPA\r\n');
      const capa = await w.until(/\r\n\.\r\n/);
      t.match(capa, /SASL PLAIN LOGIN/);
      t.match(capa, /STLS/);
      w.write(`AUTH PLAIN ${Buffer.from('\0alice@example.test\0wrong').toString('base64')}\r\n`);
      t.match(await w.until(/\r\n/), /^-ERR \[AUTH\] Authentication failed\./);
      w.write(`AUTH PLAIN ${Buffer.from('\0alice@example.test\0secret').toString('base64')}\r\n`);
      t.match(await w.until(/\r\n/), LOGGED_IN);
      w.write('STAT\r\n');
      t.match(await w.until(/\r\n/), /^\+OK \d+ \d+/);
      w.write('CAPA\r\n');
      const after = await w.until(/\r\n\.\r\n/);
      t.match(after, backend === 'courier' ? /IMPLEMENTATION Courier Mail Server/ : /RESP-CODES/, `post-login CAPA is ${backend}'s`);
      w.write('QUIT\r\n');
      await w.until(/\r\n/);
    });

    t.test('PASS with pipelined commands: the backend answers them after the login', async (t) => {
      const w = await Wire.open(port);
      t.teardown(() => w.close());
      await w.until(/\r\n/);
      w.write('USER alice@example.test\r\n');
      await w.until(/\r\n/);
      w.write('PASS secret\r\nSTAT\r\nQUIT\r\n');
      const r = await w.until(/Bye|Logging out|\+OK \d+ \d+\r\n\+OK.*\r\n/);
      t.match(r, new RegExp(`${LOGGED_IN.source}.*\\r\\n\\+OK 1 \\d+\\r\\n\\+OK`), 'login, STAT, QUIT answered in order');
      await w.waitClosed();
    });

    t.test('PASS with many pipelined commands, 96 logins, 16 at a time: the login answer is always first', async (t) => {
      // Dovecot's POP3 hand-off: the proxy writes "+OK Logged in." and Dovecot, spawned on the
      // same socket, answers the pipelined commands; the proxy's line must be on the wire before
      // Dovecot starts. Parallel logins keep the proxy's event loop busy, as a loaded CI box does.
      const STATS = 20;
      const once = async (): Promise<string[]> => {
        const w = await Wire.open(port);
        try {
          await w.until(/\r\n/);
          w.write('USER alice@example.test\r\n');
          await w.until(/\r\n/);
          w.write(`PASS secret\r\n${'STAT\r\n'.repeat(STATS)}QUIT\r\n`);
          const all = await w.until(/(\+OK.*\r\n){22}/, 30_000);
          return all.split('\r\n').slice(0, STATS + 2);
        } finally {
          w.close();
        }
      };
      const misordered: string[] = [];
      for (let round = 0; round < 6; round++) {
        for (const lines of await Promise.all(Array.from({ length: 16 }, once))) {
          const ok = LOGGED_IN.test(lines[0] ?? '') && lines.slice(1, STATS + 1).every((l) => /^\+OK \d+ \d+$/.test(l)) && /^\+OK/.test(lines[STATS + 1] ?? '');
          if (!ok) misordered.push(lines.slice(0, 3).join(' | '));
        }
      }
      t.same(misordered, [], 'every session: the login answer, 20 STAT answers, the QUIT answer, in that order');
    });

    t.test('STLS then login; implicit TLS port', async (t) => {
      const w = await Wire.open(port);
      t.teardown(() => w.close());
      await w.until(/\r\n/);
      w.write('STLS\r\n');
      t.match(await w.until(/\r\n/), /^\+OK Begin TLS/);
      await w.starttls(ca);
      w.write('USER alice@example.test\r\n');
      await w.until(/\r\n/);
      w.write('PASS secret\r\n');
      t.match(await w.until(/\r\n/), LOGGED_IN);
      // it answered: it runs, on one end of a local socket pair whose other end the worker
      // relays; the worker keeps no copy of the backend's end (a descriptor it would never use)
      const unixSockets = new Set(readFileSync('/proc/net/unix', 'utf8').split('\n').slice(1).map((l) => l.trim().split(/\s+/)[6]));
      const bin = backend === 'dovecot' ? '/usr/lib/dovecot/pop3' : courierBinaries().pop3d;
      const worker = srv.child.pid ?? 0;
      const paired = descendants(worker, bin).filter((p) => unixSockets.has(socketInode(p, 0) ?? ''));
      t.equal(paired.length, 1, `${backend}'s pop3 for the TLS session runs on a local socket`);
      t.notOk(holds(worker, socketInode(paired[0] ?? 0, 0) ?? ''), 'the worker holds no copy of its end');
      w.write('QUIT\r\n');
      await w.until(/\r\n/);
      const log = readFileSync(join(inst.dir, 'pigeon.log'), 'utf8');
      t.match(log, /pop3-login: Login: user=<alice@example\.test>, method=PLAIN, rip=127\.0\.0\.1, lip=127\.0\.0\.1, TLS, session=/);
    });

    t.test('a missing backend binary: -ERR [SYS/TEMP], and the log names the path', async (t) => {
      const missing = join(inst.dir, 'no-such-pop3d');
      writeFileSync(join(inst.dir, 'conf.d', '60-missing.yaml'), binaryConf(backend, 'pop3', missing));
      const s2 = await serve(t, inst);
      const w = await Wire.open(s2.ports['pop3'] ?? 0);
      t.teardown(() => w.close());
      t.match(await login(w), /^-ERR \[SYS\/TEMP\]/, 'an outage, never a wrong password');
      w.write('QUIT\r\n');
      await w.until(/\r\n/);
      await s2.stop();
      const log = readFileSync(join(inst.dir, 'pigeon.log'), 'utf8');
      t.match(log, new RegExp(`Backend failure: start-failed: .*${missing.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}.*ENOENT`));
    });
  });
}
