/**
 * NAME        src/commands/admin — domain, user, config, auth test, pw: the admin CLI
 *             (cluster commands, node and cert, live in src/commands/cluster.ts)
 * DESCRIPTION Every write is one transaction (src/store.ts). Output is plain text for people,
 *             or JSON with --json for scripts (shapes settled in DESIGN.md).
 */
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import type { Command } from '@commander-js/extra-typings';
import { Option } from '@commander-js/extra-typings';
import { AppError } from '../errors.js';
import { openCtx } from '../context.js';
import { readStdinBytes, printJson } from '../io.js';
import { hashPassword, parseHash, isScheme, SCHEMES } from '../../auth/schemes.js';
import { lookupKey, catalog } from '../catalog.js';
import { parseValue, describeType, type Json } from '../settings.js';
import { resolve, forcedBy, values, type Effective, type Flag } from '../resolve.js';
import type { ScopeRef, UserRecord } from '../store.js';
import { normaliseAddress, normaliseDomain } from '../address.js';
import { withBackendSwitchCheck } from '../backend-switch.js';

type ConfigOpt = () => string | undefined;

function show(v: Json): string {
  return JSON.stringify(v);
}

function userJson(u: UserRecord): Record<string, Json> {
  let scheme: string | null = null;
  if (u.password !== null) {
    try {
      scheme = parseHash(u.password).scheme;
    } catch {
      scheme = 'invalid';
    }
  }
  return {
    address: u.address,
    domain: u.domain,
    state: u.state,
    home: u.home,
    allocation: u.allocation === null ? null : { ...u.allocation },
    moving_to: u.movingTo,
    password_scheme: scheme,
    version: u.version,
    created: u.created,
  };
}

/** Has this mailbox any mail (any file below it)? */
function hasMail(path: string): boolean {
  if (!existsSync(path)) return false;
  const walk = (p: string, depth: number): boolean => {
    for (const e of readdirSync(p, { withFileTypes: true })) {
      if (e.isFile()) return true;
      if (e.isDirectory() && depth < 4 && walk(`${p}/${e.name}`, depth + 1)) return true;
    }
    return false;
  };
  return walk(path, 0);
}

const STRICT_UTF8 = new TextDecoder('utf-8', { fatal: true });

/** Text that must be valid UTF-8: refused with its file:line, never decoded with replacement characters. */
function strictText(b: Buffer, where: string, what: string): string {
  try {
    return STRICT_UTF8.decode(b);
  } catch {
    throw new AppError('INVALID_VALUE', `${where}: the ${what} is not valid UTF-8`);
  }
}

/**
 * The lines of a Dovecot passwd-file as bytes: for each line its user name and hash fields
 * (`user:hash:...`), or null for blank and `#` comment lines. The other fields are not read.
 */
function passwdFileLines(data: Buffer): ({ name: Buffer; hash: Buffer } | null)[] {
  const out: ({ name: Buffer; hash: Buffer } | null)[] = [];
  let start = 0;
  while (start < data.length) {
    let end = data.indexOf(0x0a, start);
    if (end < 0) end = data.length;
    let line = data.subarray(start, end);
    start = end + 1;
    if (line[line.length - 1] === 0x0d) line = line.subarray(0, line.length - 1);
    const text = line.toString('latin1');
    if (text.trim() === '' || text.trimStart().startsWith('#')) {
      out.push(null);
      continue;
    }
    const c1 = line.indexOf(0x3a);
    const c2 = c1 < 0 ? -1 : line.indexOf(0x3a, c1 + 1);
    out.push({ name: c1 < 0 ? line : line.subarray(0, c1), hash: c1 < 0 ? Buffer.alloc(0) : line.subarray(c1 + 1, c2 < 0 ? line.length : c2) });
  }
  return out;
}

