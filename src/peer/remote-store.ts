/**
 * NAME        src/peer/remote-store — how a delivery reaches a recipient homed on another node
 * DESCRIPTION The RemoteStore (src/delivery/types.ts) a delivery process is given: on the first
 *             recipient that lives elsewhere it loads the peer link (src/peer/deliver.ts) and
 *             builds this process's peer context (credentials read and checked then); a delivery
 *             whose recipients are all local never loads or builds either.
 */
import type { Instance } from '../instance.js';
import type { Store } from '../store.js';
import type { NodeDirectory } from '../nodes.js';
import type { RemoteStore } from '../delivery/types.js';
import type { PeerContext } from './context.js';

export function remoteStore(instance: Instance, store: Store, nodes: NodeDirectory, shared?: PeerContext): RemoteStore {
  let ready: Promise<RemoteStore> | null = null;
  return async (node, req) => {
    ready ??= Promise.all([import('./deliver.js'), import('./context.js')]).then(([d, c]) => {
      const ctx = shared ?? c.createPeerContext(instance, store, nodes);
      return (n, r) => d.deliverViaPeer(ctx, n, r);
    });
    return (await ready)(node, req);
  };
}
