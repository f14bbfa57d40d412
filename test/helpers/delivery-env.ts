/**
 * Test helpers for the delivery agent: a real instance made with the real CLI, the CLI run the way
 * Postfix pipe(8) runs it, and the real Dovecot imap (standalone, as the mail uid) reading the
 * mailbox back.
 */
import { spawn, spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { existsSync, readdirSync, appendFileSync } from 'node:fs';
import { owned } from './reaper.js';
import { SERVE_START_MS, scratchDir } from './instance.js';
import { join, resolve } from 'node:path';

export const ROOT = resolve(import.meta.dirname, '..', '..');
export const CLI = join(ROOT, 'dist', 'src', 'cli.js');
export const DOVECOT_IMAP = '/usr/lib/dovecot/imap';
export const MAIL_UID = 8;
export const MAIL_GID = 8;

export function need(path: string, pkg: string): void {
  if (!existsSync(path)) throw new Error(`${path} is missing: install the Debian package ${pkg} (apt-get install ${pkg})`);
}

export interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

export function cli(dir: string, args: readonly string[], input?: string | Buffer, env?: NodeJS.ProcessEnv): Run {
  if (!existsSync(CLI)) throw new Error(`${CLI} missing: run "npx tsc -p tsconfig.json" first (npm test does)`);
  const r: SpawnSyncReturns<Buffer> = spawnSync(process.execPath, [CLI, '-c', dir, ...args], {
    input: input ?? '',
    env: env ?? process.env,
    maxBuffer: 64 * 1024 * 1024,
  });
  return { code: r.status, stdout: r.stdout.toString(), stderr: r.stderr.toString() };
}

/** Async variant (for concurrency tests and big inputs). */
export function cliAsync(dir: string, args: readonly string[], input: string | Buffer | ((w: NodeJS.WritableStream) => Promise<void>)): Promise<Run & { pid: number }> {
  return new Promise((res, rej) => {
    const c = spawn(process.execPath, [CLI, '-c', dir, ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    c.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    c.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    c.on('error', rej);
    c.on('close', (code) => res({ code, stdout, stderr, pid: c.pid ?? 0 }));
    c.stdin.on('error', () => undefined);
    if (typeof input === 'function') void input(c.stdin).then(() => c.stdin.end());
    else c.stdin.end(input);
  });
}

export function ok(r: Run, what: string): Run {
  if (r.code !== 0) throw new Error(`${what}: exit ${r.code}: ${r.stdout}${r.stderr}`);
  return r;
}

/** A fresh instance with domain example.test and the given users. */
export function makeInstance(dir: string, users: readonly string[] = ['alice@example.test'], extraYaml = ''): string {
  const inst = join(dir, 'inst');
  ok(cli(inst, ['init', inst]), 'init');
  // -c before init is harmless: init takes its DIR argument
  ok(cli(inst, ['domain', 'add', 'example.test']), 'domain add');
  for (const u of users) ok(cli(inst, ['user', 'add', u, '--password-stdin'], 'secret\n'), `user add ${u}`);
  if (extraYaml) appendFileSync(join(inst, 'pigeon.yaml'), extraYaml);
  return inst;
}

export function setUser(inst: string, user: string, key: string, value: string): void {
  ok(cli(inst, ['config', 'set', '--user', user, key, value]), `config set ${key}`);
}

export function maildirOf(inst: string, address: string): string {
  const at = address.lastIndexOf('@');
  return join(inst, 'mail', address.slice(at + 1), address.slice(0, at));
}

export function files(dir: string): string[] {
  try {
    return readdirSync(dir).filter((f) => !f.startsWith('.'));
  } catch {
    return [];
  }
}

export function msg(opts: { from?: string; to?: string; subject?: string; body?: string; headers?: string } = {}): string {
  return (
    `From: ${opts.from ?? 'bob@remote.test'}\n` +
    `To: ${opts.to ?? 'alice@example.test'}\n` +
    `Subject: ${opts.subject ?? 'test'}\n` +
    `Message-ID: <${Math.random().toString(36).slice(2)}@remote.test>\n` +
    (opts.headers ?? '') +
    `\n${opts.body ?? 'hello\n'}`
  );
}

export interface ImapMessage {
  size: number;
  body: Buffer;
}

/**
 * Read every message of a folder with the real Dovecot imap binary, standalone, as the mail uid
 * (backends.md §1: `imap -O -o mail_location=maildir:PATH`).
 */
export function dovecotRead(location: string, folder = 'INBOX', home?: string): Promise<{ messages: ImapMessage[]; transcript: string }> {
  need(DOVECOT_IMAP, 'dovecot-imapd');
  return new Promise((res, rej) => {
    const c = spawn(DOVECOT_IMAP, ['-O', '-o', `mail_location=${location}`, '-o', 'log_path=/dev/stderr', '-o', 'mbox_min_index_size=0'], {
      uid: MAIL_UID,
      gid: MAIL_GID,
      env: { USER: 'tester', HOME: home ?? '/nonexistent', PATH: '/usr/bin:/bin' },
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    const chunks: Buffer[] = [];
    let err = '';
    c.stdout.on('data', (d: Buffer) => chunks.push(d));
    c.stderr.on('data', (d: Buffer) => (err += d.toString()));
    c.on('error', rej);
    const timer = setTimeout(() => c.kill('SIGKILL'), 60_000);
    c.on('close', () => {
      clearTimeout(timer);
      const out = Buffer.concat(chunks);
      const text = out.toString('latin1');
      if (!/^a OK/m.test(text)) {
        rej(new Error(`dovecot imap failed: ${text.slice(0, 2000)} ${err}`));
        return;
      }
      const messages: ImapMessage[] = [];
      const re = /\* \d+ FETCH \(RFC822\.SIZE (\d+) BODY\[\] \{(\d+)\}\r\n/g;
      let m;
      while ((m = re.exec(text)) !== null) {
        const len = Number(m[2]);
        const start = m.index + m[0].length;
        messages.push({ size: Number(m[1]), body: out.subarray(start, start + len) });
        re.lastIndex = start + len;
      }
      res({ messages, transcript: text.replace(/\* \d+ FETCH[\s\S]*?\r\n\)\r\n/g, '').slice(0, 4000) });
    });
    c.stdin.end(`a SELECT "${folder}"\r\nb FETCH 1:* (RFC822.SIZE BODY.PEEK[])\r\nc LOGOUT\r\n`);
  });
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Wait until `f()` holds (a log line written, a file delivered), checked every 100 ms; fail after `ms`. */
export async function waitFor(what: string, f: () => boolean, ms = 90_000): Promise<void> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (f()) return;
    await sleep(100);
  }
  throw new Error(`timed out waiting for ${what}`);
}

/** `pigeon serve --workers 1` on an instance; resolves once it printed "ready", with the ports it listens on. */
export async function startServe(
  t: { teardown: (f: () => void | Promise<void>) => void },
  inst: string,
): Promise<{ ports: Record<string, number>; stderr: () => string; stop: () => Promise<void> }> {
  const child = owned(spawn(process.execPath, [CLI, '-c', inst, 'serve', '--workers', '1'], { stdio: ['ignore', 'ignore', 'pipe'], detached: true }));
  const stop = (): Promise<void> =>
    new Promise<void>((res) => {
      if (child.exitCode !== null || child.signalCode !== null) return res();
      child.once('exit', () => res());
      child.kill('SIGTERM');
      setTimeout(() => child.kill('SIGKILL'), 12_000).unref();
    });
  t.teardown(stop);
  let err = '';
  const ports: Record<string, number> = {};
  await new Promise<void>((res, rej) => {
    const timer = setTimeout(() => rej(new Error(`serve did not start: ${err}`)), SERVE_START_MS);
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (s: string) => {
      err += s;
      for (const m of err.matchAll(/listening (\w+) \S+:(\d+)\n/g)) ports[m[1] ?? ''] = Number(m[2]);
      if (/pigeon: ready/.test(err)) {
        clearTimeout(timer);
        res();
      }
    });
    child.once('exit', (c) => rej(new Error(`serve exited ${c}: ${err}`)));
  });
  return { ports, stderr: () => err, stop };
}

/** Log in over IMAP (through the proxy), run commands, return the whole transcript. */
export async function imapSession(port: number, user: string, password: string, commands: readonly string[]): Promise<string> {
  const net = await import('node:net');
  const { Dialog } = await import('./delivery-lmtp.js');
  const s = await new Promise<import('node:net').Socket>((res, rej) => {
    const c = net.connect({ host: '127.0.0.1', port }, () => res(c));
    c.once('error', rej);
  });
  try {
    const d = Dialog.of(s);
    let all = `${await d.lineRaw()}\r\n`;
    const run = async (tag: string, cmd: string): Promise<void> => {
      d.send(`${tag} ${cmd}\r\n`);
      for (;;) {
        const line = await d.lineRaw();
        all += `${line}\r\n`;
        if (line.startsWith(`${tag} `)) return;
      }
    };
    await run('l', `LOGIN ${user} ${password}`);
    let i = 0;
    for (const c of commands) await run(`c${i++}`, c);
    await run('z', 'LOGOUT');
    return all;
  } finally {
    s.destroy();
  }
}

/**
 * A fresh instance in the test's scratch directory with an lmtp listener on 127.0.0.1:0, domain
 * example.test and `user` (password "secret"), whose mailbox a first `pigeon deliver` allocated.
 */
export function lmtpUserInstance(t: Parameters<typeof scratchDir>[0], user: string): { dir: string; inst: string } {
  const dir = scratchDir(t);
  const inst = join(dir, 'inst');
  ok(cli(inst, ['init', inst, '--listen', 'lmtp=127.0.0.1:0']), 'init');
  ok(cli(inst, ['domain', 'add', 'example.test']), 'domain');
  ok(cli(inst, ['user', 'add', user, '--password-stdin'], 'secret\n'), 'user');
  ok(cli(inst, ['deliver', '-f', 'bob@remote.test', user], msg({ subject: 'first' })), 'first delivery (allocates the mailbox)');
  return { dir, inst };
}
