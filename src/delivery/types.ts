/**
 * NAME        src/delivery/types — the typed contracts of the delivery pipeline
 * DESCRIPTION A delivery module (mailstore, forward, vacation, ...) is one file exporting a
 *             `DeliveryModule`, registered by name in src/delivery/registry.ts (or named in
 *             pigeon.yaml `modules.delivery`). It declares its per-user settings itself
 *             (`settings`: the keys of `NAME.*`, `enabled` among them), runs for a recipient iff
 *             its effective `enabled` is true, in phase order scan → store → notify, and sees only
 *             its own settings slice.
 *             Two steps keep "delivered" and "deferred" exclusive: `run` prepares (writes the
 *             message into tmp/, checks quota, validates forward targets) and may fail; the
 *             pipeline then runs every prepared `commit` in module order (the fallible ones, such
 *             as a sendmail re-injection, come first; a rename into new/ last). A failure before
 *             the first commit aborts every prepared step, so nothing is visible. Notify-phase
 *             modules run after the commits and can no longer change the outcome.
 */
import type { Json, KeyDecl } from '../settings.js';
import type { UserRecord } from '../store.js';
import type { Effective } from '../resolve.js';
import type { AllocationContext } from '../allocation.js';
import type { ModuleBase } from '../modules.js';
import type { Spooled } from './message.js';

/** An enhanced status code (RFC 3463) and a short text: the outcome of one recipient. */
export interface DeliveryResult {
  readonly dsn: string; // '2.0.0', '4.2.2', '5.1.1', ...
  readonly text: string;
}

export const isTemp = (r: DeliveryResult): boolean => r.dsn.startsWith('4');
export const isPerm = (r: DeliveryResult): boolean => r.dsn.startsWith('5');
export const isOk = (r: DeliveryResult): boolean => r.dsn.startsWith('2');

export type Phase = 'scan' | 'store' | 'notify';
export const PHASES: readonly Phase[] = ['scan', 'store', 'notify'];

/** A prepared effect: committed after every store-phase module succeeded, else aborted. */
export interface Prepared {
  readonly what: string;
  commit(): Promise<void>;
  abort(): Promise<void>;
}

export type StepResult =
  | {
      readonly kind: 'continue';
      readonly prepared?: Prepared;
      readonly keep?: boolean;
      /** deliver into this folder, created if missing (antivirus quarantine); wins over -m and +detail */
      readonly folder?: string;
      /** runs with the notify phase, only once the message is delivered; a failure is logged (antivirus notice) */
      readonly afterDelivery?: () => Promise<void>;
    }
  | { readonly kind: 'fail'; readonly result: DeliveryResult };

/**
 * Store one recipient's message on the node that holds its mailbox (over the peer link, built on
 * first use); resolves with that node's answer, given only after its fsync.
 */
export type RemoteStore = (node: string, req: RecipientRequest) => Promise<DeliveryResult>;

/** The node-local environment every module may use. */
export interface DeliveryEnv {
  readonly alloc: AllocationContext;
  /** recipients homed on other nodes; null: this delivery came over a link (never forwarded again) */
  readonly remote: RemoteStore | null;
  /** the MTA's sendmail command (pigeon.yaml `sendmail`) */
  readonly sendmail: string;
  readonly hostname: string;
  /** how long an mbox delivery waits for the mailbox locks (pigeon.yaml limits.mda_lock_wait_s) */
  readonly lockWaitMs: number;
  /** Dovecot's delivery program (pigeon.yaml dovecot.lda) and how long one delivery may take (dovecot.lda_timeout_s) */
  readonly dovecotLda: { readonly path: string; readonly timeoutMs: number };
  /** ClamAV's clamd (pigeon.yaml clamd.address, clamd.timeout_s): the antivirus module scans with it */
  readonly clamd: { readonly address: string; readonly timeoutMs: number };
  readonly log: (level: 'debug' | 'info' | 'warn' | 'error', msg: string, fields?: Record<string, string | number | boolean | null | undefined>) => void;
}

/** One recipient of one message, as every module sees it. */
export interface RecipientRequest {
  /** envelope recipient as given, normalised (may carry +detail) */
  readonly rcpt: string;
  /** the user it resolved to (without +detail) */
  readonly user: UserRecord;
  readonly config: Effective;
  /** +detail of the recipient, or null */
  readonly detail: string | null;
  /** original recipient (-a / ORCPT), for information */
  readonly original: string | null;
  /** envelope sender, '' for the null sender */
  readonly sender: string;
  readonly message: Spooled;
  /** -m MAILBOX (dovecot-lda compatible), or null */
  readonly mailbox: string | null;
  /** decisions of earlier modules: forward with keep=false clears it */
  keep: boolean;
  /** a folder an earlier module chose (antivirus quarantine): the mailstore delivers there, creating it */
  folder: string | null;
  /**
   * Set by the pipeline for each scan/store module: true when it runs last and no module before it
   * prepared anything, so its commit would follow its prepare with nothing in between that could
   * fail. It may then commit within `run` (and return a Prepared whose commit has nothing left to
   * do): the mailstore writes and renames in one round trip to the mail writer.
   */
  commitAtOnce: boolean;
  /** header lines modules added (`Name: value` + LF, UTF-8), stored above the message's own header */
  readonly added: readonly Buffer[];
  /**
   * Add a header line to this recipient's copy (the mailbox here or on the home node). `name` is a
   * header field name (RFC 5322 ftext), `value` holds no CR, LF or NUL; else it throws.
   */
  addHeader(name: string, value: string): void;
}

export interface DeliveryModule extends ModuleBase<'delivery'> {
  readonly phase: Phase;
  /** its per-user settings `NAME.KEY` (the settings catalog lists them); `enabled` decides whether it runs */
  readonly settings: Readonly<Record<string, KeyDecl>>;
  /** `settings`: the recipient's effective values of this module's keys */
  run(req: RecipientRequest, settings: Readonly<Record<string, Json>>, env: DeliveryEnv): Promise<StepResult>;
}
