// The set-up line leaves a working `pigeon` command: scripts/link-pigeon.sh (run by
// scripts/install-deps.sh after the build) links BINDIR/pigeon to this clone's dist/src/cli.cjs,
// only where nothing is, or where a link into a pigeon clone is; anything else is left alone and
// the one command to run is printed; as another user it only prints that command. BINDIR is a
// test directory here (PIGEON_BINDIR), never the machine's /usr/local/bin.
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { existsSync, lstatSync, mkdirSync, readFileSync, readlinkSync, symlinkSync, writeFileSync, chmodSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT, scratchDir } from './helpers/instance.js';

const CLI = join(ROOT, 'dist', 'src', 'cli.cjs');
const VERSION = (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string }).version;

function link(bindir: string, opts: { uid?: number } = {}): { code: number | null; err: string } {
  const r = spawnSync('sh', [join(ROOT, 'scripts', 'link-pigeon.sh')], {
    encoding: 'utf8',
    env: { PATH: `${bindir}:/usr/bin:/bin`, PIGEON_BINDIR: bindir },
    ...(opts.uid !== undefined ? { uid: opts.uid, gid: opts.uid } : {}),
  });
  return { code: r.status, err: r.stderr };
}

t.test('as root: a link where nothing is; the command works; running it again changes nothing', { skip: process.getuid?.() !== 0 ? 'needs root' : false }, async (t) => {
  const bin = join(scratchDir(t), 'bin');
  mkdirSync(bin);
  const r = link(bin);
  t.equal(r.code, 0, r.err);
  t.equal(readlinkSync(join(bin, 'pigeon')), CLI, `${bin}/pigeon -> this clone's dist/src/cli.cjs`);
  const v = spawnSync('pigeon', ['--version'], { encoding: 'utf8', env: { PATH: `${bin}:${process.env['PATH'] ?? ''}` } });
  t.equal(v.stdout.trim(), VERSION, '`pigeon --version` runs through the PATH');
  const again = link(bin);
  t.equal(again.code, 0);
  t.match(again.err, 'already points to');
});

t.test('as root: a link into another pigeon clone is replaced; anything else is left alone', { skip: process.getuid?.() !== 0 ? 'needs root' : false }, async (t) => {
  const base = scratchDir(t);
  /** a bin directory `name` whose `pigeon` is a symlink to `target`, then link-pigeon.sh run on it */
  const linkedTo = (name: string, target: string): { bin: string; r: ReturnType<typeof link> } => {
    const bin = join(base, name);
    mkdirSync(bin);
    symlinkSync(target, join(bin, 'pigeon'));
    return { bin, r: link(bin) };
  };
  // another checkout of pigeon (as after a move of the clone), linked as earlier builds did (cli.js)
  const other = join(base, 'other-clone');
  mkdirSync(join(other, 'dist', 'src'), { recursive: true });
  writeFileSync(join(other, 'package.json'), '{\n  "name": "pigeon-deliver",\n  "version": "0.0.1"\n}\n');
  writeFileSync(join(other, 'dist', 'src', 'cli.js'), '#!/usr/bin/env node\n', { mode: 0o755 });
  const { bin: b1, r: r1 } = linkedTo('b1', join(other, 'dist', 'src', 'cli.js'));
  t.equal(r1.code, 0);
  t.equal(readlinkSync(join(b1, 'pigeon')), CLI, 'the link into the other clone now points here');
  t.match(r1.err, `it pointed to another pigeon clone: ${join(other, 'dist', 'src', 'cli.js')}`);

  // an unrelated program called pigeon
  const b2 = join(base, 'b2');
  mkdirSync(b2);
  writeFileSync(join(b2, 'pigeon'), '#!/bin/sh\necho not ours\n');
  chmodSync(join(b2, 'pigeon'), 0o755);
  const r2 = link(b2);
  t.equal(r2.code, 0);
  t.notOk(lstatSync(join(b2, 'pigeon')).isSymbolicLink(), 'a program that is not ours stays');
  t.equal(readFileSync(join(b2, 'pigeon'), 'utf8'), '#!/bin/sh\necho not ours\n', 'unchanged');
  t.match(r2.err, `run as root:  ln -sfn ${CLI} ${join(b2, 'pigeon')}`, 'and the one command to run is printed');

  // a link to something else
  const { bin: b3, r: r3 } = linkedTo('b3', '/bin/true');
  t.equal(readlinkSync(join(b3, 'pigeon')), '/bin/true', 'a link to another program stays');
  t.match(r3.err, 'not a pigeon clone');

  // a clone that was removed (the link dangles): that command runs no more, the link is taken
  const gone = join(base, 'removed-clone', 'dist', 'src', 'cli.cjs');
  const { bin: b4, r: r4 } = linkedTo('b4', gone);
  t.equal(r4.code, 0);
  t.equal(readlinkSync(join(b4, 'pigeon')), CLI, 'the dangling link now points here');
  t.match(r4.err, `it pointed to ${gone}, which no longer exists`);

  // a dangling link to something that is not a pigeon command stays the admin's
  const { bin: b5, r: r5 } = linkedTo('b5', '/opt/not-mounted-yet/pigeon');
  t.equal(readlinkSync(join(b5, 'pigeon')), '/opt/not-mounted-yet/pigeon', 'a dangling link elsewhere stays');
  t.match(r5.err, 'not a pigeon clone');
});

t.test('as another user: nothing is linked, the command to run is printed', { skip: process.getuid?.() !== 0 ? 'needs root to switch user' : false }, async (t) => {
  const bin = join(scratchDir(t), 'bin');
  mkdirSync(bin);
  chmodSync(bin, 0o777);
  const r = link(bin, { uid: 8 });
  t.equal(r.code, 0, r.err);
  t.notOk(existsSync(join(bin, 'pigeon')), 'no link made');
  t.match(r.err, `link-pigeon: to get the pigeon command, run as root:  ln -sfn ${CLI} ${join(bin, 'pigeon')}`);
});
