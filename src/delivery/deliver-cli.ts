/**
 * NAME        src/delivery/deliver-cli — the `pigeon deliver` entry point: argv → runDeliver → exit
 * SYNOPSIS    pigeon [-c DIR] deliver [-f SENDER] [-a ORIGINAL] [-m FOLDER] [-p FILE] [-e] [-d RCPT]... [--] [RCPT...]
 * DESCRIPTION pipe(8) starts one process per message, so this path loads only what delivery
 *             needs: src/cli.ts sends a `deliver` command line here before it loads commander and
 *             the command tree. `parseDeliverArgv` reads the command line with node's own
 *             util.parseArgs; whatever it does not take plainly (--help, --version, an unknown
 *             or ambiguous option, a global option other than -c/--config) is handed back to
 *             commander (src/commands/delivery.ts), so help, errors and their texts stay
 *             commander's. Both paths end in `deliverCommand`, the one place that maps the
 *             outcome to the exit status and the one status line.
 *             Before any of that, a running `pigeon serve` of the same instance is offered the
 *             message (src/delivery/handoff-client.ts); only when there is none does this
 *             process load the configuration and the delivery code (dynamic imports).
 *             `npm run build` inlines this module and what it imports statically into
 *             dist/src/cli.js (scripts/bundle-deliver.mjs: a hand-off loads one file of pigeon's),
 *             so a static import added here must be on that script's closed list: a second copy
 *             of this module (commander's path imports dist/src/delivery/deliver-cli.js) must
 *             hold nothing that the two could disagree on beyond `answered`, which only the copy
 *             that delivers sets.
 * DIAGNOSTICS As src/delivery/deliver.ts: 0, 65, 67, 73, and 75 for every temporary failure,
 *             any uncaught error included (pipe(8) bounces on other non-zero codes); at most one
 *             line on stdout, beginning with the enhanced status code.
 * SECURITY    Nothing from the command line is interpreted beyond the option table.
 * SEE ALSO    src/cli.ts, src/commands/delivery.ts, src/delivery/deliver.ts
 */
import { parseArgs } from 'node:util';
import { createReadStream, readSync } from 'node:fs';
import { EX } from '../errors.js';
import { statusLine } from './outcome.js';
import { handOff, type HandoffNative } from './handoff-client.js';

/** What `pigeon deliver` was asked to do. */
export interface DeliverOptions {
  readonly config: string | undefined;
  readonly from: string | undefined;
  readonly original: string | undefined;
  readonly mailbox: string | undefined;
  readonly path: string | undefined;
  /** -d values, then the arguments, in order */
  readonly recipients: readonly string[];
}

export const DELIVER_OPTIONS = {
  from: { type: 'string', short: 'f' },
  original: { type: 'string', short: 'a' },
  destination: { type: 'string', short: 'd', multiple: true },
  mailbox: { type: 'string', short: 'm' },
  path: { type: 'string', short: 'p' },
  e: { type: 'boolean', short: 'e' },
} as const;

/**
 * The options of a plain `[-c DIR] deliver …` command line (`argv` as process.argv), or null
 * when commander must read it (help, version, anything unusual).
 */
export function parseDeliverArgv(argv: readonly string[]): DeliverOptions | null {
  let config: string | undefined;
  let i = 2;
  for (; i < argv.length; i++) {
    const a = argv[i] ?? '';
    if (a === 'deliver') break;
    if ((a === '-c' || a === '--config') && i + 1 < argv.length) config = argv[++i];
    else if (a.startsWith('--config=')) config = a.slice('--config='.length);
    else return null;
  }
  if (i >= argv.length) return null; // no `deliver` word: not a deliver command line
  const rest = argv.slice(i + 1);
  // commander's words, whatever their position before `--`
  const end = rest.indexOf('--');
  if ((end < 0 ? rest : rest.slice(0, end)).some((a) => a === '-h' || a === '--help' || a === '-V' || a === '--version')) return null;
  const plain = plainDeliverArgs(rest);
  if (plain) return { config, ...plain };
  let parsed;
  try {
    parsed = parseArgs({ args: rest, options: DELIVER_OPTIONS, allowPositionals: true, strict: true });
  } catch {
    return null;
  }
  const v = parsed.values;
  return { config, from: v.from, original: v.original, mailbox: v.mailbox, path: v.path, recipients: [...(v.destination ?? []), ...parsed.positionals] };
}

