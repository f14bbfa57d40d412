/**
 * NAME        src/instance-path — which pigeon.yaml `-c` names, without reading it
 * SYNOPSIS    configFileOf(c)   // -c DIR|FILE, then $PIGEON_CONFIG, then /etc/pigeon/pigeon.yaml
 * DESCRIPTION The one rule for finding an instance, shared by src/instance.ts (locate) and by
 *             `pigeon deliver`'s hand-off to a running `pigeon serve`
 *             (src/delivery/handoff-file.ts), which must find the instance directory before it
 *             loads the YAML parser. A directory means DIR/pigeon.yaml. Node built-ins only.
 */
import { existsSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';

export const DEFAULT_CONFIG = '/etc/pigeon/pigeon.yaml';

/** The configuration file `c` (or $PIGEON_CONFIG, or the default) names; it may not exist. */
export function configFileOf(c: string | undefined): string {
  const file = resolve(c ?? process.env['PIGEON_CONFIG'] ?? DEFAULT_CONFIG);
  return existsSync(file) && statSync(file).isDirectory() ? join(file, 'pigeon.yaml') : file;
}
