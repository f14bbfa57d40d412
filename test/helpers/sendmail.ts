// A sendmail stand-in for the delivery tests: records argv and stdin of every call (forward and
// vacation re-inject through the MTA's sendmail; the real Postfix sendmail is in postfix.test.ts).
import { writeFileSync, readFileSync, readdirSync, chmodSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';

export interface SendmailCall {
  args: string[];
  /** argv as the bytes the script received, one argument per line */
  argsRaw: Buffer;
  input: string;
}

/** A sendmail that records argv and stdin, exiting with the number in DIR/exit, or 0. */
export function recorder(dir: string): { script: string; calls: () => SendmailCall[]; failWith: (code: number) => void } {
  const spool = join(dir, 'sendmail-calls');
  mkdirSync(spool);
  const script = join(dir, 'sendmail');
  writeFileSync(
    script,
    `#!/bin/sh
n=$(date +%s%N)$$
printf '%s\\n' "$@" > "${spool}/$n.args"
cat > "${spool}/$n.msg"
[ -f "${dir}/exit" ] && exit $(cat "${dir}/exit")
exit 0
`,
  );
  chmodSync(script, 0o755);
  return {
    script,
    calls: () =>
      readdirSync(spool)
        .filter((f) => f.endsWith('.args'))
        .sort()
        .map((f) => {
          const argsRaw = readFileSync(join(spool, f));
          return { args: argsRaw.toString('utf8').trimEnd().split('\n'), argsRaw, input: readFileSync(join(spool, f.replace(/\.args$/, '.msg')), 'utf8') };
        }),
    failWith: (code) => writeFileSync(join(dir, 'exit'), String(code)),
  };
}

export function withSendmail(inst: string, script: string): void {
  writeFileSync(join(inst, 'conf.d', '50-sendmail.yaml'), `sendmail: ${JSON.stringify(script)}\n`);
}

