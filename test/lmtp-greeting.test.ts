// The LMTP greeting is not held back: smtp-server delays it 100 ms on every connection to catch
// "early talkers" (a public-SMTP anti-spam heuristic) and answers input sent meanwhile with
// `421 You talk too soon`. LMTP comes from our own MTA, and Dovecot's lmtp greets at once, so the
// delay is left out: every new connection of Postfix's lmtp client paid it. Proven without a clock:
// a client that sends LHLO and a whole transaction together with its connection (well inside the
// old 100 ms window) gets the greeting and then a normal answer to each command, and the message
// is delivered.
import t from 'tap';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { CLI, msg, maildirOf, files, lmtpUserInstance } from './helpers/delivery-env.js';
import { Dialog, dataOf, serveLmtp } from './helpers/delivery-lmtp.js';

const ALICE = 'alice@example.test';

t.test('LMTP: input sent before the greeting is served in order, not refused', async (t) => {
  const { inst } = lmtpUserInstance(t, ALICE);
  const box = maildirOf(inst, ALICE);
  const before = files(join(box, 'new')).length;
  const { port } = await serveLmtp(t, CLI, inst);

  const s = await new Promise<Socket>((res, rej) => {
    const c = connect({ host: '127.0.0.1', port }, () => res(c));
    c.once('error', rej);
  });
  t.teardown(() => s.destroy());
  const d = Dialog.of(s);
  // everything at once, before any reply has been read (as a client that does not wait for 220)
  d.send(`LHLO mx.test\r\nMAIL FROM:<bob@remote.test>\r\nRCPT TO:<${ALICE}>\r\nDATA\r\n`);
  t.match(await d.line(), /^220 /, 'the greeting first');
  t.match(await d.line(), /^250 /, 'LHLO answered (not 421 You talk too soon)');
  t.match(await d.line(), /^250 /, 'MAIL FROM accepted');
  t.match(await d.line(), /^250 /, 'RCPT TO accepted');
  t.match(await d.line(), /^354 /, 'DATA');
  d.send(dataOf(msg({ subject: 'early' })));
  t.match(await d.line(), /^250 2\.0\.0 <alice@example\.test> Saved/);
  t.equal(files(join(box, 'new')).length, before + 1, 'the message is in new/');
  t.match(await d.cmd('QUIT'), /^221 /);
});