export function explainText(eff: Effective, explain: boolean): string {
  const width = Math.max(...Object.keys(eff).map((k) => k.length));
  const lines: string[] = [];
  for (const [k, e] of Object.entries(eff)) {
    let line = `${k.padEnd(width)} = ${show(e.value)}`;
    if (explain) {
      line += `  (${e.from})`;
      for (const i of e.ignored) line += `  [${i.from} value ${show(i.value)} ${i.reason === 'override' ? `overridden by ${i.by}` : `ignored: ${i.by} ignores ${k.split('.')[0]}.*`}]`;
    }
    lines.push(line);
  }
  return `${lines.join('\n')}\n`;
}

export function registerAdmin(program: Command, cfg: ConfigOpt): void {
  // ---- domain -------------------------------------------------------------------------
  const domain = program.command('domain').description('manage domains');
  domain
    .command('add')
    .argument('<name>', 'domain name (IDN allowed; stored as punycode)')
    .description('add a domain')
    .action(async (name) => {
      const { store } = await openCtx(cfg());
      console.log(`domain ${await store.addDomain(name)} added`);
    });
  domain
    .command('del')
    .argument('<name>')
    .description('delete an empty domain and its settings')
    .action(async (name) => {
      const { store } = await openCtx(cfg());
      await store.delDomain(name);
      console.log(`domain ${normaliseDomain(name)} deleted`);
    });
  domain
    .command('list')
    .option('--json', 'JSON output')
    .description('list domains')
    .action(async (o) => {
      const { store } = await openCtx(cfg());
      const ds = await store.listDomains();
      if (o.json) printJson(ds);
      else for (const d of ds) console.log(`${d.name}\t${d.users} user(s)`);
    });
  domain
    .command('rename')
    .argument('<old>')
    .argument('<new>')
    .description('rename a domain; its users, their settings and mailboxes move with it')
    .action(async (a, b) => {
      const { store } = await openCtx(cfg());
      const r = await store.renameDomain(a, b);
      console.log(`domain ${normaliseDomain(a)} renamed to ${normaliseDomain(b)} (${r.users} user(s) renamed; mailboxes stay where they are)`);
    });

  // ---- user ---------------------------------------------------------------------------
  const user = program.command('user').description('manage users');
  user
    .command('add')
    .argument('<address>', 'user@domain (the domain must exist)')
    .option('--password-stdin', 'read the password from one line of stdin')
    .option('--home <node>', 'node that holds the mailbox (default: allocated on first mail or login)')
    .addOption(new Option('-s, --scheme <scheme>', 'password scheme (SCRAM-SHA-256: SCRAM logins work too)').choices(SCHEMES).default('ARGON2ID' as const))
    .option('--json', 'JSON output')
    .description('add a user; without --password-stdin a random password is generated and printed')
    .action(async (address, o) => {
      const { store } = await openCtx(cfg());
      normaliseAddress(address);
      const generated = o.passwordStdin ? null : randomBytes(12).toString('base64url');
      const pw = generated !== null ? Buffer.from(generated) : readStdinBytes('password');
      if (o.home !== undefined && !/^[a-z0-9][a-z0-9.-]{0,62}$/i.test(o.home)) throw new AppError('USAGE', `--home: invalid node name ${JSON.stringify(o.home)}`);
      const u = await store.addUser(address, await hashPassword(pw, o.scheme), o.home ?? null);
      if (o.json) printJson({ ...userJson(u), ...(generated ? { password: generated } : {}) });
      else console.log(`user ${u.address} added${generated ? `\npassword: ${generated}` : ''}`);
    });
  user
    .command('passwd')
    .argument('<address>')
    .option('--password-stdin', 'read the password from one line of stdin (default)')
    .addOption(new Option('-s, --scheme <scheme>', 'password scheme (SCRAM-SHA-256: SCRAM logins work too)').choices(SCHEMES).default('ARGON2ID' as const))
    .description('set a new password (read from stdin)')
    .action(async (address, o) => {
      const { store } = await openCtx(cfg());
      await store.mustUser(address);
      await store.setPassword(address, await hashPassword(readStdinBytes('password'), o.scheme));
      console.log(`password of ${normaliseAddress(address).address} changed`);
    });
  for (const [verb, state] of [['disable', 'disabled'], ['enable', 'active']] as const) {
    user
      .command(verb)
      .argument('<address>')
      .description(`${verb} logins and deliveries of a user (data is kept)`)
      .action(async (address) => {
        const { store } = await openCtx(cfg());
        await store.setState(address, state);
        console.log(`user ${normaliseAddress(address).address} ${state}`);
      });
  }
  user
    .command('del')
    .argument('<address>')
    .option('--purge', 'also delete the mailbox and all its mail')
    .description('delete a user and their settings; the mailbox stays unless --purge')
    .action(async (address, o) => {
      const { store, instance } = await openCtx(cfg());
      const u = await store.delUser(address);
      const path = u.allocation?.path;
      if (u.allocation === null || path === undefined || !existsSync(path)) {
        console.log(`user ${u.address} deleted (no mailbox)`);
      } else if (o.purge && u.home !== null && u.home !== instance.config.node) {
        throw new AppError('IO', `user ${u.address} deleted; mailbox ${path} not purged: it is on node ${u.home} (purge it there)`);
      } else if (o.purge) {
        // never as root: the mail writer removes it as the mail user, following no link
        const { mailWriter } = await import('../writer/mail-writer.js');
        const { resolveMailUser } = await import('../mailuser.js');
        try {
          await mailWriter(resolveMailUser(instance.config.mail_user)).purgeMailbox(u.allocation, instance.mailRoot);
        } catch (e) {
          throw new AppError('IO', `user ${u.address} deleted; mailbox ${path} not purged: ${e instanceof Error ? e.message : String(e)}`);
        }
        console.log(`user ${u.address} deleted; mailbox ${path} purged`);
      } else {
        console.log(`user ${u.address} deleted; mailbox left in place at ${path}${hasMail(path) ? ' (it holds mail)' : ''}; delete it with --purge or by hand`);
      }
    });
  user
    .command('list')
    .argument('[domain]')
    .option('--json', 'JSON output')
    .description('list users, optionally of one domain')
    .action(async (d, o) => {
      const { store } = await openCtx(cfg());
      const us = await store.listUsers(d);
      if (o.json) printJson(us.map(userJson));
      else for (const u of us) console.log(`${u.address}\t${u.state}\thome=${u.home ?? '-'}`);
    });
  user
    .command('show')
    .argument('<address>')
    .option('--json', 'JSON output')
    .description('show a user: state, home node, mailbox allocation')
    .action(async (address, o) => {
      const { store } = await openCtx(cfg());
      const j = userJson(await store.mustUser(address));
      if (o.json) printJson(j);
      else for (const [k, v] of Object.entries(j)) console.log(`${k}: ${typeof v === 'string' ? v : JSON.stringify(v)}`);
    });
  user
    .command('rename')
    .argument('<old>')
    .argument('<new>')
    .description('rename a user; settings and mailbox (allocation) stay with the user')
    .action(async (a, b) => {
      const { store } = await openCtx(cfg());
      const u = await store.renameUser(a, b);
      console.log(`user ${normaliseAddress(a).address} renamed to ${u.address}${u.allocation ? `; mailbox stays at ${u.allocation.path}` : ''}`);
    });
  user
    .command('import')
    .argument('<format>', 'passwd-file')
    .argument('<file>', 'a Dovecot passwd-file: user:{SCHEME}hash:uid:gid:gecos:home:shell:extra')
    .option('--domain <domain>', 'domain for entries without @domain')
    .option('--create-domains', 'add missing domains instead of refusing')
    .description('import users with their password hashes kept as they are (all or nothing)')
    .action(async (format, file, o) => {
      if (format !== 'passwd-file') throw new AppError('USAGE', `unknown import format ${JSON.stringify(format)}; supported: passwd-file`);
      const { store } = await openCtx(cfg());
      let data: Buffer;
      try {
        data = readFileSync(file);
      } catch (e) {
        throw new AppError('CONFIG_MISSING', `${file}: cannot read (${(e as NodeJS.ErrnoException).code ?? 'error'})`);
      }
      const entries: { address: string; domain: string; hash: string }[] = [];
      passwdFileLines(data).forEach((line, i) => {
        if (line === null) return;
        const where = `${file}:${i + 1}`;
        const name = strictText(line.name, where, 'user name');
        let addr;
        try {
          addr = normaliseAddress(name.includes('@') ? name : `${name}@${o.domain ?? ''}`);
        } catch (e) {
          throw new AppError('INVALID_ADDRESS', `${where}: ${(e as Error).message}${name.includes('@') ? '' : ' (use --domain for bare user names)'}`);
        }
        // {SCHEME} strings are ASCII: other bytes are no hash that could be kept exactly as written
        const hash = line.hash.toString('latin1');
        if (!/^[\x21-\x7e]*$/.test(hash)) throw new AppError('PASSWORD_SCHEME', `${where}: ${addr.address}: the password hash is not printable ASCII ({SCHEME} strings are)`);
        try {
          parseHash(hash);
        } catch (e) {
          throw new AppError((e as AppError).code ?? 'PASSWORD_SCHEME', `${where}: ${addr.address}: ${(e as Error).message}`);
        }
        if (entries.some((x) => x.address === addr.address)) throw new AppError('DUPLICATE', `${where}: ${addr.address} appears twice`);
        entries.push({ address: addr.address, domain: addr.domain, hash });
      });
      // all or nothing: one transaction in the store
      const created = (await store.importUsers(entries, o.createDomains ?? false)).createdDomains;
      console.log(`imported ${entries.length} user(s)${created.length ? `; created domain(s) ${created.join(', ')}` : ''}`);
    });

  // ---- config -------------------------------------------------------------------------
  const config = program.command('config').description('per-module settings: global < domain < user, with override and ignore');
  const pickScope = (o: { global?: true; domain?: string; user?: string }): ScopeRef => {
    const n = (o.global ? 1 : 0) + (o.domain !== undefined ? 1 : 0) + (o.user !== undefined ? 1 : 0);
    if (n !== 1) throw new AppError('USAGE', 'give exactly one scope: --global, --domain DOMAIN or --user ADDRESS');
    if (o.global) return { scope: 'global', name: null };
    if (o.domain !== undefined) return { scope: 'domain', name: normaliseDomain(o.domain) };
    return { scope: 'user', name: normaliseAddress(o.user ?? '').address };
  };
  config
    .command('set')
    .argument('<key>', 'MODULE.KEY, or MODULE.* with --ignore')
    .argument('[value]', 'the value (true/false, numbers, strings, lists as a,b or JSON)')
    .option('--global', 'set for everyone')
    .option('--domain <domain>', 'set for a domain')
    .option('--user <address>', 'set for one user')
    .option('--override', 'force this value on every narrower scope (global/domain only)')
    .option('--ignore', 'with MODULE.*: ignore every narrower setting of MODULE (global/domain only)')
    .description('set a setting at one scope')
    .addHelpText('after', `\nModules and keys:\n${[...catalog().values()].map((m) => Object.entries(m.keys).map(([k, s]) => `  ${m.module}.${k} (${describeType(s)}, default ${JSON.stringify(s.default)}): ${s.doc}`).join('\n')).join('\n')}`)
    .action(async (name, value, o) => {
      const ref = pickScope(o);
      const k = lookupKey(name, true);
      const flags: Flag[] = [];
      if ((o.override || o.ignore) && ref.scope === 'user') throw new AppError('USAGE', '--override and --ignore apply to --global or --domain scope only');
      if (o.ignore) {
        if (k.key !== '*') throw new AppError('USAGE', `--ignore applies to a whole module: use ${k.module}.* (no value)`);
        if (value !== undefined) throw new AppError('USAGE', `${k.module}.* --ignore takes no value`);
        if (o.override) throw new AppError('USAGE', '--ignore and --override cannot be combined');
        flags.push('ignore');
      } else if (k.key === '*') {
        throw new AppError('USAGE', `${k.module}.* is only valid with --ignore`);
      }
      if (o.override) flags.push('override');
      const { store } = await openCtx(cfg());
      let v: Json = null;
      if (k.spec) {
        if (value === undefined) throw new AppError('USAGE', `missing value for ${name}`);
        const allowed = k.spec.scopes;
        if (allowed && !allowed.includes(ref.scope)) throw new AppError('USAGE', `${name} can only be set at ${allowed.join('/')} scope`);
        v = parseValue(name, k.spec, value);
      }
      // imap.backend / pop3.backend: warn when mailboxes with mail change backend (UIDs change)
      const switchWarnings = await withBackendSwitchCheck(store, ref, `${k.module}.${k.key}`, () => store.setSetting(ref, k.module, k.key, v, flags));
      for (const w of switchWarnings) console.error(`pigeon: warning: ${w}`);
      const where = ref.scope === 'global' ? 'global' : `${ref.scope} ${ref.name ?? ''}`;
      console.log(`${name} ${k.key === '*' ? 'ignored below' : `= ${show(v)} at`} ${where}${flags.length ? ` [${flags.join(',')}]` : ''}`);
      if (ref.scope !== 'global') {
        const f = forcedBy(await store.rowsFor(ref), ref.scope, k.module, k.key);
        if (f) {
          console.error(
            `pigeon: warning: ${name} at ${where} has no effect: ${f.reason === 'override' ? `${f.scope} scope forces it (override)` : `${f.scope} scope ignores ${k.module}.* below it`}`,
          );
        }
      }
    });
  config
    .command('unset')
    .argument('<key>', 'MODULE.KEY or MODULE.*')
    .option('--global')
    .option('--domain <domain>')
    .option('--user <address>')
    .description('remove a setting row (the broader scope or default applies again)')
    .action(async (name, o) => {
      const ref = pickScope(o);
      const k = lookupKey(name, true);
      const { store } = await openCtx(cfg());
      let removed = false;
      const switchWarnings = await withBackendSwitchCheck(store, ref, `${k.module}.${k.key}`, async () => {
        removed = await store.unsetSetting(ref, k.module, k.key);
      });
      for (const w of switchWarnings) console.error(`pigeon: warning: ${w}`);
      console.log(removed ? `${name} unset at ${ref.scope}${ref.name ? ` ${ref.name}` : ''}` : `${name} was not set at ${ref.scope}${ref.name ? ` ${ref.name}` : ''}`);
    });
  config
    .command('show')
    .argument('<address>', 'the user whose effective settings to show')
    .option('--explain', 'show where each value comes from and what it overrides')
    .option('--json', 'JSON output: {"module.key": value} or, with --explain, {value, from, ignored}')
    .description('the effective settings of a user')
    .action(async (address, o) => {
      const { store } = await openCtx(cfg());
      const l = await store.lookup(normaliseAddress(address).address);
      if (!l) throw new AppError('NO_SUCH_USER', `no such user: ${normaliseAddress(address).address}`);
      const eff = resolve(l.rows);
      if (o.json) printJson(o.explain ? eff : values(eff));
      else process.stdout.write(explainText(eff, o.explain ?? false));
    });
  config
    .command('keys')
    .option('--json', 'JSON output')
    .description('list every module key with its type, default and meaning')
    .action(async (o) => {
      const out = [...catalog().values()].flatMap((m) =>
        Object.entries(m.keys).map(([k, s]) => ({ key: `${m.module}.${k}`, type: describeType(s), default: s.default, scopes: s.scopes ?? ['global', 'domain', 'user'], doc: s.doc })),
      );
      if (o.json) printJson(out);
      else for (const e of out) console.log(`${e.key}\t${e.type}\tdefault ${JSON.stringify(e.default)}\t${e.doc}`);
    });
  config
    .command('test')
    .description('check what serve checks before it listens (files, certificates and keys, the node\'s registration, database and schema, mail user, auth chain), and the backend binaries in use; exit 0 when usable')
    .action(async () => {
      const { instance, store } = await openCtx(cfg());
      await store.listDomains();
      const check = await import('../config-check.js');
      const { resolveMailUser } = await import('../mailuser.js');
      const r: import('../config-check.js').CheckReport = { lines: [], warnings: [], problems: [] };
      // what serve checks before it listens (the same function), then what only this command adds
      await check.checkStart(instance, store, r);
      check.checkCertificates(instance, r);
      await check.checkBackends(instance, store, resolveMailUser(instance.config.mail_user), r);
      check.checkLog(instance, r);
      await check.checkOAuth(instance, r);
      for (const l of r.lines) console.log(l);
      for (const w of r.warnings) console.error(`pigeon: warning: ${w}`);
      if (r.problems.length > 0) {
        for (const p of r.problems) console.error(`pigeon: error: ${p}`);
        throw new AppError('CONFIG_INVALID', `configuration test failed: ${r.problems.length} problem${r.problems.length > 1 ? 's' : ''} (above)`);
      }
      console.log(`configuration OK: ${instance.files.join(', ')}; database ${instance.dbPath}`);
    });

  // ---- auth test, pw -------------------------------------------------------------------
  const auth = program.command('auth').description('authentication');
  auth
    .command('test')
    .argument('<address>')
    .option('--service <service>', 'imap, pop3 or test', 'test')
    .description('check a password (one line on stdin) like a login would, and print the effective config')
    .action(async (address, o) => {
      const service = o.service;
      if (service !== 'imap' && service !== 'pop3' && service !== 'test') throw new AppError('USAGE', '--service must be imap, pop3 or test');
      const pw = readStdinBytes('password');
      const { store, instance } = await openCtx(cfg());
      const { createAuth } = await import('../../auth/chain.js');
      const r = await (await createAuth(instance.config.auth, store, instance.dir)).authenticate({ user: address, password: pw, service });
      if (!r.ok) {
        if (r.why === 'tempfail') throw new AppError('TEMPFAIL', `passdb: ${address} auth temporarily failed: ${r.detail}`);
        console.log(`passdb: ${address} auth failed (${r.why})`);
        process.exitCode = 77;
        return;
      }
      for (const w of r.warnings) console.error(`pigeon: warning: ${w}`);
      console.log(`passdb: ${r.user.user.address} auth succeeded`);
      console.log(`home: ${r.user.user.home ?? '-'}  allocation: ${r.user.user.allocation ? JSON.stringify(r.user.user.allocation) : '-'}`);
      console.log('extra fields:');
      process.stdout.write(explainText(r.user.config, false).replace(/^(?=.)/gm, '  '));
    });
  program
    .command('pw')
    .addOption(new Option('-s, --scheme <scheme>', 'password scheme').choices(SCHEMES).default('ARGON2ID' as const))
    .description('hash a password read from stdin, printed as {SCHEME}hash for Dovecot passwd-files')
    .action(async (o) => {
      if (!isScheme(o.scheme)) throw new AppError('USAGE', `unknown scheme ${o.scheme}`);
      if (o.scheme === 'PLAIN') console.error('pigeon: warning: {PLAIN} stores the password readable by anyone who can read the database');
      console.log(await hashPassword(readStdinBytes('password'), o.scheme));
    });
}

