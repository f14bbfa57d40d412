/**
 * NAME        src/commands/db — db status | migrate | copy: the configuration database itself
 * SYNOPSIS    pigeon db status [--json]
 *             pigeon db migrate
 *             pigeon db copy SRC DST [--password-file FILE]
 * DESCRIPTION `status` shows the database this instance uses (engine, primary / standby /
 *             embedded, the server reached, user and database) and its schema version against
 *             the range this pigeon can run on; exit 0 when usable, 78 when not (older: run
 *             `db migrate` once every node runs this release; newer: upgrade this node).
 *             `migrate` brings the schema to this release's version, in one transaction per
 *             migration (several nodes migrating at once: one does the work).
 *             `copy` moves every table (domains, users with their password hashes, settings and
 *             flags, allocations, nodes, certificates, revocations) from SRC to DST, e.g. an
 *             embedded SQLite instance to a PostgreSQL server: DST's schema is created, a
 *             non-empty DST is refused, the row count of each table is printed, and DST is
 *             read back and compared with SRC, value for value, before it says done.
 *             SRC and DST are sqlite:PATH, a path, or postgres://… (relative SQLite paths are
 *             relative to the current directory).
 * DIAGNOSTICS DB_SCHEMA (78) outside the usable range; DUPLICATE (73) for a non-empty DST;
 *             DB_UNAVAILABLE (75); CONFIG_INVALID (78) for a malformed URL; SOFTWARE (70) when
 *             the read-back differs (DST then holds the copy: empty it before trying again).
 * SECURITY    URLs are printed only in their printable form (src/store/pg-url.ts `where`), never
 *             with a password; --password-file is read like database_password_file (0600/0640).
 */
import { resolve } from 'node:path';
import type { Command } from '@commander-js/extra-typings';
import { AppError, EX } from '../errors.js';
import { openCtx } from '../context.js';
import { openStore, parseDbUrl, type Store, type TableDump, type SchemaStatus, type ServerInfo } from '../store.js';
import { printJson } from '../io.js';

type ConfigOpt = () => string | undefined;

function verdict(s: SchemaStatus): { usable: boolean; text: string } {
  if (s.version === 0) return { usable: false, text: 'no schema yet: run "pigeon db migrate"' };
  if (s.version < s.minUsable) return { usable: false, text: `older than this pigeon can use: once every node runs this release, run "pigeon db migrate" once` };
  if (s.version > s.latest) return { usable: false, text: 'newer than this pigeon understands: upgrade pigeon on this node' };
  if (s.version < s.latest) return { usable: true, text: `usable; "pigeon db migrate" brings it to ${s.latest} once every node runs this release` };
  return { usable: true, text: 'current' };
}

/** A value as both engines agree on it: numbers and text compared as text, null as null. */
function canonical(v: string | number | null | undefined): string | null {
  return v === null || v === undefined ? null : String(v);
}

/** Where `dst` differs from `src` (first difference per table), or [] when they are the same. */
export function compareDumps(src: readonly TableDump[], dst: readonly TableDump[]): string[] {
  const out: string[] = [];
  for (const s of src) {
    const d = dst.find((x) => x.table === s.table);
    if (!d) {
      out.push(`${s.table}: missing in the copy`);
      continue;
    }
    if (d.rows.length !== s.rows.length) {
      out.push(`${s.table}: ${s.rows.length} row(s), the copy has ${d.rows.length}`);
      continue;
    }
    for (let i = 0; i < s.rows.length; i++) {
      const a = s.rows[i] ?? {};
      const b = d.rows[i] ?? {};
      const col = Object.keys(a).find((k) => canonical(a[k]) !== canonical(b[k]));
      if (col !== undefined) {
        out.push(`${s.table}: row ${i + 1}, column ${col} differs`);
        break;
      }
    }
  }
  return out;
}

