// The same proxy sessions through the real openbsd-inetd (private inetd.conf), a real Postfix
// master(8) with a spawn(8) service, and on stdio — once per backend (Dovecot, Courier).
// The cases, for one backend: test/proxy-forkers-dovecot.test.ts and test/proxy-forkers-courier.test.ts run them
// as files of their own, so tap runs the two backends side by side.
import t, { type Test } from 'tap';
import { writeFileSync, readFileSync, chownSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import { makeInstance, freePort, CLI, putMessage, message } from '../helpers/instance.js';
import { Wire, waitPort } from '../helpers/wire.js';
import { requireProgram } from '../helpers/programs.js';
import { startPostfix } from '../helpers/postfix.js';
import { useBackend, type BackendName } from '../helpers/backends.js';
import { owned, stopGroup } from '../helpers/reaper.js';
import { requireRecorder } from '../helpers/load-recorder.js';

async function imapRoundTrip(t: Test, backend: BackendName, w: Wire, user: string, pass: string): Promise<void> {
  t.match(await w.until(/\r\n/), /^\* OK \[CAPABILITY [^\]]*STARTTLS/, 'greeting offers STARTTLS on a real socket');
  w.write(`a1 LOGIN ${user} ${pass}\r\n`);
  t.match(await w.until(/a1 .*\r\n/), /a1 OK \[CAPABILITY [^\]]*IDLE[^\]]*\] Logged in/, `the login tag is answered with ${backend}'s capabilities`);
  w.write('a2 SELECT INBOX\r\n');
  t.match(await w.until(/a2 .*\r\n/), /\* 1 EXISTS[\s\S]*a2 OK/);
  w.write('a3 FETCH 1 BODY[HEADER.FIELDS (SUBJECT)]\r\n');
  t.match(await w.until(/a3 .*\r\n/), /Subject: via forker/);
  w.write('a4 LOGOUT\r\n');
  t.match(await w.until(/a4 .*\r\n/), /a4 OK/);
  t.ok(await w.waitClosed(), 'session ends at LOGOUT');
}

function prepareMailbox(inst: ReturnType<typeof makeInstance>, user: string): void {
  // first login allocates; then put one message in
  const r = spawnSync(process.execPath, [CLI, '-c', inst.dir, 'imap', '--forker', 'stdio'], { input: `a LOGIN ${user} pw\r\nb LOGOUT\r\n`, encoding: 'utf8' });
  if (!/a OK/.test(r.stdout)) throw new Error(`stdio login failed: ${r.stdout}`);
  const show = JSON.parse(inst.run(['user', 'show', user, '--json']).stdout) as { allocation: { path: string } };
  const st = statSync(show.allocation.path);
  putMessage(show.allocation.path, message('via forker', 'hello'), st.uid, st.gid);
}

