/**
 * NAME        src/plain-object — the one test the hand checks of wire messages start with
 * DESCRIPTION A JSON object (not null, not an array), as the node state service's requests and
 *             replies (src/anvil/protocol.ts) and the peer hand-off (src/peer/protocol.ts) are
 *             checked by hand on their hot paths before their zod schemas decide the rest.
 */
export function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}
