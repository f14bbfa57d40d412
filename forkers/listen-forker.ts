/**
 * NAME        forkers/listen-forker — the `listen` forker's registry entry (no code of its own)
 * DESCRIPTION What forkers/registry.ts lists for `pigeon serve`'s daemon. It is kept apart from
 *             forkers/listen.ts so that every process that checks the registries (each
 *             `pigeon deliver`, `pigeon lmtp` and inetd session, through loadModules) does not
 *             load the daemon and what it imports (node:cluster, node:tls, node:crypto: ≈ 10 ms
 *             of CPU per process); src/commands/proxy.ts loads forkers/listen.ts when serve runs.
 * SEE ALSO    forkers/listen.ts, forkers/registry.ts
 */
import type { Forker } from './types.js';

/** The forker module; the daemon's code (forkers/listen.ts) is loaded only when `pigeon serve` runs. */
export default { kind: 'forker', name: 'listen', summary: 'standalone daemon: every listener of the config', stdioIsProtocol: false } satisfies Forker;
