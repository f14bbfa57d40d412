/**
 * NAME        src/peer/context — what a process needs to open peer links (kept light: no TLS code)
 * DESCRIPTION This node's name, the cached node registry and, on first use, its node certificate
 *             and key (peer.cert/peer.key: from the cluster CA, used for peer links only — clients
 *             see tls.cert/tls.key) and the cluster CA (tls.ca), checked by certs/verify.ts.
 *             `pigeon deliver` builds one per message without paying for it unless a recipient
 *             lives on another node.
 */
import { createSecureContext, type SecureContext } from 'node:tls';
import type { Instance } from '../instance.js';
import type { Store } from '../store.js';
import { NodeDirectory } from '../nodes.js';
import { loadNodeCredentials, type NodeCredentials } from '../../certs/verify.js';
import { trustModule, type PeerTrust } from '../../certs/trust.js';

export interface PeerContext {
  readonly node: string;
  readonly nodes: NodeDirectory;
  readonly connectTimeoutMs: number;
  readonly handoffTimeoutMs: number;
  /** peer.pool_size: spare links kept per other node (0: none) */
  readonly poolSize: number;
  /** how long a spare may wait unused: peer.pool_idle_s, at most half of handoff_timeout (the receiving node's idle limit) */
  readonly poolIdleMs: number;
  /** peer.resume_s in ms: a link resumes the TLS session of an earlier full handshake to the same node within this (0: never) */
  readonly resumeMs: number;
  /** the trust module of peer.trust */
  readonly trust: PeerTrust;
  /** this node's certificate, key and the cluster CA (read and checked on first use) */
  credentials(): NodeCredentials;
  /** keep spare, already verified links to the nodes in use (the daemon; not one-shot processes) */
  prewarm: boolean;
  /** the client side TLS context built from them once (parsing keys per link costs ~1.5 ms) */
  clientContext(): SecureContext;
}

export function createPeerContext(instance: Instance, store: Store, nodes?: NodeDirectory): PeerContext {
  let creds: NodeCredentials | null = null;
  let context: SecureContext | null = null;
  return {
    prewarm: false,
    node: instance.config.node,
    nodes: nodes ?? new NodeDirectory(store),
    connectTimeoutMs: instance.config.peer.connect_timeout_s * 1000,
    handoffTimeoutMs: instance.config.peer.handoff_timeout_s * 1000,
    poolSize: instance.config.peer.pool_size,
    poolIdleMs: Math.max(500, Math.min(instance.config.peer.pool_idle_s * 1000, (instance.config.peer.handoff_timeout_s * 1000) / 2)),
    resumeMs: instance.config.peer.resume_s * 1000,
    trust: trustModule(instance.config.peer.trust),
    credentials(): NodeCredentials {
      creds ??= loadNodeCredentials(instance.peerTls, instance.config.node);
      return creds;
    },
    clientContext(): SecureContext {
      if (!context) {
        const c = this.credentials();
        context = createSecureContext({ ca: c.ca, cert: c.cert, key: c.key, minVersion: 'TLSv1.3', maxVersion: 'TLSv1.3' });
      }
      return context;
    },
  };
}

