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
 *             an external service): write certs/trust-NAME.ts exporting a PeerTrust and add it to
 *             TRUST below, or keep the file elsewhere and name it in pigeon.yaml
 *             `modules.trust` (src/module-files.ts).
 */
import type { X509Certificate } from 'node:crypto';
import type { NodeDirectory, PeerCheck } from '../src/nodes.js';
import { Registry, type ModuleBase } from '../src/modules.js';
import { AppError } from '../src/errors.js';
import { registryTrust } from './trust-registry.js';

export interface PeerClaim {
  /** the node name the certificate carries (subject CN) */
  readonly name: string;
  /** SHA-256 fingerprint of the certificate, AA:BB:… */
  readonly fingerprint: string;
  readonly certificate: X509Certificate;
}

export interface PeerTrust extends ModuleBase<'trust'> {
  check(nodes: NodeDirectory, claim: PeerClaim): Promise<PeerCheck>;
}

export const TRUST = new Registry<PeerTrust>('trust', [registryTrust], (t) => (typeof t.check !== 'function' ? ['no check()'] : []));

export function trustModule(name: string): PeerTrust {
  const t = TRUST.get(name);
  if (!t) throw new AppError('CONFIG_INVALID', `peer.trust: unknown trust module ${JSON.stringify(name)}; known: ${TRUST.names().join(', ')}`);
  return t;
}
