/**
 * NAME        src/peer/listener — the `peer` listener of `pigeon serve`: receive hand-offs
 * SYNOPSIS    pigeon.yaml: listen: ["peer=10.0.0.3:4190"]   (peer.advertise when behind NAT)
 * DESCRIPTION TLS 1.3 only, with this node's peer.cert/peer.key (never the client-facing tls.cert);
 *             the client must present a host certificate issued by the cluster CA
 *             (node:tls checks chain and dates), and the node it names must be registered,
 *             enabled, with that certificate's fingerprint (NodeDirectory.check, from the cached
 *             registry: no database read per link). Then one hand-off (src/peer/protocol.ts),
 *             within peer.handoff_timeout_s, checked for mac, freshness, replay, addressee,
 *             sender, hop count and home node. Who is trusted is the trust module's decision
 *             (peer.trust, certs/trust.ts; default `registry`). For imap/pop3 this node starts its local backend
 *             from what it received — no authentication, no user lookup — answers {"ok":true} and
 *             relays. For a delivery it runs its own mailstore module and answers only after the
 *             message is durably stored (file fsync, rename, directory fsync).
 *             Every refresh of the registry re-checks the open links: a node disabled or removed
 *             loses its links at once.
 * DIAGNOSTICS Log lines `peer: Refused link from NODE (rip=…): reason`, `peer: Refused hand-off
 *             from NODE: code: text`, `peer(user): Login: from=NODE, rip=…, session=…`.
 */
import { createServer, type Server, type TLSSocket } from 'node:tls';
import type { X509Certificate } from 'node:crypto';
import type { Listener } from '../instance.js';
import type { ProxyEnv } from '../proxy/env.js';
import { ClientConn, unmap } from '../proxy/conn.js';
import { route, runSession } from '../proxy/router.js';
import { certNodeName } from '../../certs/verify.js';
import { count } from '../metrics.js';
import { slice } from '../modules.js';
import { HOP_LIMIT, HANDOFF_MAX_BYTES, CLOCK_SKEW_MS, NonceCache, openHandOff, readLine, replyLine, exactBytes, fromWireUser, fromWireConfig, type HandOff } from './protocol.js';

interface Link {
  readonly sock: TLSSocket;
  readonly node: string;
  readonly fingerprint: string;
  readonly certificate: X509Certificate;
}

/** The hand-off checks that do not need the TLS session (mac is checked by openHandOff). */
export function admissible(h: HandOff, me: string, sender: string, nonces: NonceCache, mailRoot: string, now = Date.now()): { code: string; text: string } | null {
  if (h.from !== sender) return { code: 'sender', text: `hand-off claims to come from ${h.from} but the certificate is ${sender}'s` };
  if (h.to !== me) return { code: 'addressee', text: `hand-off is addressed to node ${h.to}, this is ${me}` };
  if (h.hops < 1 || h.hops > HOP_LIMIT) return { code: 'hops', text: `hop count ${h.hops} outside 1..${HOP_LIMIT} (a forwarding loop?)` };
  if (Math.abs(now - h.ts) > CLOCK_SKEW_MS) return { code: 'stale', text: `hand-off timestamp is ${Math.round((now - h.ts) / 1000)}s off (clock skew over ${CLOCK_SKEW_MS / 1000}s, or a replay)` };
  if (!nonces.admit(h.nonce, now)) return { code: 'replay', text: 'hand-off nonce already used' };
  if (h.kind === 'move-out' || h.kind === 'move-in') {
    const mv = h.move;
    if (!mv) return { code: 'malformed', text: 'move without move fields' };
    if (h.kind === 'move-out' && mv.from !== me) return { code: 'not-home', text: `move-out is for node ${mv.from}, this is ${me}` };
    if (h.kind === 'move-in' && (mv.to !== me || mv.from !== sender)) return { code: 'addressee', text: `move-in of ${h.user.address} from ${mv.from} to ${mv.to} does not match this link (${sender} → ${me})` };
    if (mv.pass === 1 && h.user.movingTo !== mv.to) return { code: 'not-moving', text: `user ${h.user.address} is not marked as moving to ${mv.to}` };
    return null;
  }
  const a = h.user.allocation;
  if (a !== null && (!a.path.startsWith(`${mailRoot}/`) || (a.node !== undefined && a.node !== me))) {
    return { code: 'allocation', text: `mailbox ${a.path} of ${h.user.address} is not in this node's mail root ${mailRoot}` };
  }
  if (h.user.home !== me) return { code: 'not-home', text: `user ${h.user.address} does not live on this node (home ${h.user.home ?? 'none'})` };
  if (h.user.state !== 'active') return { code: 'disabled', text: `user ${h.user.address} is disabled` };
  if (h.user.movingTo !== null) return { code: 'moving', text: `user ${h.user.address} is being moved to ${h.user.movingTo}` };
  if ((h.kind === 'deliver') !== (h.deliver !== null)) return { code: 'malformed', text: 'delivery fields do not match the kind' };
  return null;
}