/** the value options of DELIVER_OPTIONS by their two spellings (`-e`, a flag, is left to parseArgs) */
const PLAIN_OPTIONS = new Map<string, 'from' | 'original' | 'destination' | 'mailbox' | 'path'>([
  ['-f', 'from'],
  ['--from', 'from'],
  ['-a', 'original'],
  ['--original', 'original'],
  ['-d', 'destination'],
  ['--destination', 'destination'],
  ['-m', 'mailbox'],
  ['--mailbox', 'mailbox'],
  ['-p', 'path'],
  ['--path', 'path'],
]);

/**
 * The usual pipe(8) command line, `-f SENDER [-a ADDR] [--] RECIPIENT…`, read without
 * util.parseArgs (its first call costs a deliver ≈ 0.8 ms: two internal modules compiled and run):
 * options as separate words whose values do not start with `-`, each at most once (-d may
 * repeat), positionals, `--`. Anything else (`-fX`, `--from=X`, `-e`, a value starting with `-`,
 * an option given twice, one without its value): null, and parseArgs reads the line, with the
 * same result for every line this accepts (test/fast/deliver-argv.test.ts).
 */
export function plainDeliverArgs(rest: readonly string[]): Omit<DeliverOptions, 'config'> | null {
  const v: { from?: string; original?: string; mailbox?: string; path?: string } = {};
  const destinations: string[] = [];
  const positionals: string[] = [];
  for (let i = 0; i < rest.length; i++) {
    const a = rest[i] ?? '';
    if (a === '--') {
      positionals.push(...rest.slice(i + 1));
      break;
    }
    if (!a.startsWith('-')) {
      positionals.push(a);
      continue;
    }
    const key = PLAIN_OPTIONS.get(a);
    const value = rest[i + 1];
    if (key === undefined || value === undefined || value.startsWith('-')) return null;
    i++;
    if (key === 'destination') destinations.push(value);
    else if (v[key] !== undefined) return null;
    else v[key] = value;
  }
  return { from: v.from, original: v.original, mailbox: v.mailbox, path: v.path, recipients: [...destinations, ...positionals] };
}

let answered = false;
/** Print the one status line (at most once) and set the exit code. */
export function answer(code: number, line: string | null): void {
  if (answered) return;
  answered = true;
  if (line !== null) process.stdout.write(`${line}\n`);
  process.exitCode = code;
}

function tempfailOnCrash(): void {
  const die = (e: unknown): void => {
    answer(EX.TEMPFAIL, statusLine({ dsn: '4.3.0', text: `internal error (${e instanceof Error ? e.message : String(e)})` }));
    process.exit(EX.TEMPFAIL);
  };
  process.on('uncaughtException', die);
  process.on('unhandledRejection', die);
}

/** Bytes read from stdin at a time by an in-process delivery. */
const STDIN_CHUNK = 256 * 1024;

/**
 * stdin as chunks read with readSync: under pipe(8) stdin is a pipe, which process.stdin would
 * wrap in a net.Socket, loading node:net and its streams (≈ 3 ms of CPU) for one sequential
 * read. This process has nothing else to do while it reads the message (the hand-off client
 * reads it the same way). A stdin set non-blocking by whoever started us (EAGAIN) is read
 * through process.stdin from there on, nothing lost.
 */
