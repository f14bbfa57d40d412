/**
 * NAME        src/commands/cluster — cert issue, node list|disable|enable|remove: the cluster admin CLI
 * SYNOPSIS    pigeon cert issue NODE --out DIR [--days N]
 *             pigeon node list [--json] ; pigeon node disable|enable|remove NAME
 * DESCRIPTION `cert issue` runs on the CA holder (the instance with tls.ca_key): it writes
 *             DIR/ca.crt, DIR/node.crt and DIR/node.key for NODE and announces the certificate in
 *             the shared database — a new node's row, or the node's next certificate during a
 *             re-issue (the running node keeps working until it restarts with the new one).
 *             The new node then joins with `pigeon init NEWDIR --node NODE --ca-from DIR --db ...`.
 *             `node disable` stops a node's peer links (running nodes notice within about a
 *             second) and keeps its users; `node remove` revokes its certificates for good.
 * DIAGNOSTICS Without the CA key: exit 78 naming the file. Existing files in --out: exit 73,
 *             nothing written. NODE_BUSY (65) when removing a node that still holds users.
 * SECURITY    node.key is written 0600 in a 0700 directory created for it; never printed.
 */
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync, rmdirSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { Option, type Command } from '@commander-js/extra-typings';
import { AppError } from '../errors.js';
import { openCtx } from '../context.js';
import { printJson } from '../io.js';
import type { KeyPair } from '../../certs/ca.js';
import { verifyHostCert, HOST_CERT_DAYS, EXPIRY_WARN_DAYS, LOOPBACK_NAMES } from '../../certs/verify.js';
import { checkNodeName, isUp, type NodeRow } from '../nodes.js';

type ConfigOpt = () => string | undefined;

const MAX_DAYS = 3650;

function parseDays(s: string | undefined): number {
  if (s === undefined) return HOST_CERT_DAYS;
  const n = /^\d+$/.test(s) ? Number(s) : NaN;
  if (!Number.isInteger(n) || n < 1 || n > MAX_DAYS) throw new AppError('USAGE', `--days: expected a whole number of days from 1 to ${MAX_DAYS}, got ${JSON.stringify(s)}`);
  return n;
}

function readCa(certFile: string, keyFile: string): KeyPair {
  let keyPem: string;
  try {
    keyPem = readFileSync(keyFile, 'utf8');
  } catch (e) {
    throw new AppError(
      'CONFIG_MISSING',
      `cannot read the cluster CA key ${keyFile} (${(e as NodeJS.ErrnoException).code ?? 'error'}): only the CA holder (the instance that created the cluster CA) can issue node certificates; run "pigeon cert issue" there`,
    );
  }
  let certPem: string;
  try {
    certPem = readFileSync(certFile, 'utf8');
  } catch (e) {
    throw new AppError('CONFIG_MISSING', `cannot read the cluster CA certificate ${certFile} (${(e as NodeJS.ErrnoException).code ?? 'error'})`);
  }
  return { certPem, keyPem };
}

const day = 86400_000;

/** "2027-03-01", plus a warning when it is close or past. */
export function expiryText(certExpires: string | null, now = Date.now()): string {
  if (certExpires === null) return '-';
  const t = Date.parse(certExpires);
  if (Number.isNaN(t)) return certExpires;
  const date = new Date(t).toISOString().slice(0, 10);
  if (t <= now) return `${date} (EXPIRED)`;
  const left = Math.floor((t - now) / day);
  return left < EXPIRY_WARN_DAYS ? `${date} (expires in ${left} day${left === 1 ? '' : 's'})` : date;
}

function health(n: NodeRow, now: number): 'up' | 'down' | 'never seen' {
  if (n.lastSeen === null) return 'never seen';
  return isUp(n, now) ? 'up' : 'down';
}

function table(rows: readonly (readonly string[])[]): string {
  const widths: number[] = [];
  for (const r of rows) r.forEach((c, i) => (widths[i] = Math.max(widths[i] ?? 0, c.length)));
  return rows.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i] ?? 0))).join('  ')).join('\n');
}

