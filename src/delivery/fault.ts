/**
 * NAME        src/delivery/fault — crash points for the durability tests
 * DESCRIPTION `PIGEON_FAULT=STEP` makes the delivering process kill itself with SIGKILL when it
 *             reaches STEP (spooled, tmp-partial, tmp-synced, renamed): the tests prove that a
 *             kill -9 at each step leaves nothing partial in new/ and acknowledges nothing.
 *             Inside the mail writer child (src/writer/writer-main.ts) the step is reported to
 *             the parent, which kills itself; the child stops right there and goes away with it,
 *             exactly as if the whole delivery had been killed at that point. Unset in production.
 */
export type FaultStep = 'spooled' | 'tmp-partial' | 'tmp-synced' | 'renamed';

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
