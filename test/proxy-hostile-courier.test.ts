// test/cases/proxy-hostile.ts with the Courier backend.
import t from 'tap';
import cases from './cases/proxy-hostile.js';

// tap's per-file timeout for this file: it ran 37 s alone on a lightly loaded machine, and two
// suites at once on 2 cores make a file take 2-3 times as long (the default is 180 s, .taprc)
t.setTimeout(240_000);

cases('courier');
