// The test helpers leave nothing behind when tap kills a test file (test/helpers/reaper.ts): a
// stand-in for a test file starts a daemon the way the helpers do (its own process group, with a
// child of its own, as `pigeon serve` has workers and inetd has sessions) and holds a scratch
// directory, then dies by SIGKILL, as tap kills a file past its timeout. Its teardowns never run;
// the watchdog must kill the whole group and remove the directory.
import t from 'tap';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ROOT } from './helpers/instance.js';

const alive = (pid: number): boolean => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

/** Poll until `cond()` holds (a process gone, a directory removed); false after `ms`. */
async function until(cond: () => boolean, ms = 60_000): Promise<boolean> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) return false;
    await new Promise((r) => setTimeout(r, 50));
  }
  return true;
}

t.test('a test process killed with SIGKILL: its daemons, their children and its scratch directory go with it', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'pigeon-reaper-'));
  const helper = join(ROOT, 'test', 'helpers', 'reaper.ts');
  // the "test file": a daemon in its own group that forks a child (sh → sleep), and a directory
  const script = `
    import { spawn } from 'node:child_process';
    import { owned, hold } from ${JSON.stringify(helper)};
    const d = owned(spawn('sh', ['-c', 'sleep 1000 & echo $$ $!; wait'], { stdio: ['ignore', 'pipe', 'ignore'], detached: true }));
    hold('dir', ${JSON.stringify(dir)});
    d.stdout.on('data', (b) => process.stdout.write(b));
    setInterval(() => {}, 1000);
  `;
  // the same TypeScript loader tap gives this process
  const victim = spawn(process.execPath, [...process.execArgv, '--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  const pids = await new Promise<number[]>((res, rej) => {
    let out = '';
    victim.stdout.setEncoding('utf8').on('data', (s: string) => {
      out += s;
      const m = /^(\d+) (\d+)\n/.exec(out);
      if (m) res([Number(m[1]), Number(m[2])]);
    });
    victim.once('exit', (c) => rej(new Error(`the stand-in exited ${c} before it started its daemon`)));
  });
  t.ok(pids.every(alive), `daemon ${pids[0]} and its child ${pids[1]} run`);
  victim.kill('SIGKILL');
  t.ok(await until(() => !pids.some(alive)), 'after the SIGKILL the daemon and its child are gone');
  t.ok(await until(() => !existsSync(dir)), 'and the scratch directory is removed');
});
