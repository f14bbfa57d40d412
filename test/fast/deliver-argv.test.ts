/**
 * `pigeon deliver`'s command line read without util.parseArgs (src/delivery/deliver-cli.ts
 * plainDeliverArgs): for every line of up to four words drawn from a set of awkward ones, what it
 * accepts must be exactly what util.parseArgs (strict, the options of DELIVER_OPTIONS) reads from
 * it, and parseArgs must accept that line too; what it does not accept goes to parseArgs, as
 * before. The lines pipe(8) actually runs must take the plain path.
 */
import t from 'tap';
import { parseArgs } from 'node:util';
import { plainDeliverArgs, parseDeliverArgv, DELIVER_OPTIONS as OPTIONS } from '../../src/delivery/deliver-cli.js';

/** util.parseArgs's reading, in plainDeliverArgs's shape; null when it refuses the line */
function oracle(args: string[]): object | null {
  try {
    const p = parseArgs({ args, options: OPTIONS, allowPositionals: true, strict: true });
    const v = p.values;
    if (v.e !== undefined) return { e: v.e };
    return { from: v.from, original: v.original, mailbox: v.mailbox, path: v.path, recipients: [...(v.destination ?? []), ...p.positionals] };
  } catch {
    return null;
  }
}

const WORDS = ['-f', '--from', '-a', '-d', '--destination', '-m', '--path', '-e', '--', '-', '', 'x@y', 'b@c', '-x', '--from=a', '-fq', '--bogus', '-d=z'];

t.test('every line it accepts, util.parseArgs reads the same way', async (t) => {
  let accepted = 0;
  let lines = 0;
  const mismatches: string[] = [];
  const walk = (line: string[]): void => {
    lines++;
    const plain = plainDeliverArgs(line);
    if (plain) {
      accepted++;
      const want = oracle(line);
      if (JSON.stringify(want) !== JSON.stringify(plain)) mismatches.push(`${JSON.stringify(line)}: ${JSON.stringify(plain)} vs parseArgs ${JSON.stringify(want)}`);
    }
    if (line.length < 4) for (const w of WORDS) walk([...line, w]);
  };
  walk([]);
  t.same(mismatches.slice(0, 10), [], `no line read differently (${lines} lines, ${accepted} taken without parseArgs)`);
  t.ok(accepted > 1000, 'and it took a good part of them');
});

t.test("pipe(8)'s lines take the plain path, with the answers parseArgs gives", async (t) => {
  const lines = [
    ['-f', 'bob@remote.test', 'alice@example.test'],
    ['-f', 'bob@remote.test', '-a', 'alice@example.test', '--', 'alice@example.test'],
    ['-f', 'bob@remote.test', '-d', 'a@example.test', '-d', 'b@example.test'],
    ['--from', 'bob@remote.test', '-m', 'INBOX/Lists', '--', '-odd@example.test'],
    ['-p', '/tmp/message.eml', 'alice@example.test'],
  ];
  for (const l of lines) {
    const plain = plainDeliverArgs(l);
    t.ok(plain, `${l.join(' ')}: read without parseArgs`);
    t.same(plain, oracle(l), 'the same result as parseArgs');
  }
  t.same(parseDeliverArgv(['node', 'pigeon', '-c', '/etc/pigeon', 'deliver', '-f', 's@x', 'r@y']), { config: '/etc/pigeon', from: 's@x', original: undefined, mailbox: undefined, path: undefined, recipients: ['r@y'] }, 'parseDeliverArgv: the whole command line');
  t.same(parseDeliverArgv(['node', 'pigeon', 'deliver', '-fs@x', 'r@y'])?.from, 's@x', 'a glued value still goes through parseArgs');
  t.equal(parseDeliverArgv(['node', 'pigeon', 'deliver', '-f', '-x', 'r@y']), null, 'a value starting with - is for parseArgs, which refuses it: commander reads the line');
});