async function* stdinChunks(): AsyncGenerator<Buffer> {
  // one buffer to read into; each chunk is a copy of what a read gave (a pipe gives at most
  // 64 KiB a read: no 256 KiB allocation per read, and the consumer may keep its chunks)
  const b = Buffer.allocUnsafe(STDIN_CHUNK);
  for (;;) {
    let n: number;
    try {
      n = readSync(0, b, 0, STDIN_CHUNK, null);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException | null)?.code;
      if (code === 'EAGAIN') {
        yield* process.stdin as AsyncIterable<Buffer>;
        return;
      }
      if (code === 'EOF') return;
      throw e;
    }
    if (n === 0) return;
    yield Buffer.from(b.subarray(0, n));
  }
}

/** -p FILE, or stdin: the stream a hand-off attempt already made of it, else read directly. */
function inputOf(path: string | undefined, stdin: NodeJS.ReadStream | null): AsyncIterable<Buffer> {
  if (path !== undefined) return createReadStream(path) as AsyncIterable<Buffer>;
  return stdin !== null ? (stdin as AsyncIterable<Buffer>) : stdinChunks();
}

/** The in-process delivery code: what a `deliver` loads when no running serve takes the message. */
export interface DeliveryCode {
  readonly runDeliver: (typeof import('./deliver.js'))['runDeliver'];
  readonly remoteStore: (typeof import('../peer/remote-store.js'))['remoteStore'];
}

/** The delivery code as module files of dist/ (node's loaders; the `pigeon` command loads one bundle instead, src/launcher.ts). */
export async function loadDeliveryCode(): Promise<DeliveryCode> {
  const [{ runDeliver }, { remoteStore }] = await Promise.all([import('./deliver.js'), import('../peer/remote-store.js')]);
  return { runDeliver, remoteStore };
}

/**
 * Deliver as `o` says; sets process.exitCode and prints at most one line. Never throws. True
 * when a running serve took the message (nothing of this process is left to finish then).
 * A running `pigeon serve` of the instance takes the message when it can (handoff-client.ts:
 * nothing but node built-ins loaded so far); otherwise, or with -p FILE, this process loads the
 * delivery code and delivers itself, with the same answers. `native`: the native module's
 * connect, which the `pigeon` command (src/launcher.ts) gives so that a hand-off needs no node:net.
 * `load`: where the delivery code comes from when this process delivers itself (the `pigeon`
 * command gives dist/src/deliver-inproc.cjs, the whole of it in one file).
 */
export async function deliverCommand(o: DeliverOptions, native?: HandoffNative | null, load: () => Promise<DeliveryCode> = loadDeliveryCode): Promise<boolean> {
  tempfailOnCrash();
  // process.stdin, when the hand-off attempt made a stream of it (a non-blocking stdin)
  let stdin: NodeJS.ReadStream | null = null;
  try {
    if (o.path === undefined) {
      const h = await handOff(
        { config: o.config, sender: o.from, original: o.original, mailbox: o.mailbox, recipients: o.recipients },
        { fd: 0, stream: () => (stdin = process.stdin) as AsyncIterable<Buffer> },
        native,
      );
      if (h !== null) {
        (stdin as NodeJS.ReadStream | null)?.destroy(); // a result before the end of the message: read no more of it
        answer(h.code, h.line);
        return true;
      }
    }
    let code: DeliveryCode;
    try {
      code = await load();
    } catch (e) {
      // a broken install defers with one line, as src/cli.ts says it for this module
      answer(EX.TEMPFAIL, statusLine({ dsn: '4.3.0', text: `internal error (cannot load the delivery code: ${(e instanceof Error ? e.message : String(e)).slice(0, 300)})` }));
      return false;
    }
    const { runDeliver, remoteStore } = code;
    const r = await runDeliver({
      config: o.config,
      sender: o.from,
      original: o.original,
      mailbox: o.mailbox,
      recipients: o.recipients,
      input: inputOf(o.path, stdin as NodeJS.ReadStream | null),
      // recipients homed on other nodes: the peer link, loaded only when one is
      remote: (instance, store, nodes) => remoteStore(instance, store, nodes),
    });
    answer(r.code, r.line);
  } catch (e) {
    answer(EX.TEMPFAIL, statusLine({ dsn: '4.3.0', text: `internal error (${e instanceof Error ? e.message : String(e)})` }));
  }
  return false;
}
