/**
 * NAME        src/proxy/env — what every proxy session shares: instance, database, auth, TLS, logs,
 *             the link to the node state service (connection limits, failure penalties), the
 *             cluster's nodes and this process's backend instances
 * DESCRIPTION Built once per process (createProxyEnv), after the modules pigeon.yaml names
 *             (src/module-files.ts) are loaded. Backends are created on first use, with this
 *             instance's sections, and again after a reload changed the instance.
 */
import { randomBytes } from 'node:crypto';
import type { Instance } from '../instance.js';
import { loadInstance } from '../instance.js';
import type { Store } from '../store.js';
import { openInstanceStore } from '../context.js';
import { createLogger, syslogOrFileSink, type Logger } from '../log.js';
import { createAuth } from '../../auth/chain.js';
import { primePlaintextPolicy } from './login.js';
import type { AuthInstance } from '../modules.js';
import { resolveMailUser, type MailUser } from '../mailuser.js';
import { Penalty } from './penalty.js';
import { AnvilClient } from '../anvil/client.js';
import { NodeDirectory } from '../nodes.js';
import { loadClientTls, type ClientTls } from '../client-tls.js';
import { loadModules } from '../module-files.js';
import type { Backend, BackendInstance } from '../../backends/types.js';
import { backendConfig } from '../../backends/registry.js';
import { Spawner, logBackendLine } from './spawner.js';

export interface ProxyEnv {
  instance: Instance;
  readonly store: Store;
  log: Logger;
  /** the auth chain (auth.*); a SIGHUP reload replaces it */
  auth: AuthInstance;
  /** what clients see on STARTTLS/STLS and imaps/pop3s (tls.cert/tls.key, tls.sni) */
  tls: ClientTls | null;
  /** the mail user backends run as (mail_user); a SIGHUP reload replaces it */
  mailUser: MailUser;
  /** auth failure delay per client address, node-wide: `await` each method */
  readonly penalty: Penalty;
  /** the node state service (src/anvil): connection slots, penalties; per process when unreachable */
  readonly anvil: AnvilClient;
  /** the cluster's nodes (cached; the daemon refreshes it) */
  readonly nodes: NodeDirectory;
  /** this process's instance of a backend (created on first use, with the current instance's settings) */
  backend(b: Backend): BackendInstance;
  /** `pigeon serve` workers: the spawner process that starts handed-off backends (src/proxy/spawner.ts) */
  readonly spawner?: Spawner;
}

export async function createProxyEnv(configPath: string | undefined, opts: { logToStderr: boolean; role: string; daemon?: boolean }): Promise<ProxyEnv> {
  const instance = loadInstance(configPath);
  await loadModules(instance);
  let log: Logger;
  if (instance.logFile !== null || opts.logToStderr) log = createLogger({ level: instance.config.log.level, file: instance.logFile });
  else log = createLogger({ level: instance.config.log.level, sink: syslogOrFileSink(instance.config.log.syslog_socket, instance.logFallback) });
  // a database server's state changes (down, back) are logged once each, through the current logger
  let current: ProxyEnv | null = null;
  const store = await openInstanceStore(instance, { log: (level, m) => (current?.log ?? log).log(level, 'database', m) });
  let auth: AuthInstance;
  try {
    auth = await createAuth(instance.config.auth, store, instance.dir, instance.config.oauth);
  } catch (e) {
    await store.close();
    throw e;
  }
  const anvil = new AnvilClient({
    runDir: instance.runDir,
    role: opts.role,
    autostart: true,
    logFile: instance.logFile,
    log: (level, msg) => env.log.log(level, 'anvil', msg),
  });
  const nodes = new NodeDirectory(store);
  const backends = new WeakMap<Instance, Map<string, BackendInstance>>();
  // the backends' log lines come through the spawner's stderr, each under its own prefix
  const spawner = opts.daemon === true ? new Spawner((level, m) => env.log.log(level, 'spawner', m), (line) => logBackendLine(env.log, line)) : undefined;
  const env: ProxyEnv = {
    instance,
    store,
    log,
    auth,
    tls: loadClientTls(instance.tls),
    mailUser: resolveMailUser(instance.config.mail_user),
    penalty: new Penalty(anvil, () => env.instance.config.limits),
    anvil,
    nodes,
    ...(spawner ? { spawner } : {}),
    backend(b) {
      let m = backends.get(env.instance);
      if (!m) backends.set(env.instance, (m = new Map()));
      let i = m.get(b.name);
      if (!i) {
        i = b.create(backendConfig(b, env.instance.raw), { instance: env.instance, store, nodes, mailUser: env.mailUser, daemon: opts.daemon === true, ...(spawner ? { spawner } : {}) });
        m.set(b.name, i);
      }
      return i;
    },
  };
  current = env;
  spawner?.warm();
  await primePlaintextPolicy(env);
  return env;
}

// session ids are cut from a pool of random bytes, refilled 256 ids at a time: one call into
// OpenSSL's generator per connection is 3.4 µs in a warm loop (0.2 µs from the pool) and stood
// out in a CPU profile of a serve worker on the way from accept to the greeting (≈ 25 µs there)
const ID_BYTES = 12;
const ID_POOL = ID_BYTES * 256;
let idPool = Buffer.alloc(0);
let idAt = ID_POOL;

/** Dovecot-style session id: 12 random bytes, base64 (16 characters). */
export function sessionId(): string {
  if (idAt + ID_BYTES > idPool.length) {
    idPool = randomBytes(ID_POOL);
    idAt = 0;
  }
  const id = idPool.toString('base64', idAt, idAt + ID_BYTES);
  idAt += ID_BYTES;
  return id;
}
