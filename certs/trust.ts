/**
 * NAME        certs/trust — how a node decides to trust the node at the other end of a peer link
 * DESCRIPTION A trust module is one file exporting a `PeerTrust`, registered by name here and chosen
 *             with `peer.trust` in pigeon.yaml. It runs after node:tls has verified the certificate
 *             chain against the cluster CA and its dates, on both ends of every link (the listener
 *             checks the connecting node, the connecting node checks the one it reached), and
 *             returns the registry row of the node it trusts or a refusal with a reason (logged).
 *             Built in: `registry` (certs/trust-registry.ts): the certificate must belong to a
 *             registered, enabled node with that fingerprint and not be revoked.
 *             To add one (say, trust only certificates whose SAN carries a given DNS suffix, or ask
 *             an external service): write certs/trust-NAME.ts exporting a PeerTrust, add it to
 *             TRUST below; the settings it needs go in its own file-config section.
 */
import type { X509Certificate } from 'node:crypto';
import type { NodeDirectory, PeerCheck } from '../src/nodes.js';
import { registryTrust } from './trust-registry.js';

export interface PeerClaim {
  /** the node name the certificate carries (subject CN) */
  readonly name: string;
  /** SHA-256 fingerprint of the certificate, AA:BB:… */
  readonly fingerprint: string;
  readonly certificate: X509Certificate;
}

export interface PeerTrust {
  readonly kind: 'trust';
  readonly name: string;
  readonly summary: string;
  check(nodes: NodeDirectory, claim: PeerClaim): Promise<PeerCheck>;
}

export const TRUST: ReadonlyMap<string, PeerTrust> = new Map([[registryTrust.name, registryTrust]]);

export function trustModule(name: string): PeerTrust {
  const t = TRUST.get(name);
  if (!t) throw new Error(`unknown peer.trust module ${JSON.stringify(name)}; known: ${[...TRUST.keys()].join(', ')}`);
  return t;
}
