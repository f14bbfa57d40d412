/**
 * NAME        src/config-check — what `pigeon config test` checks beyond parsing the files
 * DESCRIPTION After the files parsed and the database opened: the certificate pairs (tls.cert/
 *             tls.key and every tls.sni entry: readable, the key belongs to the certificate,
 *             valid now; peer.cert/peer.key: also issued by the cluster CA and naming this node).
 * DIAGNOSTICS Returns report lines, warnings (certificates expiring within 30 days) and problems;
 *             the command exits 78 when there is a problem.
 * SECURITY    Key bytes are only parsed; messages name files, never contents.
 */
import type { Instance } from './instance.js';
import { checkPair, clientPairs } from './client-tls.js';
import { loadNodeCredentials } from '../certs/verify.js';
import { EXPIRY_WARN_DAYS } from '../certs/ca.js';
import { isAppError } from './errors.js';

export interface CheckReport {
  readonly lines: string[];
  readonly warnings: string[];
  readonly problems: string[];
}

function days(to: Date, now: Date): number {
  return Math.floor((to.getTime() - now.getTime()) / 86400_000);
}

/** Certificates: what clients see (tls, tls.sni) and the node certificate of peer links (peer). */
export function checkCertificates(instance: Instance, r: CheckReport, now = new Date()): void {
  for (const p of clientPairs(instance.tls)) {
    try {
      const info = checkPair(p, now);
      r.lines.push(`${p.setting}: ${p.cert} (${info.names.length > 0 ? info.names.join(', ') : info.subject}; issuer ${info.issuer}; expires ${info.notAfter.toISOString().slice(0, 10)})`);
      const d = days(info.notAfter, now);
      if (d < EXPIRY_WARN_DAYS) r.warnings.push(`${p.setting}.cert: ${p.cert} expires in ${d} days`);
    } catch (e) {
      r.problems.push(isAppError(e) ? e.message : String(e));
    }
  }
  try {
    const c = loadNodeCredentials(instance.peerTls, instance.config.node);
    r.lines.push(`peer: ${instance.peerTls.cert} (node ${c.name} from the cluster CA ${instance.peerTls.ca}; expires ${c.notAfter.toISOString().slice(0, 10)})`);
    const d = days(c.notAfter, now);
    if (d < EXPIRY_WARN_DAYS) r.warnings.push(`peer.cert: ${instance.peerTls.cert} expires in ${d} days; re-issue it with "pigeon cert issue ${c.name} --out DIR" on the CA holder`);
  } catch (e) {
    r.problems.push(`peer.cert/peer.key: ${isAppError(e) ? e.message : String(e)}`);
  }
}
