/**
 * NAME        src/delivery/outcome — a DeliveryResult as a sysexits code and as an SMTP/LMTP reply
 * DESCRIPTION pipe(8) reads our one output line: when it begins with an enhanced status code that
 *             code wins over the exit status, so the line always carries it. The exit codes are
 *             the ones Postfix maps the same way (0 sent, 75 deferred, 67 unknown user, 65 bad
 *             input, 77 refused by policy: 5.7.x), and every 4.x.x is 75, whatever caused it.
 */
import { EX, type ExitCode } from '../errors.js';
import type { DeliveryResult } from './types.js';

export function exitCodeOf(r: DeliveryResult): ExitCode {
  if (r.dsn.startsWith('2')) return EX.OK;
  if (!r.dsn.startsWith('5')) return EX.TEMPFAIL;
  if (r.dsn === '5.1.1' || r.dsn === '5.2.1') return EX.NOUSER;
  if (r.dsn === '5.2.2') return EX.CANTCREAT;
  if (r.dsn.startsWith('5.7.')) return EX.NOPERM; // refused by policy (a Sieve reject)
  return EX.DATAERR;
}

export function smtpCodeOf(r: DeliveryResult): number {
  const d = r.dsn;
  if (d.startsWith('2')) return 250;
  if (d.startsWith('4')) return d === '4.2.2' || d === '4.3.1' ? 452 : 451;
  // 5.7.1 (a policy refusal: antivirus reject) is 550, as Postfix's smtpd answers a 5.7.1 REJECT
  if (d === '5.1.1' || d === '5.2.1' || d === '5.1.3' || d === '5.7.1') return 550;
  if (d === '5.2.2' || d === '5.3.4') return 552;
  return 554;
}

/** Several recipients on one pipe(8) call: a temporary failure wins, then a permanent one. */
export function summarise(rs: readonly DeliveryResult[]): DeliveryResult {
  return rs.find((r) => r.dsn.startsWith('4')) ?? rs.find((r) => r.dsn.startsWith('5')) ?? rs[0] ?? { dsn: '2.0.0', text: 'delivered' };
}

/** The one output line: "D.D.D text", no control characters. */
export function statusLine(r: DeliveryResult): string {
  return `${r.dsn} ${r.text}`.replace(/[\x00-\x1f\x7f]/g, ' ').slice(0, 500);
}
