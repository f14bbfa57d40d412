// test/cases/proxy-imap.ts with the Courier backend.
import cases from './cases/proxy-imap.js';

cases('courier');