export function peerListener(l: Listener, env: ProxyEnv): Server | null {
  if (l.protocol !== 'peer') return null;
  const creds = env.peer.credentials();
  const me = env.instance.config.node;
  const nonces = new NonceCache();
  const links = new Set<Link>();
  const log = (level: 'info' | 'warn' | 'error', prefix: string, msg: string, fields?: Record<string, string | number | boolean | null>): void =>
    env.log.log(level, prefix, msg, fields);

  env.peer.nodes.onRefresh(() => {
    for (const k of links) {
      void env.peer.trust.check(env.peer.nodes, { name: k.node, fingerprint: k.fingerprint, certificate: k.certificate }).then(
        (chk) => {
          if (chk.ok || !links.has(k)) return;
          log('warn', 'peer', `Closing link from ${k.node}: ${chk.reason}`);
          k.sock.destroy();
          links.delete(k);
        },
        () => undefined, // the registry cannot be read now: the link stays until a refresh says otherwise
      );
    }
  });

  const server = createServer({
    ca: creds.ca,
    cert: creds.cert,
    key: creds.key,
    requestCert: true,
    // checked in handle() before a byte is read, so the refusal can be logged with its reason
    rejectUnauthorized: false,
    minVersion: 'TLSv1.3',
    maxVersion: 'TLSv1.3',
    handshakeTimeout: 15_000,
  });
  server.on('tlsClientError', (e: Error, s: TLSSocket) => {
    count('pigeon_peer_links_refused_total', { reason: 'tls' });
    log('warn', 'peer', `Refused link (TLS: ${e.message.split('\n')[0] ?? ''}):`, { rip: unmap(s.remoteAddress) });
  });
  server.on('secureConnection', (sock: TLSSocket) => {
    sock.on('error', () => undefined);
    sock.setNoDelay(true);
    void handle(sock).catch((e: unknown) => {
      log('error', 'peer', `link failed: ${e instanceof Error ? e.message : String(e)}`);
      sock.destroy();
    });
  });

  const refuse = (sock: TLSSocket, code: string, text: string): void => {
    sock.end(replyLine({ ok: false, code, text }));
    setTimeout(() => sock.destroy(), 1000).unref();
  };

  async function handle(sock: TLSSocket): Promise<void> {
    const rip = unmap(sock.remoteAddress);
    if (!sock.authorized) {
      count('pigeon_peer_links_refused_total', { reason: 'certificate' });
      log('warn', 'peer', `Refused link (certificate: ${String(sock.authorizationError ?? 'not verified')}):`, { rip });
      sock.destroy();
      return;
    }
    const x = sock.getPeerX509Certificate();
    if (!x) {
      log('warn', 'peer', 'Refused link (no client certificate):', { rip });
      sock.destroy();
      return;
    }
    const name = certNodeName(x);
    let chk;
    try {
      chk = await env.peer.trust.check(env.peer.nodes, { name, fingerprint: x.fingerprint256, certificate: x });
    } catch (e) {
      chk = { ok: false as const, reason: `node registry unavailable: ${e instanceof Error ? e.message : String(e)}` };
    }
    if (!chk.ok) {
      count('pigeon_peer_links_refused_total', { reason: 'registry' });
      log('warn', 'peer', `Refused link from ${name}: ${chk.reason}:`, { rip });
      refuse(sock, 'refused', chk.reason);
      return;
    }
    const link: Link = { sock, node: name, fingerprint: x.fingerprint256, certificate: x };
    links.add(link);
    sock.once('close', () => links.delete(link));
    let line: Buffer;
    try {
      line = await readLine(sock, HANDOFF_MAX_BYTES, env.peer.handoffTimeoutMs);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'EMPTY') {
        env.log.log('debug', 'peer', `Link from ${name} closed unused:`, { rip });
        sock.destroy();
        return;
      }
      count('pigeon_peer_handoffs_received_total', { kind: 'unknown', result: 'incomplete' });
      log('warn', 'peer', `Hand-off from ${name} failed: ${(e as Error).message}:`, { rip });
      sock.destroy();
      return;
    }
    const o = openHandOff(sock, line);
    const bad = o.ok ? admissible(o.handOff, me, name, nonces, env.instance.mailRoot) : { code: o.code, text: o.text };
    if (!o.ok || bad) {
      const b = bad ?? { code: '?', text: '?' };
      count('pigeon_peer_handoffs_received_total', { kind: o.ok ? o.handOff.kind : 'unknown', result: b.code });
      log('warn', 'peer', `Refused hand-off from ${name}: ${b.code}: ${b.text}:`, { rip, ...(o.ok ? { user: o.handOff.user.address, session: o.handOff.session } : {}) });
      refuse(sock, b.code, b.text);
      return;
    }
    const h = o.handOff;
    count('pigeon_peer_handoffs_received_total', { kind: h.kind, result: 'accepted' });
    if (h.kind === 'deliver') await receiveDelivery(sock, h, name);
    else if (h.kind === 'move-in' || h.kind === 'move-out') {
      const m = await import('./move.js');
      log('info', `peer(${h.user.address})`, `${h.kind} pass ${h.move?.pass ?? '?'} requested by ${name} (${h.move?.from ?? '?'} → ${h.move?.to ?? '?'})`);
      if (h.kind === 'move-in') await m.receiveMailbox(sock, h, env.instance.mailRoot, env.mailUser);
      else await m.serveMoveOut(sock, h, env.peer, env.instance.mailRoot);
    } else await receiveSession(sock, h, name);
  }

  async function receiveSession(sock: TLSSocket, h: HandOff, from: string): Promise<void> {
    const proto = h.kind === 'pop3' ? 'pop3' : 'imap';
    const c = h.client ?? { rip: '', rport: 0, lip: '', lport: 0, tls: false };
    const conn = new ClientConn({ input: sock, peer: { rip: c.rip, rport: c.rport, lip: c.lip, lport: c.lport }, secure: true, local: false, canTls: false });
    const u = { user: fromWireUser(h.user), config: fromWireConfig(h.config) };
    const rt = await route(env, proto, u, conn, h.session, h.tag, () => Buffer.alloc(0), { forward: false });
    if (!rt.ok) {
      log('error', `${proto}(${u.user.address})`, `Backend failure for a session from ${from}: ${rt.reason}:`, { rip: c.rip, session: h.session });
      refuse(sock, 'unavailable', rt.reason);
      return;
    }
    sock.write(replyLine({ ok: true }));
    log('info', `${proto}(${u.user.address})`, `Login: from=${from}, method=peer:`, { rip: c.rip, lip: c.lip, TLS: c.tls, session: h.session });
    await runSession(env, proto, u.user.address, h.session, conn, rt.session, Buffer.alloc(0));
  }

  // the delivery side, loaded and built on the first delivery received (mail user looked up once);
  // null peer: a received message is never forwarded again; the logger follows SIGHUP reloads
  const loadKit = async () => {
    const [msg, ms, de] = await Promise.all([import('../delivery/message.js'), import('../delivery/mailstore.js'), import('../delivery/env.js')]);
    return { spool: msg.spool, mailstore: ms.default, spoolLimit: ms.spoolLimit, denv: de.makeDeliveryEnv(env.instance, env.store, { log: (...a) => env.log.log(...a) }, 'lmtp', null) };
  };
  let kit: ReturnType<typeof loadKit> | null = null;

  async function receiveDelivery(sock: TLSSocket, h: HandOff, from: string): Promise<void> {
    const d = h.deliver;
    if (!d) return;
    const { spool, mailstore, spoolLimit, denv } = await (kit ??= loadKit());
    const user = fromWireUser(h.user);
    const config = fromWireConfig(h.config);
    sock.write(replyLine({ ok: true }));
    let message;
    try {
      message = await spool(exactBytes(sock[Symbol.asyncIterator]() as AsyncIterator<Buffer>, sock, d.size, env.peer.handoffTimeoutMs * 6), { limit: spoolLimit([config['mailstore.max_size']?.value]) });
    } catch (e) {
      log('warn', `lmtp(${user.address})`, `Delivery from ${from} aborted: ${(e as Error).message}`, { session: h.session });
      sock.destroy();
      return;
    }
    let result: { dsn: string; text: string };
    try {
      const req = { rcpt: d.rcpt, user, config, detail: d.detail, original: d.original, sender: d.sender, message, mailbox: d.mailbox, keep: true };
      const step = await mailstore.run(req, slice(config, 'mailstore'), denv);
      if (step.kind === 'fail') result = step.result;
      else if (!step.prepared) result = { dsn: '4.3.5', text: 'mailstore stored nothing' };
      else {
        try {
          await step.prepared.commit();
          result = { dsn: '2.0.0', text: `<${d.rcpt}> Saved on ${me}` };
          denv.log('info', 'delivered', { user: d.rcpt, from: d.sender === '' ? '<>' : d.sender, via: from, size: message.size, to: step.prepared.what });
        } catch (e) {
          await step.prepared.abort().catch(() => undefined);
          const r = (e as { result?: { dsn: string; text: string } } | null)?.result;
          result = r ?? { dsn: '4.3.0', text: `store failed: ${(e as Error).message}` };
        }
      }
    } finally {
      await message.close();
    }
    if (!result.dsn.startsWith('2')) denv.log('warn', 'deferred', { user: d.rcpt, via: from, status: `${result.dsn} ${result.text}` });
    sock.end(replyLine({ dsn: result.dsn, text: result.text }));
  }

  return server;
}
