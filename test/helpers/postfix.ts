// A private Postfix instance (backends.md §3): its own config dir, queue and data directories,
// listeners on loopback only, log in a file. `postfix -c DIR start|stop`.
import { mkdirSync, writeFileSync, chownSync, chmodSync, readFileSync, existsSync, mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { execFileSync } from 'node:child_process';
import type { Test } from 'tap';
import { hold, release } from './reaper.js';

export interface PrivatePostfix {
  dir: string;
  log(): string;
}

export function startPostfix(t: Test, masterCf: string, mainExtra = ''): PrivatePostfix {
  // a short path: Postfix's unix sockets live below the queue directory (sun_path is 108 bytes)
  const dir = mkdtempSync('/tmp/pfx-');
  chmodSync(dir, 0o755);
  hold('dir', dir);
  t.teardown(() => {
    rmSync(dir, { recursive: true, force: true });
    release('dir', dir);
  });
  mkdirSync(join(dir, 'queue'), { recursive: true });
  mkdirSync(join(dir, 'data'), { recursive: true });
  const uid = Number(execFileSync('id', ['-u', 'postfix'], { encoding: 'utf8' }).trim());
  const gid = Number(execFileSync('id', ['-g', 'postfix'], { encoding: 'utf8' }).trim());
  chownSync(join(dir, 'data'), uid, gid);
  writeFileSync(
    join(dir, 'main.cf'),
    `compatibility_level = 3.6
queue_directory = ${dir}/queue
data_directory = ${dir}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = pfx.test
mydestination =
maillog_file = ${dir}/maillog
maillog_file_prefixes = ${dir}
${mainExtra}`,
  );
  writeFileSync(join(dir, 'master.cf'), `postlog unix-dgram n - n - 1 postlogd\n${masterCf}`);
  hold('postfix', dir);
  execFileSync('script', ['-qc', `postfix -c '${dir}' start`, '/dev/null'], { stdio: 'ignore' });
  t.teardown(() => {
    try {
      execFileSync('script', ['-qc', `postfix -c '${dir}' stop`, '/dev/null'], { stdio: 'ignore' });
    } catch {
      /* already stopped */
    }
    release('postfix', dir);
  });
  return { dir, log: () => (existsSync(join(dir, 'maillog')) ? readFileSync(join(dir, 'maillog'), 'utf8') : '') };
}
