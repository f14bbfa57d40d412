// test/cases/proxy-hostile.ts with the Dovecot backend.
import cases from './cases/proxy-hostile.js';

cases('dovecot');
