/** pigeon deliver | lmtp: the delivery agent commands (filled in by the delivery work). */
import type { Command } from '@commander-js/extra-typings';

export function registerDelivery(program: Command, cfg: () => string | undefined): void {
  void program;
  void cfg;
}
