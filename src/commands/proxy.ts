/** pigeon serve | imap | pop3: the IMAP/POP3 proxy commands (filled in by the proxy work). */
import type { Command } from '@commander-js/extra-typings';

export function registerProxy(program: Command, cfg: () => string | undefined): void {
  void program;
  void cfg;
}
