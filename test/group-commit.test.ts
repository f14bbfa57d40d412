// Group commit of directory fsyncs (src/writer/safe-fs.ts fsyncDirGrouped, used by the Maildir
// commit for new/): callers that join in the same turn share one fsync; callers that join while an
// fsync runs are NOT answered by it (their rename may have come after it began) but share the next
// one. strace counts the real fsync(2) calls on the directory.
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT } from './helpers/delivery-env.js';
import { scratchDir } from './helpers/instance.js';
import { requireProgram } from './helpers/programs.js';

const STRACE = '/usr/bin/strace';

t.test('one fsync per batch, and a caller is covered only by an fsync that began after it joined', async (t) => {
  if (!requireProgram(t, STRACE, 'strace')) return;
  const dir = join(scratchDir(t), 'new');
  mkdirSync(dir);
  const out = join(dir, '..', 'strace.txt');
  const script = `
    const { fsyncDirGrouped } = await import(${JSON.stringify(join(ROOT, 'dist/src/writer/safe-fs.js'))});
    const dir = ${JSON.stringify(dir)};
    // 20 callers in one turn of the event loop: one fsync for all
    await Promise.all(Array.from({ length: 20 }, () => fsyncDirGrouped(dir)));
    // one caller; once its fsync is under way, 10 more join: they wait for a second fsync
    const first = fsyncDirGrouped(dir);
    await new Promise((r) => setImmediate(r));
    await new Promise((r) => setImmediate(r));
    const late = Array.from({ length: 10 }, () => fsyncDirGrouped(dir));
    await Promise.all([first, ...late]);
    process.stdout.write('done\\n');
  `;
  const r = spawnSync(STRACE, ['-f', '-qq', '-y', '-e', 'trace=fsync,fdatasync', '-o', out, process.execPath, '--input-type=module', '-e', script]);
  t.equal(r.status, 0, r.stderr.toString());
  t.equal(r.stdout.toString(), 'done\n', 'every caller was answered');
  const syncs = readFileSync(out, 'utf8')
    .split('\n')
    .filter((l) => /\bf(data)?sync\(/.test(l) && l.includes(`<${dir}>`) && !l.includes('resumed>'));
  t.equal(syncs.length, 3, `31 callers, 3 fsyncs of ${dir}: 1 for the first 20, 1 for the lone caller, 1 for the 10 that joined while it ran\n${syncs.join('\n')}`);
});
