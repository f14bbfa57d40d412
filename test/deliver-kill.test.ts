// pigeon deliver killed with SIGKILL at every step of a delivery (PIGEON_FAULT): nothing partial
// in new/, nothing acknowledged, and what is left in tmp/ belongs to the mail user.
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { CLI, makeInstance, maildirOf, files, msg, dovecotRead, MAIL_UID } from './helpers/delivery-env.js';
import { scratchDir } from './helpers/instance.js';

const ALICE = 'alice@example.test';

t.test('kill -9 at each step: nothing partial in new/, nothing acknowledged', async (t) => {
  const inst = makeInstance(scratchDir(t));
  const box = maildirOf(inst, ALICE);
  const body = `${'0123456789'.repeat(50)}\n`.repeat(4000); // 2 MB: spooled to a file
  for (const step of ['spooled', 'tmp-partial', 'tmp-synced', 'renamed']) {
    const before = files(join(box, 'new')).length;
    const r = spawnSync(process.execPath, [CLI, '-c', inst, 'deliver', '-f', 'bob@remote.test', ALICE], {
      input: msg({ subject: step, body }),
      env: { ...process.env, PIGEON_FAULT: step },
      maxBuffer: 1 << 20,
    });
    t.equal(r.signal, 'SIGKILL', `${step}: died by SIGKILL (Postfix: deferred, retried)`);
    t.equal(r.stdout.length, 0, `${step}: printed nothing (acknowledged nothing)`);
    const now = files(join(box, 'new'));
    if (step === 'renamed') {
      // the rename happened: the file in new/ is complete (a retry may duplicate, never truncate)
      t.equal(now.length, before + 1, 'renamed: one complete message in new/');
      for (const f of now) {
        const size = Number(/,S=(\d+)/.exec(f)?.[1]);
        t.equal(statSync(join(box, 'new', f)).size, size, 'complete: size matches S=');
      }
    } else t.equal(now.length, before, `${step}: nothing in new/`);
  }
  const { messages } = await dovecotRead(`maildir:${box}`);
  t.equal(messages.length, 1, 'Dovecot sees only the complete message');
  const left = files(join(box, 'tmp'));
  t.ok(left.length >= 1, 'partial files stay in tmp/ (removed after 36 h)');
  // pigeon deliver ran as root here: the killed writer was nevertheless the mail user
  for (const f of left) t.equal(statSync(join(box, 'tmp', f)).uid, MAIL_UID, `leftover ${f} is owned by the mail user, not root`);
});
