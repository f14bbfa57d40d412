/**
 * NAME        src/anvil/answer — one request of the node state protocol, answered from a state
 * DESCRIPTION The service (src/anvil/server.ts) answers its clients' requests from the node's
 *             state, and a client that cannot reach the service (src/anvil/client.ts) answers its
 *             own requests from a per-process state: both through this one function, so the two
 *             give the same answers to the same requests.
 *             `owner` and `pid` name the process that asked; `ended` is told every connection
 *             that a `conn.open` pushed out (`evicted`) or a `kick` removed (`kicked`): its
 *             owner must end it.
 */
import type { AnvilState, ConnRecord } from './state.js';
import { PROTOCOL_VERSION, type RequestBody, type Results, type ListedRecord } from './protocol.js';
import { pidAlive } from '../pid.js';

function listed(r: ConnRecord): ListedRecord {
  return { pid: r.pid, conn: r.conn, ip: r.ip, proto: r.proto, trusted: r.trusted, state: r.state, held: r.held, user: r.user, session: r.session, backend: r.backend, since: r.since };
}

export function answer(state: AnvilState, owner: number, pid: number, req: RequestBody, now: number, ended: (ev: ConnRecord, reason: 'evicted' | 'kicked') => void): object {
  switch (req.op) {
    case 'hello':
      return { pid: process.pid, version: PROTOCOL_VERSION } satisfies Results['hello'];
    case 'conn.open': {
      const r = state.open(owner, pid, req.conn, { ip: req.ip, proto: req.proto, trusted: req.trusted }, { perIp: req.max_per_ip, total: req.max_total }, now);
      if (!r.admitted) return { admitted: false, why: r.why } satisfies Results['conn.open'];
      for (const ev of r.evicted) ended(ev, 'evicted');
      return { admitted: true, evicted: r.evicted.length } satisfies Results['conn.open'];
    }
    case 'conn.restore':
      state.restore({ ...req.record, owner, pid });
      return {};
    case 'conn.login':
      return state.login(owner, req.conn, req.user, req.session, req.max_userip) satisfies Results['conn.login'];
    case 'conn.logout':
      state.logout(owner, req.conn);
      return {};
    case 'conn.held':
      state.setHeld(owner, req.conn, req.held);
      return {};
    case 'conn.close':
      state.close(owner, req.conn);
      return {};
    case 'penalty.get': {
      const p = state.penaltyGet(req.key, now);
      return { count: p.count, age_ms: p.ageMs } satisfies Results['penalty.get'];
    }
    case 'penalty.fail':
      return { count: state.penaltyFail(req.key, now) } satisfies Results['penalty.fail'];
    case 'penalty.clear':
      state.penaltyClear(req.key);
      return {};
    case 'conn.backend':
      state.setBackend(owner, req.conn, req.backend);
      return {};
    case 'list': {
      state.dropDead(pidAlive);
      const conns = state.list(req.user === undefined ? {} : { user: req.user }).map(listed);
      return { pid: process.pid, conns, counts: state.counts(now) } satisfies Results['list'];
    }
    case 'kick': {
      state.dropDead(pidAlive);
      const kicked = state.kick(req.user, req.ip ?? null);
      for (const r of kicked) ended(r, 'kicked');
      return { kicked: kicked.map(listed) } satisfies Results['kick'];
    }
  }
}
