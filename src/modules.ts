/**
 * NAME        src/modules — what every module shares, and the registry of one kind
 * DESCRIPTION A module is one file whose default export is an object of its kind's contract:
 *               delivery  src/delivery/types.ts   registry src/delivery/registry.ts
 *               mda       src/delivery/mda.ts     registry src/delivery/registry-mda.ts
 *               creator   src/creators/types.ts   registry src/creators/registry.ts
 *               backend   backends/types.ts       registry backends/registry.ts
 *               forker    forkers/types.ts        registry forkers/registry.ts
 *               auth      auth/types.ts           registry auth/registry.ts
 *               trust     certs/trust.ts          registry certs/trust.ts
 *             Each contract extends `ModuleBase` (kind, name, summary) and knows only its own
 *             configuration. A kind's `Registry` holds the built-in modules (a static list: no
 *             directory scanning) and those an instance names in pigeon.yaml `modules:` (loaded by
 *             src/module-files.ts). Settings, choices and configuration sections are derived from
 *             the registries (src/catalog.ts, src/instance.ts, the CLI); `checkModule` is the
 *             self-check every module passes when it is registered (src/registries.ts).
 *             `AuthInstance` is what a login asks (auth/chain.ts builds it from the auth sources).
 */
import type { Json } from './settings.js';
import type { UserRecord } from './store.js';
import type { Effective } from './resolve.js';

export const KINDS = ['delivery', 'mda', 'creator', 'backend', 'forker', 'auth', 'trust'] as const;
export type Kind = (typeof KINDS)[number];

/**
 * The kinds pigeon.yaml `modules:` may name files for (src/module-files.ts). Auth sources have
 * their own `auth.modules`; MDA modules run inside the mail writer child and forkers before the
 * configuration is read, so both are built in only.
 */
export const FILE_MODULE_KINDS = ['delivery', 'creator', 'backend', 'trust'] as const;
export type FileModuleKind = (typeof FILE_MODULE_KINDS)[number];

/** What every module of every kind has. */
export interface ModuleBase<K extends Kind = Kind> {
  readonly kind: K;
  /** the name configuration uses (a setting's value, a chain entry, a `--forker` choice) */
  readonly name: string;
  readonly summary: string;
}

/** A module name: lower-case letters, digits and hyphens, starting with a letter. */
export const MODULE_NAME = /^[a-z][a-z0-9-]{0,30}$/;

/**
 * The modules of one kind, by name: the built-ins first, in their order (the order matters for
 * delivery modules), then any loaded from files. `check` is the kind's self-check of one module:
 * what is wrong with it, or nothing.
 */
export class Registry<M extends ModuleBase> {
  readonly kind: M['kind'];
  private readonly byName = new Map<string, M>();
  private readonly fromFile = new Map<string, string>();
  private readonly check: (m: M, registry: Registry<M>) => string[];
  private readonly listeners: (() => void)[] = [];

  constructor(kind: M['kind'], builtins: readonly M[], check: (m: M, registry: Registry<M>) => string[] = () => []) {
    this.kind = kind;
    this.check = check;
    for (const m of builtins) this.byName.set(m.name, m);
  }

  get(name: string): M | undefined {
    return this.byName.get(name);
  }

  has(name: string): boolean {
    return this.byName.has(name);
  }

  names(): string[] {
    return [...this.byName.keys()];
  }

  all(): M[] {
    return [...this.byName.values()];
  }

  /** The file a module was loaded from, or null for a built-in one. */
  origin(name: string): string | null {
    return this.fromFile.get(name) ?? null;
  }

  /** What is wrong with each module (its self-check, and the checks every module passes). */
  problems(): string[] {
    const out: string[] = [];
    for (const m of this.byName.values()) for (const p of this.problemsOf(m)) out.push(`${this.kind} module ${m.name}${this.fromFile.has(m.name) ? ` (${this.fromFile.get(m.name) ?? ''})` : ''}: ${p}`);
    return out;
  }

  private problemsOf(m: M): string[] {
    const out: string[] = [];
    if (m.kind !== this.kind) out.push(`kind is ${JSON.stringify(m.kind)}, expected ${JSON.stringify(this.kind)}`);
    if (typeof m.name !== 'string' || !MODULE_NAME.test(m.name)) out.push('a module name is lower-case letters, digits and hyphens');
    if (typeof m.summary !== 'string' || m.summary === '') out.push('no summary');
    if (out.length > 0) return out;
    return this.check(m, this);
  }

