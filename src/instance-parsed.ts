/**
 * NAME        src/instance-parsed — the instance's YAML files, parsed, for processes that may not write it
 * SYNOPSIS    DIR/.pigeon.yaml.parsed.json   (written by root or by pigeon.yaml's owner; read by others)
 * DESCRIPTION Parsing pigeon.yaml and conf.d/*.yaml with the yaml package is the largest single item
 *             of an in-process `pigeon deliver` after node's own start (≈ 8 ms of CPU: the parser's
 *             first run in a fresh process, whatever the file's size). A process that may write the
 *             instance (root, or the owner of pigeon.yaml: `pigeon serve`, every admin command)
 *             always parses the YAML itself and, when the result is not already on disk, writes
 *             the text of every file with what it parsed to (plain JSON values only) next to
 *             pigeon.yaml. Any other process (the mail user's `pigeon deliver` under pipe(8), an
 *             inetd session as an unprivileged user) takes the parsed form from that file only when
 *             - the file is a regular file (opened without following a link), owned by root or by
 *               pigeon.yaml's owner, not writable by group or others, and
 *             - it names the same files, in the same order, with exactly the text each has now;
 *             otherwise (none yet, an edited file, a new conf.d file, a foreign or damaged cache)
 *             it parses the YAML as before. Nothing is trusted that those same owners could not
 *             have written into pigeon.yaml itself, and an old cache is only ever used for the
 *             very text it was made from. The configuration is still checked against its schema in
 *             every process (src/instance.ts), so an error is reported as without the cache.
 *             The file may be read by exactly those who may read every configuration file:
 *             others only when each file is world-readable, pigeon.yaml's group only when each
 *             file is readable by it (or by everyone).
 *             Written atomically: a temporary file created exclusively without following a link
 *             (O_CREAT|O_EXCL|O_NOFOLLOW), its owner and mode set on that descriptor, then renamed
 *             over the cache. Root writes it only into an instance directory root alone may change
 *             (as serve writes deliver-handoff.json, src/delivery/handoff-file-write.ts): where
 *             the mail user may write the directory (an SQLite database kept in it), there is no
 *             cache, and deliveries parse the YAML; README's pipe(8) section says to keep the
 *             database in a directory of its own. A directory that cannot be written (a read-only
 *             /etc) likewise just means no cache.
 */
import { openSync, fstatSync, lstatSync, readFileSync, writeSync, closeSync, fchownSync, fchmodSync, renameSync, unlinkSync, constants, type Stats } from 'node:fs';
import { join } from 'node:path';
import { rootAloneMayChange } from './delivery/handoff-file-write.js';

export const PARSED_FILE = '.pigeon.yaml.parsed.json';
const FORMAT = 1;

/** One configuration file as read: its path, its text (strict UTF-8) and its stat at open. */
export interface Source {
  readonly file: string;
  readonly text: string;
  readonly stat: Stats;
}

type Raw = Record<string, unknown>;

/** Whether this process writes the cache (and so never reads it): root or pigeon.yaml's owner. */
export function writesParsed(main: Source): boolean {
  const euid = process.geteuid?.();
  return euid === undefined || euid === 0 || euid === main.stat.uid;
}

const isPlain = (v: object): boolean => {
  const p: unknown = Object.getPrototypeOf(v);
  return p === Object.prototype || p === null;
};

/** Values that JSON carries exactly: no NaN, infinity or -0, no holes, no class instances, no __proto__ key. */
function jsonExact(v: unknown, depth = 0): boolean {
  if (v === null || typeof v === 'boolean' || typeof v === 'string') return true;
  if (typeof v === 'number') return Number.isFinite(v) && !Object.is(v, -0);
  if (typeof v !== 'object' || depth > 64) return false;
  if (Array.isArray(v)) {
    for (let i = 0; i < v.length; i++) if (!(i in v) || !jsonExact(v[i], depth + 1)) return false;
    return true;
  }
  if (!isPlain(v)) return false;
  for (const [k, x] of Object.entries(v)) if (k === '__proto__' || !jsonExact(x, depth + 1)) return false;
  return true;
}

