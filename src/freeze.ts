/**
 * NAME        src/freeze — deep freezing of values that are shared between callers
 * DESCRIPTION `deepFreeze` freezes a value and everything it holds (an object already frozen is
 *             taken as frozen through). Used where one object is handed to many callers and none
 *             may change what another reads: the resolved configuration (src/resolve.ts) and the
 *             SQLite store's kept lookups (src/store/sqlite.ts).
 */

/** `v`, frozen with everything it holds. */
export function deepFreeze<T>(v: T): T {
  if (v !== null && typeof v === 'object' && !Object.isFrozen(v)) {
    for (const x of Object.values(v)) deepFreeze(x);
    Object.freeze(v);
  }
  return v;
}
