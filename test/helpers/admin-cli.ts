// The admin CLI tests' shared pieces: run one command or several at once, read the database
// behind the CLI's back, and a fresh instance (one domain, one user) made by the real CLI.
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFileSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import type { Test } from 'tap';
import { openStore, type Allocation } from '../../src/store.js';
import { runCli, startCli, type CliRun } from './cli.js';
import { scratchDir } from './instance.js';

export const NODE = 'node-a.example.net';

export type Run = CliRun;

export function run(args: readonly string[], input = ''): Run {
  return runCli(args, { input });
}

/** Run several independent commands at once (at most 4 processes): the same checks, less waiting. */
export async function runAll(cmds: readonly (readonly [readonly string[], string?])[]): Promise<Run[]> {
  const out: Run[] = new Array<Run>(cmds.length);
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < cmds.length) {
      const i = next++;
      const [args, input] = cmds[i] as readonly [readonly string[], string?];
      out[i] = await startCli(args, input ?? '');
    }
  };
  await Promise.all([worker(), worker(), worker(), worker()]);
  return out;
}

export function json(r: Run): unknown {
  try {
    return JSON.parse(r.out);
  } catch {
    throw new Error(`not JSON (exit ${String(r.code)}): ${r.out}\n${r.err}`);
  }
}

export function dovecotVerifies(hash: string, password: string): boolean {
  const r = spawnSync('doveadm', ['pw', '-t', hash, '-p', password], { encoding: 'utf8' });
  return r.status === 0 && r.stdout.includes('(verified)');
}

export function storedHash(dbPath: string, address: string): string | null {
  const db = new Database(dbPath, { readonly: true });
  try {
    const r = db.prepare<[string], { password: string | null }>('SELECT password FROM users WHERE address = ?').get(address);
    return r?.password ?? null;
  } finally {
    db.close();
  }
}

export function userCount(dbPath: string): number {
  const db = new Database(dbPath, { readonly: true });
  try {
    return (db.prepare('SELECT count(*) AS c FROM users').get() as { c: number }).c;
  } finally {
    db.close();
  }
}

/** Give a user a home and a mailbox allocation, as the mailstore would (compare-and-set). */
export async function allocate(dbPath: string, address: string, alloc: Allocation): Promise<void> {
  const store = await openStore(dbPath);
  try {
    const u = await store.mustUser(address);
    if (!(await store.casAllocation(u.id, u.version, NODE, alloc))) throw new Error('allocation lost a race');
  } finally {
    await store.close();
  }
}

export function digestTree(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (d: string): void => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      if (e.isDirectory()) walk(p);
      else out[p] = `${statSync(p).mode.toString(8)} ${createHash('sha256').update(readFileSync(p)).digest('hex')}`;
    }
  };
  walk(dir);
  return out;
}

export interface AdminInstance {
  readonly dir: string;
  readonly db: string;
  /** `-c DIR`, to put before a command */
  readonly C: readonly string[];
}

/** A fresh instance (node NODE) with domain example.test and alice@example.test (password "sec ret"). */
export function adminInstance(t: Test): AdminInstance {
  const dir = join(scratchDir(t), 'inst');
  const C = ['-c', dir];
  for (const [args, input] of [
    [['init', dir, '--node', NODE], ''],
    [[...C, 'domain', 'add', 'example.test'], ''],
    [[...C, 'user', 'add', 'alice@example.test', '--password-stdin'], 'sec ret\n'],
  ] as const) {
    const r = run(args, input);
    if (r.code !== 0) throw new Error(`${args.join(' ')}: exit ${String(r.code)}: ${r.err}`);
  }
  return { dir, db: join(dir, 'pigeon.db'), C };
}