export function registerCluster(program: Command, cfg: ConfigOpt): void {
  // ---- user move ----------------------------------------------------------------------
  const userCmd = (program.commands.find((c) => c.name() === 'user') as Command | undefined) ?? program.command('user').description('users');
  userCmd
    .command('move')
    .argument('<address>', 'the user')
    .requiredOption('--to <node>', 'the node that will hold the mailbox')
    .option('--settle <seconds>', 'wait this long after pausing the user before copying (default 3)', '3')
    .description('move a mailbox to another node: pause, copy over the peer link, switch home atomically, copy late mail')
    .action(async (address: string, o: { to: string; settle: string }) => {
      checkNodeName(o.to);
      if (!/^\d{1,3}$/.test(o.settle)) throw new AppError('USAGE', `--settle: expected seconds 0-999, got ${JSON.stringify(o.settle)}`);
      const { instance, store } = await openCtx(cfg());
      const [{ createPeerContext }, { moveUser }] = await Promise.all([import('../peer/context.js'), import('../peer/move.js')]);
      const ctx = createPeerContext(instance, store);
      const r = await moveUser(store, ctx, instance.mailRoot, address, o.to, Number(o.settle) * 1000, (line) => console.log(line));
      if (r.allocation === null) console.log(`${address}: no mailbox yet; home set to ${r.to}`);
      else {
        console.log(`moved ${address} from ${r.from ?? '-'} to ${r.to}: ${r.files} files, ${r.bytes} bytes${r.late > 0 ? `, ${r.late} late message(s) copied after the switch` : ''}`);
        console.log(`the old copy stays on ${r.from ?? '-'} at ${r.oldPath ?? '-'}; remove it when satisfied`);
      }
    });


  // ---- cert issue ---------------------------------------------------------------------
  const cert = program.command('cert').description('cluster host certificates (on the CA holder)');
  cert
    .command('issue')
    .argument('<node>', 'the node name (subject CN and subjectAltName of the certificate)')
    .requiredOption('--out <dir>', 'write ca.crt, node.crt and node.key into this directory (created 0700 if missing)')
    .option('--days <n>', `validity in days, 1..${MAX_DAYS} (default ${HOST_CERT_DAYS})`)
    .addOption(new Option('--key <type>', 'the new key: ec (ECDSA P-256) or rsa (RSA-2048); either works with a CA of either kind').choices(['ec', 'rsa'] as const).default('ec' as const))
    .description('issue a host certificate for a new node, or a replacement for an existing one')
    .addHelpText(
      'after',
      `
Runs on the CA holder (the instance with tls.ca_key). Writes DIR/ca.crt, DIR/node.crt and
DIR/node.key (0600) and records the certificate in the shared database:
  - a new node: it joins with  pigeon init NEWDIR --node NODE --ca-from DIR --db SHARED_DB
  - an existing node (re-issue): the new certificate is accepted next to the current one; install
    node.crt + node.key as that node's peer.cert/peer.key and restart pigeon serve there.`,
    )
    .action(async (nodeName, o) => {
      const name = checkNodeName(nodeName);
      const days = parseDays(o.days);
      const out = resolve(o.out);
      const { instance, store } = await openCtx(cfg());
      try {
        const ca = readCa(instance.tls.ca, instance.tls.caKey);
        const files = { ca: join(out, 'ca.crt'), cert: join(out, 'node.crt'), key: join(out, 'node.key') };
        const present = Object.values(files).filter((f) => existsSync(f));
        if (present.length > 0) {
          throw new AppError('DUPLICATE', `${present.join(', ')} already exist${present.length === 1 ? 's' : ''}; refusing to overwrite: choose a new --out directory`);
        }
        // the X.509 library is loaded only here, where a certificate is issued
        const { issueHostCert } = await import('../../certs/ca.js');
        const host = await issueHostCert(ca, name, LOOPBACK_NAMES, { days }, o.key);
        let info;
        try {
          info = verifyHostCert(host.certPem, ca.certPem, name);
        } catch (e) {
          throw new AppError('CERT_INVALID', `the issued certificate does not verify against ${instance.tls.ca} (is ${instance.tls.caKey} the key of that CA?): ${(e as Error).message}`);
        }
        const dirCreated = !existsSync(out);
        const written: string[] = [];
        try {
          mkdirSync(out, { recursive: true, mode: 0o700 });
          writeFileSync(files.key, host.keyPem, { mode: 0o600, flag: 'wx' });
          written.push(files.key);
          writeFileSync(files.cert, host.certPem, { mode: 0o644, flag: 'wx' });
          written.push(files.cert);
          writeFileSync(files.ca, ca.certPem, { mode: 0o644, flag: 'wx' });
          written.push(files.ca);
        } catch (e) {
          for (const f of written) rmSync(f, { force: true });
          if (dirCreated) rmSync(out, { recursive: true, force: true });
          throw new AppError('IO', `cannot write into ${out}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
        }
        let kind: 'new' | 'next';
        try {
          kind = await store.announceCertificate(name, info.fingerprint, info.notAfter.toISOString());
        } catch (e) {
          // an unannounced certificate is useless: leave no files behind that look usable
          for (const f of written) rmSync(f, { force: true });
          if (dirCreated) {
            try {
              rmdirSync(out);
            } catch {
              /* not empty: leave it */
            }
          }
          throw e;
        }
        console.log(`certificate for node ${name} issued (fingerprint ${info.fingerprint}, expires ${info.notAfter.toISOString().slice(0, 10)})`);
        console.log(`  ${files.ca}\n  ${files.cert}\n  ${files.key} (private key, mode 0600: move it to the node over a secure channel)`);
        if (kind === 'new') {
          console.log(`node ${name} registered (not yet seen)`);
          console.log(`next, on the new node: pigeon init NEWDIR --node ${name} --ca-from ${out} --db ${instance.dbPath}${instance.dbOptions.passwordFile ? ' --db-password-file FILE' : ''} --listen peer=HOST:PORT --listen imap=HOST:PORT ...`);
        } else {
          console.log(`node ${name} already exists: the new certificate is accepted next to its current one`);
          console.log(`next: install ${files.cert} + ${files.key} as node ${name}'s peer.cert/peer.key and restart pigeon serve there (the peer link reads its certificate at start); both certificates are accepted until it registers with the new one`);
        }
      } finally {
        await store.close();
      }
    });

  // ---- node ---------------------------------------------------------------------------
  const node = program.command('node').description('cluster membership');
  node
    .command('list')
    .option('--json', 'JSON output: [{name, state, health, peer_address, last_seen, cert_expires, fingerprint, next_fingerprint, users}]')
    .description('list the nodes of the cluster: state, health, peer address, certificate expiry, users')
    .action(async (o) => {
      const { store } = await openCtx(cfg());
      const now = Date.now();
      const ns = await store.listNodes();
      const users = await store.usersPerNode();
      await store.close();
      if (o.json) {
        printJson(
          ns.map((n) => ({
            name: n.name,
            state: n.state,
            health: health(n, now),
            peer_address: n.peerAddress,
            last_seen: n.lastSeen,
            cert_expires: n.certExpires,
            fingerprint: n.fingerprint,
            next_fingerprint: n.nextFingerprint,
            users: users.get(n.name) ?? 0,
          })),
        );
        return;
      }
      if (ns.length === 0) {
        console.log('no nodes registered');
        return;
      }
      const rows = ns.map((n) => [
        n.name,
        n.state,
        health(n, now),
        n.peerAddress ?? '-',
        n.lastSeen ?? 'never',
        `${expiryText(n.certExpires, now)}${n.nextFingerprint !== null ? ' [re-issued: restart pending]' : ''}`,
        String(users.get(n.name) ?? 0),
      ]);
      console.log(table([['NAME', 'STATE', 'HEALTH', 'PEER', 'LAST SEEN', 'CERT EXPIRES', 'USERS'], ...rows]));
    });
  for (const [verb, state] of [['disable', 'disabled'], ['enable', 'active']] as const) {
    node
      .command(verb)
      .argument('<name>')
      .description(verb === 'disable' ? 'stop accepting a node on peer links (its users and mail are kept)' : 'accept a disabled node on peer links again')
      .action(async (name) => {
        const { store } = await openCtx(cfg());
        try {
          await store.setNodeState(checkNodeName(name), state);
        } finally {
          await store.close();
        }
        console.log(
          verb === 'disable'
            ? `node ${name} disabled: running nodes drop its peer links within about a second; its users cannot be reached until "pigeon node enable ${name}"`
            : `node ${name} enabled: running nodes accept its peer links again within about a second`,
        );
      });
  }
  node
    .command('remove')
    .argument('<name>')
    .description('remove a node for good: its certificates are revoked (refused while users live there)')
    .action(async (name) => {
      const { instance, store } = await openCtx(cfg());
      let revoked: number;
      try {
        revoked = (await store.removeNode(checkNodeName(name))).revoked;
      } finally {
        await store.close();
      }
      console.log(`node ${name} removed; ${revoked} certificate(s) revoked: it cannot rejoin with them (issue a new one with "pigeon cert issue ${name} --out DIR")`);
      if (name === instance.config.node) console.error(`pigeon: warning: ${name} is this instance's own node: its "pigeon serve" will refuse to start with the revoked certificate`);
    });
}
