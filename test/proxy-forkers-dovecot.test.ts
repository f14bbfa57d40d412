// test/cases/proxy-forkers.ts with the Dovecot backend.
import cases from './cases/proxy-forkers.js';

cases('dovecot');
