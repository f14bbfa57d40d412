/**
 * NAME        src/address — normalise and validate mail addresses and domain names
 * DESCRIPTION Domains are stored lower-case, IDN as punycode (A-labels); the local part keeps its
 *             case-insensitivity rule of thumb used by Dovecot/Postfix lookups: lower-cased.
 *             Refuses CR, LF, NUL, spaces, quotes and anything an IMAP/POP3 login or a file name
 *             could be abused with.
 */
import { domainToASCII } from 'node:url';
import { AppError } from './errors.js';

const LABEL = /^(?!-)[a-z0-9-]{1,63}(?<!-)$/;
const LOCAL = /^[a-z0-9!#$%&'*+\-/=?^_`{|}~.]{1,64}$/;

export function normaliseDomain(input: string): string {
  const raw = input.trim().replace(/\.$/, '');
  if (raw === '' || /[\s\0@/\\]/.test(raw)) {
    throw new AppError('INVALID_DOMAIN', `invalid domain name: ${JSON.stringify(input)}`);
  }
  const ascii = domainToASCII(raw.toLowerCase());
  if (ascii === '' || ascii.length > 253) {
    throw new AppError('INVALID_DOMAIN', `invalid domain name: ${JSON.stringify(input)}`);
  }
  const labels = ascii.split('.');
  if (labels.length < 2 || !labels.every((l) => LABEL.test(l))) {
    throw new AppError('INVALID_DOMAIN', `invalid domain name: ${JSON.stringify(input)} (needs at least two labels of letters, digits and hyphens)`);
  }
  return ascii;
}

export interface Address {
  readonly local: string;
  readonly domain: string;
  readonly address: string;
}

export function normaliseAddress(input: string): Address {
  const at = input.lastIndexOf('@');
  if (at <= 0 || at === input.length - 1) {
    throw new AppError('INVALID_ADDRESS', `invalid address: ${JSON.stringify(input)} (expected local@domain)`);
  }
  const local = input.slice(0, at).toLowerCase();
  if (!LOCAL.test(local) || local.startsWith('.') || local.endsWith('.') || local.includes('..')) {
    throw new AppError('INVALID_ADDRESS', `invalid address: ${JSON.stringify(input)} (bad local part)`);
  }
  let domain: string;
  try {
    domain = normaliseDomain(input.slice(at + 1));
  } catch {
    throw new AppError('INVALID_ADDRESS', `invalid address: ${JSON.stringify(input)} (bad domain)`);
  }
  return { local, domain, address: `${local}@${domain}` };
}

/** Split `user+detail@domain` (Postfix recipient_delimiter '+'): the detail selects a folder. */
export function splitDetail(a: Address, delimiter = '+'): { base: Address; detail: string | null } {
  const i = delimiter === '' ? -1 : a.local.indexOf(delimiter);
  if (i <= 0) return { base: a, detail: null };
  const local = a.local.slice(0, i);
  return { base: { local, domain: a.domain, address: `${local}@${a.domain}` }, detail: a.local.slice(i + 1) || null };
}
