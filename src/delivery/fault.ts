/**
 * NAME        src/delivery/fault — crash points for the durability tests
 * DESCRIPTION `PIGEON_FAULT=STEP` makes the delivering process kill itself with SIGKILL when it
 *             reaches STEP (spooled, tmp-partial, tmp-synced, renamed): the tests prove that a
 *             kill -9 at each step leaves nothing partial in new/ and acknowledges nothing.
 *             `shared-dir-sync` is reached when an fsync of a directory is about to begin for two
 *             or more callers that joined it (src/writer/safe-fs.ts fsyncDirGrouped: deliveries
 *             renamed into the same new/, waiting for it): a kill there proves that none of a
 *             group is acknowledged before the fsync that covers it.
 *             Inside the mail writer child (src/writer/writer-main.ts) the step is reported to
 *             the parent, which kills itself; the child stops right there and goes away with it,
 *             exactly as if the whole delivery had been killed at that point. Unset in production.
 */
export type FaultStep = 'spooled' | 'tmp-partial' | 'tmp-synced' | 'renamed' | 'shared-dir-sync';

/** Whether `step` is the armed one: for a hot path that must stay synchronous when it is not. */
export function faultArmed(step: FaultStep): boolean {
  return process.env['PIGEON_FAULT'] === step;
}

let reporter: ((step: FaultStep) => void) | null = null;

/** The writer child reports its faults to the parent instead of killing itself. */
export function reportFaultsTo(f: (step: FaultStep) => void): void {
  reporter = f;
}

export async function fault(step: FaultStep): Promise<void> {
  if (process.env['PIGEON_FAULT'] !== step) return;
  if (reporter !== null) {
    reporter(step);
    await new Promise<never>(() => undefined); // never continues: the parent is being killed
  }
  process.kill(process.pid, 'SIGKILL');
}
