/** The instance + database a command works on, opened once per CLI run. */
import { loadInstance, type Instance } from './instance.js';
import { openStore, type Store } from './store.js';

export interface Ctx {
  readonly instance: Instance;
  readonly store: Store;
}

export async function openCtx(config: string | undefined): Promise<Ctx> {
  const instance = loadInstance(config);
  const store = await openStore(instance.config.database, { baseDir: instance.dir });
  return { instance, store };
}
