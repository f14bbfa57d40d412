// The CLI as an admin's shell runs it: `node dist/src/cli.js ARGS`, without tap's loader hooks.
import { spawn, spawnSync } from 'node:child_process';
import { cpSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Test } from 'tap';
import { scratchDir } from './instance.js';

export const CLI_JS = fileURLToPath(new URL('../../dist/src/cli.js', import.meta.url));

export interface CliRun {
  code: number | null;
  out: string;
  err: string;
  ms: number;
}

/** The environment of an admin's shell: without tap's hooks (NODE_OPTIONS, TAP*) and PIGEON_CONFIG. */
export function cleanEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!/^(NODE_OPTIONS|PIGEON_CONFIG|_TAPJS_|TAP)/.test(k)) env[k] = v;
  return { ...env, ...extra };
}

export interface CliOptions {
  input?: string;
  env?: Record<string, string>;
  uid?: number;
  gid?: number;
}

/** Run the CLI to completion. */
export function runCli(args: readonly string[], opts: CliOptions = {}): CliRun {
  const start = Date.now();
  const r = spawnSync(process.execPath, [CLI_JS, ...args], {
    input: opts.input ?? '',
    encoding: 'utf8',
    env: cleanEnv(opts.env),
    timeout: 120_000, // a hang; a command takes seconds under load, not minutes
    ...(opts.uid !== undefined ? { uid: opts.uid } : {}),
    ...(opts.gid !== undefined ? { gid: opts.gid } : {}),
  });
  return { code: r.status, out: r.stdout, err: r.stderr, ms: Date.now() - start };
}

/** Start the CLI now without blocking; resolves when it exits (independent cases side by side). */
export function startCli(args: readonly string[], input = ''): Promise<CliRun> {
  const start = Date.now();
  return new Promise((resolve, reject) => {
    const c = spawn(process.execPath, [CLI_JS, ...args], { env: cleanEnv() });
    let out = '';
    let err = '';
    c.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
    c.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
    c.on('error', reject);
    c.on('close', (code) => resolve({ code, out, err, ms: Date.now() - start }));
    c.stdin.end(input);
  });
}

export interface TemplateInstances {
  /** the scratch directory that holds the template and its copies */
  readonly root: string;
  /** the instance `pigeon init` made */
  readonly template: string;
  /** a fresh copy of the template instance (relative paths inside keep working) */
  instance(): string;
}

/** `pigeon init ROOT/template INIT_ARGS...` once per test file, then a copy of it per test. */
export function templateInstances(t: Test, initArgs: readonly string[]): TemplateInstances {
  const root = scratchDir(t);
  const template = join(root, 'template');
  const init = runCli(['init', template, ...initArgs]);
  if (init.code !== 0) throw new Error(`pigeon init failed: ${init.err}`);
  let copies = 0;
  return {
    root,
    template,
    instance() {
      const dir = join(root, `inst${++copies}`);
      cpSync(template, dir, { recursive: true });
      return dir;
    },
  };
}
