/**
 * NAME        src/context — the instance and database a command works on
 * SYNOPSIS    const { instance, store } = await openCtx(cfg());      // admin commands
 *             const store = await openInstanceStore(instance, { log }); // serve, deliver, lmtp
 * DESCRIPTION Every process opens its database here, with the instance's node-local settings
 *             (database_password_file, database_pool_size, database_*_timeout_s). Admin commands
 *             also check the schema (src/store.ts checkSchema): older than this code can use or
 *             newer than it understands is refused (78) before any work.
 * SECURITY    The URL is read from pigeon.yaml, never from the command line of a long-running
 *             process; its password goes only to the database client.
 */
import { loadInstance, type Instance } from './instance.js';
import { openStore, checkSchema, type Store } from './store.js';

export interface Ctx {
  readonly instance: Instance;
  readonly store: Store;
}

export interface InstanceStoreOptions {
  /** refuse a schema outside what this code can run on (a database server; SQLite migrates on open) */
  readonly checkSchema?: boolean;
  /** one line per change of a database server's state */
  readonly log?: (level: 'info' | 'warn' | 'error', message: string) => void;
}

/** Open the instance's database with its node-local settings. */
export async function openInstanceStore(instance: Instance, o: InstanceStoreOptions = {}): Promise<Store> {
  const store = await openStore(instance.config.database, { baseDir: instance.dir, pg: { ...instance.dbOptions, ...(o.log ? { log: o.log } : {}) } });
  if (o.checkSchema === true && store.kind === 'postgres') {
    try {
      await checkSchema(store);
    } catch (e) {
      await store.close();
      throw e;
    }
  }
  return store;
}

export async function openCtx(config: string | undefined, o: InstanceStoreOptions = { checkSchema: true }): Promise<Ctx> {
  const instance = loadInstance(config);
  const store = await openInstanceStore(instance, o);
  return { instance, store };
}