function body(sources: readonly Source[], raws: readonly Raw[]): string {
  return JSON.stringify({ format: FORMAT, files: sources.map((s) => ({ path: s.file, text: s.text })), raws });
}

/** The parsed files from DIR's cache when it is trustworthy and made from exactly these texts; else null. */
export function readParsed(dir: string, sources: readonly Source[]): Raw[] | null {
  const main = sources[0];
  if (main === undefined) return null;
  let fd: number;
  try {
    fd = openSync(join(dir, PARSED_FILE), constants.O_RDONLY | constants.O_NOFOLLOW);
  } catch {
    return null;
  }
  try {
    const st = fstatSync(fd);
    if (!st.isFile() || (st.uid !== 0 && st.uid !== main.stat.uid) || (st.mode & 0o022) !== 0) return null;
    const p = JSON.parse(readFileSync(fd, 'utf8')) as unknown;
    if (typeof p !== 'object' || p === null || !('format' in p) || p.format !== FORMAT || !('files' in p) || !('raws' in p)) return null;
    const { files, raws } = p;
    if (!Array.isArray(files) || !Array.isArray(raws) || files.length !== sources.length || raws.length !== sources.length) return null;
    for (let i = 0; i < sources.length; i++) {
      const f: unknown = files[i];
      const r: unknown = raws[i];
      const s = sources[i];
      if (s === undefined || typeof f !== 'object' || f === null || !('path' in f) || !('text' in f) || f.path !== s.file || f.text !== s.text) return null;
      if (typeof r !== 'object' || r === null || Array.isArray(r)) return null;
    }
    return raws as Raw[];
  } catch {
    return null;
  } finally {
    closeSync(fd);
  }
}

/** Who may read the cache: no one who may not read every source (see DESCRIPTION). */
function modeFor(sources: readonly Source[], gid: number): number {
  let mode = 0o644;
  for (const s of sources) {
    const m = s.stat.mode;
    if ((m & 0o004) === 0) mode &= ~0o004;
    if ((m & 0o004) === 0 && ((m & 0o040) === 0 || s.stat.gid !== gid)) mode &= ~0o040;
  }
  return mode;
}

/** Write DIR's cache for these sources (after they parsed and checked), unless it already holds them. */
export function writeParsed(dir: string, sources: readonly Source[], raws: readonly Raw[]): void {
  const main = sources[0];
  if (main === undefined || !raws.every((r) => jsonExact(r))) return;
  const euid = process.geteuid?.();
  if (euid === 0) {
    try {
      if (!rootAloneMayChange(lstatSync(dir))) return;
    } catch {
      return;
    }
  }
  const text = body(sources, raws);
  const file = join(dir, PARSED_FILE);
  try {
    const fd = openSync(file, constants.O_RDONLY | constants.O_NOFOLLOW);
    try {
      const st = fstatSync(fd);
      if (st.isFile() && st.uid === euid && (euid !== 0 || st.gid === main.stat.gid) && (st.mode & 0o777) === modeFor(sources, main.stat.gid) && readFileSync(fd, 'utf8') === text) return;
    } finally {
      closeSync(fd);
    }
  } catch {
    // none yet, or not a file we wrote: (re)written below
  }
  const tmp = `${file}.${process.pid}.tmp`;
  let fd: number | null = null;
  try {
    fd = openSync(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600);
    const bytes = Buffer.from(text, 'utf8');
    for (let off = 0; off < bytes.length; ) off += writeSync(fd, bytes, off);
    if (euid === 0) fchownSync(fd, 0, main.stat.gid);
    fchmodSync(fd, modeFor(sources, main.stat.gid));
    closeSync(fd);
    fd = null;
    renameSync(tmp, file);
  } catch {
    // an instance directory this process cannot write (read-only /etc, another owner): no cache
    if (fd !== null) closeSync(fd);
    try {
      unlinkSync(tmp);
    } catch {
      /* never made */
    }
  }
}
