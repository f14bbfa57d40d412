// test/cases/proxy-forkers.ts with the Courier backend.
import cases from './cases/proxy-forkers.js';

cases('courier');
