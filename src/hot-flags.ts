/**
 * NAME        src/hot-flags — V8's tier-up budget for pigeon's long-lived busy processes
 * SYNOPSIS    cluster.setupPrimary({ execArgv: withHotFlags(process.execArgv) });
 *             fork(MAIN, [], { execArgv: hotFlags() });   // the mail writer; the node state service likewise
 *             applyHotFlags();   // serve's primary, which hosts the node state service
 * DESCRIPTION `pigeon serve`'s workers, the mail writer child (src/writer/mail-writer.ts) and the
 *             node state service (src/anvil) run the same few code paths for every login and
 *             every delivered message, for as long as the node runs. V8 runs a function in its
 *             interpreter until the function has spent a budget of bytecode (`--interrupt-budget`,
 *             66 KiB by default), then optimises it; with the default a worker's per-message LMTP
 *             code is still being optimised after several hundred messages (README, Performance:
 *             *V8's warm-up is longer than one round*). These processes start with a quarter of
 *             that budget, so their hot code is optimised after a quarter of the work; the
 *             optimising compiler runs on V8's own background thread. Nothing else changes: what
 *             the code does is the same, only how soon it runs compiled. Children get the flag
 *             on their command line; serve's primary, started by the administrator, sets it on
 *             itself (v8.setFlagsFromString: the budget is read each time a function's count
 *             starts over, so it applies to the code that runs from then on).
 *             An `--interrupt-budget` the administrator gave node (`node --interrupt-budget=N
 *             dist/src/cli.js serve`) is kept as given, and passed on to the children instead.
 *             Short-lived processes (`pigeon deliver`, one-shot inetd sessions) do not set it on
 *             themselves: they end before a budget of either size would matter (a mail writer or
 *             node state service they start gets it like any other).
 * SEE ALSO    forkers/listen.ts, src/writer/mail-writer.ts, src/anvil/client.ts
 */
import { setFlagsFromString } from 'node:v8';

/** A quarter of V8's default interrupt budget (66 KiB of bytecode). */
export const HOT_INTERRUPT_BUDGET = 16_896;

const GIVEN = /^--interrupt[-_]budget=/;

/** `execArgv` with the hot processes' V8 flag added, unless it already sets one of its own. */
export function withHotFlags(execArgv: readonly string[]): string[] {
  if (execArgv.some((a) => GIVEN.test(a))) return [...execArgv];
  return [...execArgv, `--interrupt-budget=${HOT_INTERRUPT_BUDGET}`];
}

/** The flag for a child of this process: this process's own `--interrupt-budget`, if node was given one. */
export function hotFlags(): string[] {
  const given = process.execArgv.filter((a) => GIVEN.test(a));
  return given.length > 0 ? given : [`--interrupt-budget=${HOT_INTERRUPT_BUDGET}`];
}

/** This process takes the budget from now on, unless node was started with one. */
export function applyHotFlags(): void {
  if (process.execArgv.some((a) => GIVEN.test(a))) return;
  setFlagsFromString(`--interrupt-budget=${HOT_INTERRUPT_BUDGET}`);
}
