// test/cases/proxy-hostile.ts with the Courier backend.
import cases from './cases/proxy-hostile.js';

cases('courier');
