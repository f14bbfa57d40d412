/**
 * NAME        src/delivery/fault — crash points for the durability tests
 * DESCRIPTION `PIGEON_FAULT=STEP` makes the process kill itself with SIGKILL when it reaches STEP
 *             (spooled, tmp-partial, tmp-synced, renamed): the tests prove that a kill -9 at each
 *             step leaves nothing partial in new/ and acknowledges nothing. Unset in production.
 */
export function fault(step: 'spooled' | 'tmp-partial' | 'tmp-synced' | 'renamed'): void {
  if (process.env['PIGEON_FAULT'] === step) process.kill(process.pid, 'SIGKILL');
}