export default function cases(backend: BackendName): void {
  t.test(`backend ${backend}`, async (t) => {
    t.test('stdio: a whole IMAP session on stdin/stdout', async (t) => {
      const inst = makeInstance(t, { users: { 'alice@example.test': 'pw' } });
      if (!useBackend(t, inst, backend)) return;
      prepareMailbox(inst, 'alice@example.test');
      const req = requireRecorder(inst.dir);
      const r = spawnSync(process.execPath, ['-r', req.preload, CLI, '-c', inst.dir, 'imap', '--forker', 'stdio'], {
        input: 'a1 CAPABILITY\r\na2 LOGIN alice@example.test pw\r\na3 SELECT INBOX\r\na4 LOGOUT\r\n',
        encoding: 'utf8',
      });
      t.equal(r.status, 0);
      t.notMatch(r.stdout, /STARTTLS/, 'no STARTTLS on a pipe');
      t.match(r.stdout, /a2 OK \[CAPABILITY/);
      t.match(r.stdout, /\* 1 EXISTS/);
      t.match(r.stdout, backend === 'courier' ? /a4 OK LOGOUT completed/ : /a4 OK Logout completed/);
      t.equal(r.stderr, '', 'nothing on stderr');
      // one session per process: it counts nothing (src/metrics.ts countNothing), prom-client stays unloaded
      t.ok(req.read().some((f) => f.endsWith('.cjs')), 'the preload recorded what require() loaded');
      t.same(req.read().filter((f) => f.includes('/node_modules/prom-client/')), [], 'prom-client not loaded');
      const p = spawnSync(process.execPath, [CLI, '-c', inst.dir, 'pop3', '--forker', 'stdio'], { input: 'USER alice@example.test\r\nPASS pw\r\nSTAT\r\nQUIT\r\n', encoding: 'utf8' });
      // courierpop3d greets the client itself ("+OK logged in."); for Dovecot the proxy does
      t.match(p.stdout, backend === 'courier' ? /\+OK logged in\.\r\n\+OK 1 \d+\r\n/ : /\+OK Logged in\.\r\n\+OK 1 \d+\r\n/);
    });

    t.test('openbsd-inetd runs the proxy from its own inetd.conf line', async (t) => {
      if (!requireProgram(t, '/usr/sbin/inetd', 'openbsd-inetd')) return;
      const inst = makeInstance(t, { users: { 'alice@example.test': 'pw' } });
      if (!useBackend(t, inst, backend)) return;
      prepareMailbox(inst, 'alice@example.test');
      const port = await freePort();
      const pport = await freePort();
      const conf = join(inst.dir, 'inetd.conf');
      writeFileSync(
        conf,
        `127.0.0.1:${port} stream tcp nowait.2000 root ${process.execPath} node ${CLI} -c ${inst.dir} imap --forker inetd\n` +
          `127.0.0.1:${pport} stream tcp nowait.2000 root ${process.execPath} node ${CLI} -c ${inst.dir} pop3 --forker inetd\n`,
      );
      const inetd = owned(spawn('/usr/sbin/inetd', ['-d', conf], { stdio: 'ignore', detached: true }));
      t.teardown(() => stopGroup(inetd));
      const w = await waitPort(port);
      await imapRoundTrip(t, backend, w, 'alice@example.test', 'pw');
      const p = await waitPort(pport);
      t.match(await p.until(/\r\n/), /^\+OK/);
      p.write('USER alice@example.test\r\nPASS pw\r\n');
      t.match(await p.until(/[Ll]ogged in.*\r\n/), backend === 'courier' ? /\+OK logged in\./ : /\+OK Logged in\./);
      p.write('QUIT\r\n');
      await p.until(/\r\n/);
      const log = readFileSync(join(inst.dir, 'pigeon.log'), 'utf8');
      t.match(log, /imap-login: Login: user=<alice@example\.test>, method=PLAIN, rip=127\.0\.0\.1, lip=127\.0\.0\.1, session=/, 'peer address read from the inherited socket');
    });

    t.test('Postfix master.cf spawn(8) service runs the proxy', async (t) => {
      if (!requireProgram(t, '/usr/sbin/postfix', 'postfix')) return;
      const inst = makeInstance(t, { users: { 'alice@example.test': 'pw' } });
      if (!useBackend(t, inst, backend)) return;
      prepareMailbox(inst, 'alice@example.test');
      // spawn(8) refuses root: pigeon runs as `mail`, which then owns the instance
      const chown = (p: string): void => {
        chownSync(p, 8, 8);
        if (statSync(p).isDirectory()) for (const e of readdirSync(p)) chown(join(p, e));
      };
      chown(inst.dir);
      const port = await freePort();
      const pf = startPostfix(
        t,
        `127.0.0.1:${port} inet n n n - 100 spawn -o command_time_limit=86400s -o daemon_timeout=86400s user=mail argv=${process.execPath} ${CLI} -c ${inst.dir} imap --forker postfix\n`,
      );
      const w = await waitPort(port);
      await imapRoundTrip(t, backend, w, 'alice@example.test', 'pw');
      t.notMatch(pf.log(), /fatal|panic/, 'postfix logged no fatal error');
    });
  });
}