function target(url: string, what: string): string {
  let t;
  try {
    t = parseDbUrl(url);
  } catch (e) {
    throw new AppError('USAGE', `${what}: ${(e as Error).message}`);
  }
  return t.kind === 'sqlite' ? `sqlite:${resolve(t.path)}` : url;
}

export function registerDb(program: Command, cfg: ConfigOpt): void {
  const db = program.command('db').description('the configuration database: status, schema migration, copying to another database');
  db.command('status')
    .option('--json', 'JSON output')
    .description("this instance's database: engine, primary or standby, schema version against what this pigeon can run on (exit 78 when it cannot)")
    .action(async (o) => {
      const { store } = await openCtx(cfg(), { checkSchema: false });
      let info: ServerInfo;
      let s: SchemaStatus;
      try {
        info = await store.serverInfo();
        s = await store.schemaStatus();
      } finally {
        await store.close();
      }
      const v = verdict(s);
      if (o.json) printJson({ url: store.where, ...info, schema: s, usable: v.usable });
      else {
        console.log(`database:   ${store.where}`);
        console.log(`engine:     ${info.engine} (${info.role})`);
        console.log(`connected:  ${info.server}${info.user === null ? '' : ` as ${info.user}, database ${info.database ?? ''}`}`);
        console.log(`schema:     version ${s.version}; this pigeon runs on ${s.minUsable}..${s.latest}: ${v.text}`);
      }
      if (!v.usable) process.exitCode = EX.CONFIG;
    });
  db.command('migrate')
    .description("bring the database's schema to this release's version (once every node runs this release)")
    .action(async () => {
      const { store } = await openCtx(cfg(), { checkSchema: false });
      try {
        const r = await store.migrate();
        console.log(r.from === r.to ? `database ${store.where}: schema version ${r.to}, nothing to do` : `database ${store.where}: schema version ${r.from} → ${r.to}`);
      } finally {
        await store.close();
      }
    });
  db.command('copy')
    .argument('<src>', 'the database to copy: sqlite:PATH, a path, or postgres://…')
    .argument('<dst>', 'an empty database (its schema is created): postgres://… or sqlite:PATH')
    .option('--password-file <file>', "a PostgreSQL server's password is this file's first line (mode 0600 or 0640), instead of the URL or ~/.pgpass")
    .description('copy every table from SRC to an empty DST (e.g. an embedded SQLite instance to a PostgreSQL server), verified by reading DST back')
    .action(async (srcArg, dstArg, o) => {
      const pg = { passwordFile: o.passwordFile === undefined ? null : resolve(o.passwordFile) };
      const srcUrl = target(srcArg, 'SRC');
      const dstUrl = target(dstArg, 'DST');
      let src: Store | null = null;
      let dst: Store | null = null;
      try {
        src = await openStore(srcUrl, { pg });
        if (src.kind === 'postgres') {
          const s = await src.schemaStatus();
          if (!verdict(s).usable) throw new AppError('DB_SCHEMA', `SRC ${src.where}: schema version ${s.version}: ${verdict(s).text}`);
        }
        dst = await openStore(dstUrl, { pg, create: true });
        if (src.where === dst.where) throw new AppError('USAGE', `SRC and DST are the same database (${src.where})`);
        const tables = await src.dump();
        await dst.load(tables);
        for (const t of tables) console.log(`${t.table.padEnd(8)} ${String(t.rows.length).padStart(7)} row(s)`);
        const diff = compareDumps(tables, await dst.dump());
        if (diff.length > 0) {
          process.stderr.write(`pigeon: error: the copy in ${dst.where} differs from ${src.where}: ${diff.join('; ')}\n`);
          process.exitCode = EX.SOFTWARE;
          return;
        }
        const total = tables.reduce((n, t) => n + t.rows.length, 0);
        console.log(`copied and verified: ${total} row(s) in ${tables.length} tables, ${src.where} → ${dst.where}`);
      } finally {
        await src?.close();
        await dst?.close();
      }
    });
}
