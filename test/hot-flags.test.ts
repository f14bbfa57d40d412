// The busy long-lived processes of `pigeon serve` (its workers, their mail writer children, the
// primary that hosts the node state service) run with a quarter of V8's default interrupt
// budget, so their per-login and per-message code is optimised after a quarter of the work
// (src/hot-flags.ts). What an administrator gives node on the command line wins, and is what the
// children get. The flag's effect itself is checked too: a function is optimised after fewer
// calls once the budget is set, also when set at run time, as the primary sets it.
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { ROOT } from './helpers/instance.js';
import { CLI, msg, maildirOf, files, lmtpUserInstance, waitFor } from './helpers/delivery-env.js';
import { dataOf, lmtpDialog, serveLmtp, upToData } from './helpers/delivery-lmtp.js';
import { descendants, proc } from './helpers/procs.js';
import { HOT_INTERRUPT_BUDGET } from '../src/hot-flags.js';

const ALICE = 'alice@example.test';
const HOT = `--interrupt-budget=${HOT_INTERRUPT_BUDGET}`;
const HOT_FLAGS = pathToFileURL(join(ROOT, 'dist', 'src', 'hot-flags.js')).href;

/** How many calls of a small function V8 makes before it runs optimised, in a node started with `nodeArgs`. */
function callsBeforeOptimised(nodeArgs: readonly string[], apply: boolean): number {
  const script = `
    const { applyHotFlags } = await import(${JSON.stringify(HOT_FLAGS)});
    if (${apply}) applyHotFlags();
    function f(a) { let s = 0; for (let i = 0; i < a.length; i++) { s += a.charCodeAt(i) * i; if (s > 1e9) s %= 1000; } return s; }
    const text = 'x'.repeat(20);
    let n = 0;
    for (let i = 0; i < 100000; i++) { n += f(text); if (%GetOptimizationStatus(f) & 16) { console.log(i); process.exit(0); } }
    console.log(-1);`;
  // one compiler thread-less run: the optimised code is in place as soon as it is asked for
  const r = spawnSync(process.execPath, [...nodeArgs, '--allow-natives-syntax', '--no-concurrent-recompilation', '--input-type=module', '-e', script], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`node exited ${r.status}: ${r.stderr}`);
  return Number(r.stdout.trim());
}

t.test('the budget: a function is optimised after fewer calls, set on the command line or at run time; a budget node was given stays', async (t) => {
  const plain = callsBeforeOptimised([], false);
  const flagged = callsBeforeOptimised([HOT], false);
  const applied = callsBeforeOptimised([], true);
  const given = callsBeforeOptimised(['--interrupt-budget=67584'], true);
  t.ok(plain > 0 && flagged > 0, 'optimised in both runs', { plain, flagged });
  t.ok(flagged < plain, `with ${HOT} the function is optimised sooner`, { plain, flagged });
  t.equal(applied, flagged, 'applyHotFlags() at run time has the same effect as the flag on the command line');
  t.equal(given, plain, "applyHotFlags() leaves a budget node was started with (here V8's default, given explicitly)");
});

const root = process.getuid?.() === 0;

/** The command lines of the processes below serve's primary `pid`. */
const commands = (pid: number): string[] => descendants(pid, '').map((p) => proc(p)?.cmd ?? '');

/**
 * Both workers' mail writer children have started (exec'd: their command line is their own), and
 * no child of a worker is between fork and exec (it would show its worker's command line).
 */
const settled = (pid: number): Promise<void> =>
  waitFor('both mail writer children started', () => {
    const below = descendants(pid, '').map((p) => proc(p));
    const forking = below.some((p) => p !== null && p.ppid !== pid && p.cmd.includes(CLI));
    return !forking && below.filter((p) => p?.cmd.includes('writer-main.js')).length === 2;
  });

t.test('serve --workers 2 as root: the workers and their mail writers run with the budget; mail is delivered as before', { skip: root ? false : 'the mail writer children exist only under a root serve' }, async (t) => {
  const { inst } = lmtpUserInstance(t, ALICE);
  const box = maildirOf(inst, ALICE);
  const before = files(join(box, 'new')).length;
  const { child, port } = await serveLmtp(t, CLI, inst, { workers: 2 });
  const pid = child.pid ?? 0;
  t.notMatch(proc(pid)?.cmd ?? '', /--interrupt-budget/, 'the primary was started without the flag (it sets the budget on itself)');
  // each worker forks its writer as it opens the listener; the exec may come after "ready"
  await settled(pid);
  const all = commands(pid);
  t.equal(all.filter((c) => c.startsWith(`${process.execPath} ${HOT} ${CLI} `)).length, 2, `both workers run ${HOT}`, { all });
  t.equal(all.filter((c) => c.startsWith(`${process.execPath} ${HOT} `) && c.includes('writer-main.js')).length, 2, `both mail writer children run ${HOT}`, { all });

  const { d } = await lmtpDialog(t, port);
  await upToData(t, d, ALICE);
  d.send(dataOf(msg({ subject: 'with the budget' })));
  t.match(await d.line(), /^250 2\.0\.0 <alice@example\.test> Saved/);
  t.match(await d.cmd('QUIT'), /^221 /);
  t.equal(files(join(box, 'new')).length, before + 1, 'the message is in new/');
});

t.test("node --interrupt-budget=9000: the administrator's budget is the one the workers and writers get", { skip: root ? false : 'the mail writer children exist only under a root serve' }, async (t) => {
  const { inst } = lmtpUserInstance(t, ALICE);
  const { child } = await serveLmtp(t, CLI, inst, { workers: 2, nodeArgs: ['--interrupt-budget=9000'] });
  const pid = child.pid ?? 0;
  await settled(pid);
  const all = commands(pid);
  const workers = all.filter((c) => c.includes(CLI));
  const writers = all.filter((c) => c.includes('writer-main.js'));
  t.equal(workers.length, 2, 'two workers', { all });
  t.equal(writers.length, 2, 'two mail writers', { all });
  for (const c of [...workers, ...writers]) {
    t.match(c, / --interrupt-budget=9000 /, 'runs with the given budget', { cmd: c });
    t.notMatch(c, new RegExp(HOT), 'and not with the default one', { cmd: c });
  }
});
