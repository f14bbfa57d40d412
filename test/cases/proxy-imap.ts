// imapflow through `pigeon serve` to the real backends — Dovecot, then Courier (the same cases,
// parameterised): LOGIN, AUTHENTICATE PLAIN, LIST, SELECT, FETCH of a message put into the
// Maildir, APPEND, IDLE, LOGOUT; folders as Maildir++ directories; STARTTLS and implicit TLS
// verified against the instance CA; wrong password, unknown user, disabled user; an mbox user.
// The cases, for one backend: test/proxy-imap-dovecot.test.ts and test/proxy-imap-courier.test.ts run them
// as files of their own, so tap runs the two backends side by side.
import t from 'tap';
import { ImapFlow } from 'imapflow';
import { readFileSync, readdirSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { makeInstance, serve, putMessage, message, CLI } from '../helpers/instance.js';
import { type BackendName, useBackend } from '../helpers/backends.js';
import { requireProgram } from '../helpers/programs.js';
import { Wire } from '../helpers/wire.js';

export default function cases(backend: BackendName): void {
  t.test(`backend ${backend}`, async (t) => {
    const inst = makeInstance(t, { listen: ['imap=127.0.0.1:0', 'imaps=127.0.0.1:0'], users: { 'alice@example.test': 'secret', 'carol@example.test': 'c4rol' } });
    if (!useBackend(t, inst, backend)) return;
    const srv = await serve(t, inst);
    const ca = readFileSync(join(inst.dir, 'certs', 'ca.crt'));

    function client(opts: { user: string; pass: string; secure?: boolean; starttls?: boolean; loginMethod?: string }): ImapFlow {
      return new ImapFlow({
        host: '127.0.0.1',
        port: opts.secure ? (srv.ports['imaps'] ?? 0) : (srv.ports['imap'] ?? 0),
        secure: opts.secure ?? false,
        doSTARTTLS: opts.starttls ?? false,
        tls: { ca: [ca], servername: 'localhost' },
        auth: { user: opts.user, pass: opts.pass, ...(opts.loginMethod ? { loginMethod: opts.loginMethod } : {}) },
        logger: false,
        verifyOnly: false,
      } as ConstructorParameters<typeof ImapFlow>[0]);
    }

    t.test(`LOGIN, first login allocates the mailbox, FETCH a message ${backend} serves`, async (t) => {
      const c = client({ user: 'alice@example.test', pass: 'secret' });
      await c.connect();
      t.teardown(() => c.close());
      const show = JSON.parse(inst.run(['user', 'show', 'alice@example.test', '--json']).stdout) as { home: string; allocation: { path: string; format: string } };
      t.equal(show.home, 'test1', 'allocated on this node at first login');
      t.equal(show.allocation.format, 'maildir');
      t.same(readdirSync(show.allocation.path).sort().filter((d) => ['cur', 'new', 'tmp'].includes(d)), ['cur', 'new', 'tmp']);
      putMessage(show.allocation.path, message('hello through the proxy', 'body text 123'));
      const boxes = await c.list();
      t.ok(boxes.some((b) => b.path === 'INBOX'), 'LIST shows INBOX');
      const lock = await c.getMailboxLock('INBOX');
      try {
        t.equal((c.mailbox as { exists: number }).exists, 1, 'SELECT sees the message');
        const m = await c.fetchOne('1', { envelope: true, source: true });
        t.equal(m && m.envelope?.subject, 'hello through the proxy');
        t.match(m && m.source?.toString(), /body text 123/);
      } finally {
        lock.release();
      }
      t.ok(c.capabilities.has('IDLE') && c.capabilities.has('UIDPLUS'), `post-login capabilities are ${backend}'s`);
      if (backend === 'courier') {
        // Courier's own list (Debian's IMAP_CAPABILITY + what imapd adds), learnt by the proxy's CAPABILITY
        t.ok(['QUOTA', 'ACL', 'THREAD=REFERENCES', 'ENABLE'].every((c2) => c.capabilities.has(c2)), "post-login capabilities are Courier's");
        t.notOk(c.capabilities.has('AUTH=PLAIN'), 'no pre-login capability after login');
      } else t.ok(c.capabilities.has('MOVE') && c.capabilities.has('SORT=DISPLAY'), "post-login capabilities are Dovecot's");
      await c.logout();
      const log = readFileSync(join(inst.dir, 'pigeon.log'), 'utf8');
      t.match(log, /imap-login: Login: user=<alice@example\.test>, method=PLAIN, rip=127\.0\.0\.1, lip=127\.0\.0\.1, session=<[^>]+>/);
      t.notMatch(log, /secret/, 'no password in the log');
    });

    t.test('AUTHENTICATE PLAIN, APPEND and IDLE', async (t) => {
      const c = client({ user: 'alice@example.test', pass: 'secret', loginMethod: 'AUTH=PLAIN' });
      await c.connect();
      t.teardown(() => c.close());
      const r = await c.append('INBOX', message('appended', 'via APPEND'));
      t.ok(r && r.uid, 'APPEND returns a UID');
      const lock = await c.getMailboxLock('INBOX');
      const before = (c.mailbox as { exists: number }).exists;
      const seen = new Promise<number>((res) => c.on('exists', (d: { count: number }) => res(d.count)));
      const idle = c.idle();
      const other = client({ user: 'alice@example.test', pass: 'secret' });
      await other.connect();
      await other.append('INBOX', message('while idling', 'x'));
      await other.logout();
      const count = await Promise.race([seen, new Promise<number>((res) => setTimeout(() => res(-1), 60_000).unref())]);
      t.equal(count, before + 1, 'IDLE reports the new message');
      lock.release();
      void idle;
      await c.logout();
      const log = readFileSync(join(inst.dir, 'pigeon.log'), 'utf8');
      t.match(log, /method=PLAIN/);
    });

    t.test('the login tag is answered with the post-login CAPABILITY list; pipelined commands follow', async (t) => {
      const w = await Wire.open(srv.ports['imap'] ?? 0);
      t.teardown(() => w.close());
      await w.until(/\r\n/);
      // LOGIN and SELECT in one packet: the bytes after LOGIN reach the backend after its login answer
      w.write('a1 LOGIN alice@example.test secret\r\na2 SELECT INBOX\r\n');
      const r = await w.until(/a2 .*\r\n/);
      t.match(r, /^a1 OK \[CAPABILITY IMAP4rev1 [^\]]*IDLE[^\]]*\] Logged in\r\n/, 'one tagged OK with the capability list, first');
      t.notMatch(r, /pigeon0|LOGIN Ok\.|\[ALERT\]/, "nothing of the proxy's internal exchange (or a FAM alert) reaches the client");
      t.match(r, /a2 OK \[READ-WRITE\]/);
      w.write('a3 LOGOUT\r\n');
      t.match(await w.until(/a3 .*\r\n/), backend === 'courier' ? /\* BYE Courier-IMAP server shutting down\r\na3 OK LOGOUT completed/ : /\* BYE Logging out\r\na3 OK Logout completed/);
      // Courier reached gam_server (FAM): no ~1.2 s wait at login, IDLE pushes new mail
      t.notMatch(readFileSync(join(inst.dir, 'pigeon.log'), 'utf8'), /could not reach gam_server/, 'no FAM warning in the log');
    });

    t.test('a folder created over IMAP is the Maildir++ folder the delivery agent uses', async (t) => {
      const c = client({ user: 'alice@example.test', pass: 'secret' });
      await c.connect();
      t.teardown(() => c.close());
      const created = await c.mailboxCreate('Sent');
      // Courier's personal namespace is "INBOX." (backends.md §2.3); Dovecot's is empty
      t.equal(created.path, backend === 'courier' ? 'INBOX.Sent' : 'Sent', `${backend} names the folder in its namespace`);
      const show = JSON.parse(inst.run(['user', 'show', 'alice@example.test', '--json']).stdout) as { allocation: { path: string } };
      t.ok(existsSync(join(show.allocation.path, '.Sent', 'cur')), 'on disk: the Maildir++ folder .Sent');
      putMessage(join(show.allocation.path, '.Sent'), message('filed', 'in Sent'));
      // the delivery agent: `user+Sent@domain` goes into the existing Maildir++ folder .Sent
      const d = spawnSync(process.execPath, [CLI, '-c', inst.dir, 'deliver', '-f', 'bob@example.test', 'alice+Sent@example.test'], { input: message('delivered to Sent', 'by pigeon deliver'), encoding: 'utf8' });
      t.equal(d.status, 0, `pigeon deliver to alice+Sent: ${d.stdout}${d.stderr}`);
      const st = await c.status(created.path, { messages: true });
      t.equal(st ? st.messages : null, 2, `${backend} sees both messages in the folder`);
      const lock = await c.getMailboxLock(created.path);
      try {
        const subjects: string[] = [];
        for await (const m of c.fetch('1:*', { envelope: true })) subjects.push(m.envelope?.subject ?? '');
        t.same(subjects.sort(), ['delivered to Sent', 'filed'], "the delivery agent's file names and sizes are read as they are");
      } finally {
        lock.release();
      }
      await c.logout();
    });

    t.test('STARTTLS and implicit TLS with the instance CA', async (t) => {
      const c = client({ user: 'alice@example.test', pass: 'secret', starttls: true });
      await c.connect();
      t.ok(c.secureConnection || (c as unknown as { socket: { encrypted?: boolean } }).socket.encrypted, 'upgraded to TLS');
      await c.mailboxOpen('INBOX');
      await c.logout();
      const s = client({ user: 'alice@example.test', pass: 'secret', secure: true });
      await s.connect();
      const st = await s.status('INBOX', { messages: true });
      t.ok(((st ? st.messages : 0) ?? 0) >= 1, 'STATUS over implicit TLS');
      await s.logout();
      const log = readFileSync(join(inst.dir, 'pigeon.log'), 'utf8');
      t.match(log, /Login: user=<alice@example\.test>, method=PLAIN, rip=127\.0\.0\.1, lip=127\.0\.0\.1, TLS, session=/);
    });

    t.test('wrong password, unknown user, disabled user: AUTHENTICATIONFAILED', async (t) => {
      for (const [user, pass] of [
        ['alice@example.test', 'wrong'],
        ['nobody@example.test', 'secret'],
      ] as const) {
        const c = client({ user, pass });
        const err = await c.connect().then(
          () => null,
          (e: { authenticationFailed?: boolean; serverResponseCode?: string }) => e,
        );
        t.ok(err, `${user}/${pass} refused`);
        t.equal(err?.serverResponseCode, 'AUTHENTICATIONFAILED');
        c.close();
      }
      t.equal(inst.run(['user', 'disable', 'carol@example.test']).status, 0);
      const c = client({ user: 'carol@example.test', pass: 'c4rol' });
      const err = await c.connect().then(
        () => null,
        (e: { serverResponseCode?: string }) => e,
      );
      t.equal(err?.serverResponseCode, 'AUTHENTICATIONFAILED', 'disabled user refused like a wrong password');
      c.close();
      const show = JSON.parse(inst.run(['user', 'show', 'carol@example.test', '--json']).stdout) as { allocation: unknown };
      t.equal(show.allocation, null, 'no mailbox allocated and no backend started for a refused login');
      const log = readFileSync(join(inst.dir, 'pigeon.log'), 'utf8');
      t.match(log, /imap-login: auth failed \(bad-credentials\): user=<alice@example\.test>/);
      t.match(log, /imap-login: auth failed \(unknown-user\): user=<nobody@example\.test>/);
      t.match(log, /imap-login: auth failed \(disabled\): user=<carol@example\.test>/);
    });

    t.test('imap.enabled=false refuses IMAP for that user', async (t) => {
      inst.addUser('dave@example.test', 'd4ve');
      t.equal(inst.run(['config', 'set', '--user', 'dave@example.test', 'imap.enabled', 'false']).status, 0);
      const c = client({ user: 'dave@example.test', pass: 'd4ve' });
      const err = await c.connect().then(
        () => null,
        (e: { serverResponseCode?: string }) => e,
      );
      t.equal(err?.serverResponseCode, 'AUTHENTICATIONFAILED');
      c.close();
    });

    t.test(`one config set switches a user from ${backend === 'courier' ? 'dovecot' : 'courier'} to ${backend}: warned, then curl and imapflow read the same mail`, async (t) => {
      const other = backend === 'courier' ? 'dovecot' : 'courier';
      inst.addUser('sam@example.test', 's4m');
      t.equal(inst.run(['config', 'set', '--user', 'sam@example.test', 'imap.backend', other]).status, 0);
      const c1 = client({ user: 'sam@example.test', pass: 's4m' });
      await c1.connect();
      const show = JSON.parse(inst.run(['user', 'show', 'sam@example.test', '--json']).stdout) as { allocation: { path: string } };
      putMessage(show.allocation.path, message('before the switch', 'kept'));
      t.equal((await c1.status('INBOX', { messages: true })) ? 1 : 0, 1, `${other} serves the mailbox first`);
      await c1.logout();
      const r = inst.run(['config', 'set', '--user', 'sam@example.test', 'imap.backend', backend]);
      t.equal(r.status, 0, 'the switch is one command');
      t.match(r.stderr, new RegExp(`pigeon: warning: imap\\.backend: 1 mailbox\\(es\\) that already hold mail now use ${backend} instead of ${other}: sam@example\\.test\\. IMAP clients will see new UIDVALIDITY values and re-download every message`), 'warned: clients re-download');
      const c2 = client({ user: 'sam@example.test', pass: 's4m' });
      await c2.connect();
      const lock = await c2.getMailboxLock('INBOX');
      try {
        const m = await c2.fetchOne('1', { envelope: true });
        t.equal(m && m.envelope?.subject, 'before the switch', `${backend} serves the same Maildir after the switch`);
      } finally {
        lock.release();
      }
      await c2.logout();
      if (!requireProgram(t, '/usr/bin/curl', 'curl')) return;
      const cu = spawnSync('curl', ['-sS', '--max-time', '20', '--user', 'sam@example.test:s4m', `imap://127.0.0.1:${srv.ports['imap'] ?? 0}/INBOX;MAILINDEX=1`], { encoding: 'utf8' });
      t.equal(cu.status, 0, `curl exits 0 (${cu.stderr.trim()})`);
      t.match(cu.stdout, /Subject: before the switch/, 'curl reads the message through the proxy');
      const log = readFileSync(join(inst.dir, 'pigeon.log'), 'utf8');
      t.match(log, /imap-login: Login: user=<sam@example\.test>/);
    });

    // Courier only: the Dovecot backend runs without its quota plugin (quota is enforced at delivery)
    if (backend === 'courier') t.test('mailstore.quota: Courier keeps the Maildir++ maildirsize the delivery agent keeps, and refuses APPEND over it', async (t) => {
      inst.addUser('quinn@example.test', 'qu1nn');
      t.equal(inst.run(['config', 'set', '--user', 'quinn@example.test', 'mailstore.quota', '2000']).status, 0);
      const w = await Wire.open(srv.ports['imap'] ?? 0);
      t.teardown(() => w.close());
      await w.until(/\r\n/);
      w.write('q1 LOGIN quinn@example.test qu1nn\r\n');
      t.match(await w.until(/q1 .*\r\n/), /^q1 OK \[CAPABILITY [^\]]*QUOTA/);
      w.write('q2 APPEND INBOX {3000}\r\n');
      const cont = await w.until(/^(\+|q2) .*\r\n/m);
      if (cont.startsWith('+')) {
        w.write(`${'x'.repeat(2998)}\r\n\r\n`);
        t.match(await w.until(/q2 .*\r\n/), /q2 NO \[ALERT\] You exceeded your mail quota\./, 'over quota: refused');
      } else t.match(cont, /q2 NO .*quota/, 'over quota: refused');
      w.write('q3 GETQUOTAROOT INBOX\r\n');
      t.match(await w.until(/q3 .*\r\n/), /\* QUOTA "ROOT" \(STORAGE \d+ 2\)/, 'the limit is mailstore.quota (2000 bytes = 2 KB)');
      w.write('q4 LOGOUT\r\n');
      await w.until(/q4 .*\r\n/);
      const show = JSON.parse(inst.run(['user', 'show', 'quinn@example.test', '--json']).stdout) as { allocation: { path: string } };
      t.match(readFileSync(join(show.allocation.path, 'maildirsize'), 'utf8'), /^2000S\n/, 'maildirsize carries the same limit the delivery agent checks');
    });

    t.test('an mbox user: Dovecot serves it, Courier refuses with UNAVAILABLE and a log line', async (t) => {
      inst.addUser('mona@example.test', 'm0na');
      t.equal(inst.run(['config', 'set', '--user', 'mona@example.test', 'mailstore.format', 'mbox']).status, 0);
      const w = await Wire.open(srv.ports['imap'] ?? 0);
      t.teardown(() => w.close());
      await w.until(/\r\n/);
      w.write('m1 LOGIN mona@example.test m0na\r\n');
      const r = await w.until(/m1 .*\r\n/);
      if (backend === 'courier') {
        t.match(r, /^m1 NO \[UNAVAILABLE\]/, 'Courier serves Maildir only: UNAVAILABLE, never a wrong password');
        const log = readFileSync(join(inst.dir, 'pigeon.log'), 'utf8');
        t.match(log, /imap\(mona@example\.test\): Error: Backend failure: start-failed: courier serves Maildir only, and the mailbox of mona@example\.test is mbox \(\S+mona\.mbox\)/);
      } else {
        t.match(r, /^m1 OK \[CAPABILITY/);
      }
      w.write('m2 LOGOUT\r\n');
      await w.until(/m2 .*\r\n/);
    });
  });
}
