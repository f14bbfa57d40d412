/**
 * NAME        src/anvil/main — the node state service as a process of its own
 * SYNOPSIS    node dist/src/anvil/main.js RUN_DIR [--idle-ms N] [--log FILE]
 *             (started detached by src/anvil/client.ts; not a command admins run)
 * DESCRIPTION Takes over RUN_DIR/anvil.sock (src/anvil/server.ts) and serves it until idle. When
 *             fd 3 is a pipe (the starter's), writes one line there, then closes it: `ready`
 *             (this process serves), `taken` (another service already does) or `error: …`.
 *             Loads no configuration: every limit comes with the requests. Logs to --log FILE
 *             (log.file) only while that file exists.
 * DIAGNOSTICS exit 0 when idle, taken, or its socket was removed; 75 when it cannot serve.
 * SECURITY    Started with /dev/null on fds 0-2 (never the client socket of an inetd process),
 *             in its own session, cwd /.
 */
import { closeSync, constants, fstatSync, openSync, writeSync } from 'node:fs';
import { openRunDir } from './run-dir.js';
import { ownService, type AnvilLog } from './server.js';
import { ANVIL_IDLE_MS } from '../limits.js';

function tell(line: string): void {
  try {
    const st = fstatSync(3);
    if (!st.isFIFO() && !st.isSocket()) return;
    writeSync(3, `${line}\n`);
    closeSync(3);
  } catch {
    /* no starter listening */
  }
}

async function main(argv: readonly string[]): Promise<number> {
  const dirPath = argv[0];
  let idleMs = ANVIL_IDLE_MS;
  let logFile: string | null = null;
  for (let i = 1; i < argv.length; i++) {
    if (argv[i] === '--idle-ms') idleMs = Number(argv[++i]);
    else if (argv[i] === '--log') logFile = argv[++i] ?? null;
  }
  if (dirPath === undefined || !Number.isFinite(idleMs) || idleMs < 0) {
    tell('error: usage: main.js RUN_DIR [--idle-ms N] [--log FILE]');
    return 64;
  }
  // appends to the log file only while it exists: the service never creates a file outside
  // run_dir (nor re-creates the log of an instance that is being removed)
  const log: AnvilLog = (level, msg) => {
    if (logFile === null) return;
    try {
      const fd = openSync(logFile, constants.O_WRONLY | constants.O_APPEND);
      try {
        writeSync(fd, `${new Date().toISOString()} pigeon[${process.pid}]: anvil: ${level === 'info' ? '' : `${level === 'warn' ? 'Warning' : 'Error'}: `}${msg}\n`);
      } finally {
        closeSync(fd);
      }
    } catch {
      /* a log we cannot write must not stop the service */
    }
  };
  process.title = `pigeon-anvil ${dirPath}`;
  try {
    const dir = openRunDir(dirPath, { create: false });
    const r = await ownService(dir, {
      log,
      idleMs,
      onStop: (why) => {
        log('info', `node state service stopping (${why})`);
        process.exit(0);
      },
    });
    if (r.kind === 'taken') {
      tell('taken');
      return 0;
    }
    log('info', `node state service started in ${dirPath} (pid ${process.pid})`);
    tell('ready');
    await new Promise(() => {}); // served until onStop
    return 0;
  } catch (e) {
    tell(`error: ${e instanceof Error ? e.message : String(e)}`);
    log('error', `${e instanceof Error ? e.message : String(e)}`);
    return 75;
  }
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  () => process.exit(70),
);
