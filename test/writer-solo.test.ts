// The mail-writer child blocks on an fsync only for a delivery that is alone: pigeon (root) marks a
// request `solo` unless it sent it while another request was still open (src/writer/mail-writer.ts,
// wire.ts SOLO_MS). Two deliveries at once: the second is not solo, and no sync of either is made
// in place (on the child's main thread) for SOLO_MS after that, so a slow disk does not make
// deliveries that come together wait for each other's fsync (only the one sent before the first
// overlap may have blocked). strace shows the requests on the channel and which thread made each sync.
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { mkdirSync, chownSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT, MAIL_UID, MAIL_GID } from './helpers/delivery-env.js';
import { scratchDir } from './helpers/instance.js';
import { requireProgram } from './helpers/programs.js';

const STRACE = '/usr/bin/strace';

t.test('deliveries at once: requests are no longer solo, their syncs stay on the thread pool', async (t) => {
  if (!requireProgram(t, STRACE, 'strace')) return;
  if (process.getuid?.() !== 0) {
    t.pass('needs root (the writer child runs as the mail user)', { skip: 'not root' });
    return;
  }
  const root = join(scratchDir(t), 'mail');
  const box = join(root, 'example.test', 'alice');
  for (const d of ['cur', 'new', 'tmp']) mkdirSync(join(box, d), { recursive: true });
  for (const d of [root, join(root, 'example.test'), box, ...['cur', 'new', 'tmp'].map((x) => join(box, x))]) chownSync(d, MAIL_UID, MAIL_GID);
  const script = `
    const { mailWriter } = await import(${JSON.stringify(join(ROOT, 'dist/src/writer/mail-writer.js'))});
    const w = mailWriter({ name: 'mail', uid: ${MAIL_UID}, gid: ${MAIL_GID}, switchTo: true });
    const req = (i) => ({ format: 'maildir', path: ${JSON.stringify(box)}, mailRoot: ${JSON.stringify(root)}, folder: null, createFolder: false,
      quota: 0, quotaFull: 'bounce', sender: 'bob@remote.test', hostname: 'test', prefix: Buffer.from('Subject: ' + i + '\\n\\n'),
      size: 12, vsize: 14, lockWaitMs: 1000 });
    async function* body() { yield Buffer.from('body\\n'); }
    // one alone, then two at once, twice
    const a = await w.storeAndCommit(req(0), body());
    const p1 = await Promise.all([w.storeAndCommit(req(1), body()), w.storeAndCommit(req(2), body())]);
    const p2 = await Promise.all([w.storeAndCommit(req(3), body()), w.storeAndCommit(req(4), body())]);
    process.stdout.write(JSON.stringify([a, ...p1, ...p2].map((r) => 'dsn' in r ? r.dsn : 'ok')) + '\\n');
    process.exit(0);
  `;
  const out = join(root, '..', 'strace.txt');
  const r = spawnSync(STRACE, ['-f', '-qq', '-y', '-s', '4096', '-e', 'trace=write,fsync,fdatasync', '-o', out, process.execPath, '--input-type=module', '-e', script]);
  t.equal(r.status, 0, r.stderr.toString());
  t.equal(r.stdout.toString(), '["ok","ok","ok","ok","ok"]\n', 'five messages stored');
  const lines = readFileSync(out, 'utf8').split('\n');
  const calls = lines.filter((l) => /^\d+\s+write\(/.test(l) && l.includes('t\\"\\4call\\"'));
  t.equal(calls.length, 5, 'five requests');
  // V8's serializer writes true as T and false as F after the key
  const solo = calls.map((l) => (l.includes('\\"\\4soloT') ? 'solo' : l.includes('\\"\\4soloF') ? 'not solo' : 'unmarked'));
  t.same(solo, ['solo', 'solo', 'not solo', 'not solo', 'not solo'], 'solo until a request was sent while another was open, not solo after that (SOLO_MS)');
  // the child's main thread is the one that answers (writes `done`)
  const done = lines.filter((l) => /^\d+\s+write\(/.test(l) && l.includes('t\\"\\4done\\"'));
  const main = new Set(done.map((l) => Number(/^(\d+)/.exec(l)?.[1])));
  t.equal(main.size, 1, 'one writer child');
  const syncs = lines.filter((l) => /^\d+\s+f(data)?sync\(/.test(l) && l.includes(box));
  const datasyncAt = syncs.flatMap((l, i) => (/fdatasync\(/.test(l) ? [i] : []));
  t.equal(datasyncAt.length, 5, 'an fdatasync per message');
  const inPlace = (l: string): boolean => main.has(Number(/^(\d+)/.exec(l)?.[1]));
  t.same(syncs.slice(0, 2).map(inPlace), [true, true], 'the delivery alone: its fdatasync and fsync of new/ made in place');
  // the second pair: every sync from its first fdatasync on (the fsyncs of new/ may be shared)
  const pair2 = syncs.slice(datasyncAt[3]);
  t.ok(pair2.length >= 3, 'two fdatasyncs and at least one fsync of new/ for the second pair');
  t.same(pair2.filter(inPlace), [], 'deliveries at once: every sync on a thread-pool thread', { syncs: pair2 });
});