  /**
   * Add a module loaded from `file` (src/module-files.ts). Refused, with the reason, when the
   * name is taken or the module fails its kind's self-check; the registry is then unchanged.
   */
  add(m: M, file: string): void {
    if (this.byName.has(m.name)) throw new Error(`${m.name} is ${this.fromFile.has(m.name) ? 'already loaded' : `a built-in ${this.kind} module`}`);
    const bad = this.problemsOf(m);
    if (bad.length > 0) throw new Error(bad.join('; '));
    this.byName.set(m.name, m);
    this.fromFile.set(m.name, file);
    for (const l of this.listeners) l();
  }

  /** Called after every `add` (derived views such as the settings catalog rebuild). */
  onChange(f: () => void): void {
    this.listeners.push(f);
  }
}

/** A user after authentication: identity plus the resolved configuration, read once. */
export interface ResolvedUser {
  readonly user: UserRecord;
  readonly config: Effective;
}

/**
 * One authentication. `user` is text the session has checked (valid UTF-8, no CR/LF/NUL);
 * `password` is the bytes the client sent, never decoded: they go to the hash as they are.
 */
/**
 * What a client proves besides its name: the password's bytes (PLAIN, LOGIN), or a
 * challenge-response exchange (SCRAM) that the source deciding about the user runs against its
 * stored `{SCHEME}` hash — `stored` null when it has none to offer (the exchange then runs on a
 * fake record and fails). `prove` resolves true only when the client proved the password.
 * A bearer token (OAUTHBEARER, XOAUTH2) is checked by the chain itself (auth/oauth.ts), never
 * handed to a password source.
 */
export type Secret = PasswordSecret | BearerToken;
/** What a password source sees. */
export type PasswordSecret = Uint8Array | SecretExchange;
export interface BearerToken {
  readonly kind: 'bearer';
  readonly token: string;
}
export interface SecretExchange {
  readonly kind: 'exchange';
  /** the SASL mechanism, for log lines */
  readonly mechanism: string;
  prove(stored: string | null): Promise<boolean>;
}

export function isExchange(s: Secret): s is SecretExchange {
  return !(s instanceof Uint8Array) && s.kind === 'exchange';
}

export function isBearer(s: Secret): s is BearerToken {
  return !(s instanceof Uint8Array) && s.kind === 'bearer';
}

export interface AuthRequest {
  readonly user: string;
  readonly password: Secret;
  readonly service: 'imap' | 'pop3' | 'test';
  readonly rip?: string;
  /** epoch ms: a locked database is waited for until then, then tempfail (default: one busy timeout from now) */
  readonly deadline?: number;
}

export type AuthResult =
  /** `passthrough`: no local password was checked; the upstream server decides (auth/passthrough.ts) */
  | { ok: true; user: ResolvedUser; warnings: string[]; passthrough?: true }
  | { ok: false; why: 'bad-credentials' | 'unknown-user' | 'disabled' }
  | { ok: false; why: 'tempfail'; detail: string };

export interface AuthInstance {
  authenticate(req: AuthRequest): Promise<AuthResult>;
}

/** The slices of a frozen effective config (src/resolve.ts shares one per set of rows), by module. */
const slices = new WeakMap<Effective, Map<string, Readonly<Record<string, Json>>>>();

/**
 * A module's slice of the effective config: `{ key: value }` for `module.key`. The config
 * `resolve` made is frozen and shared by every user with the same rows: its slices are made
 * once (a walk over every key of the catalog) and handed out frozen; a config built by hand
 * (not frozen) gets a new slice each time.
 */
export function slice(cfg: Effective, module: string): Readonly<Record<string, Json>> {
  const frozen = Object.isFrozen(cfg);
  if (frozen) {
    const hit = slices.get(cfg)?.get(module);
    if (hit) return hit;
  }
  const out: Record<string, Json> = {};
  const prefix = `${module}.`;
  for (const [k, v] of Object.entries(cfg)) if (k.startsWith(prefix)) out[k.slice(prefix.length)] = v.value;
  if (!frozen) return out;
  Object.freeze(out);
  let m = slices.get(cfg);
  if (!m) {
    m = new Map();
    slices.set(cfg, m);
  }
  m.set(module, out);
  return out;
}
