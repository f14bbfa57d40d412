// test/cases/proxy-imap.ts with the Dovecot backend.
import cases from './cases/proxy-imap.js';

cases('dovecot');
