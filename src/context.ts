/** The instance + database a command works on, opened once per CLI run. */
import { loadInstance, type Instance } from './instance.js';
import { openDb } from './db.js';
import { Store } from './store.js';

export interface Ctx {
  readonly instance: Instance;
  readonly store: Store;
}

export function openCtx(config: string | undefined): Ctx {
  const instance = loadInstance(config);
  const store = new Store(openDb(instance.dbPath), instance.dbPath);
  return { instance, store };
}
