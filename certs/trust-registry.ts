/**
 * NAME        certs/trust-registry — trust module `registry` (the default): the node registry decides
 * DESCRIPTION Trusted: a node registered in the shared database, enabled, whose current (or announced
 *             next) certificate fingerprint is the one presented, and whose certificate was not
 *             revoked by `pigeon node remove`. Reads the process's cached NodeDirectory (refreshed
 *             every second by the daemon), so a link costs no database read.
 */
import type { PeerTrust } from './trust.js';

export const registryTrust = {
  kind: 'trust',
  name: 'registry',
  summary: 'registered, enabled node with this certificate fingerprint (default)',
  check: (nodes, claim) => nodes.check(claim.name, claim.fingerprint),
} satisfies PeerTrust;
