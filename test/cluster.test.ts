// test/cases/cluster.ts on one SQLite file the three nodes share.
import t from 'tap';
import cases from './cases/cluster.js';

// tap's per-file timeout for this file: it ran 76 s alone on a lightly loaded machine, and two
// suites at once on 2 cores make a file take 2-3 times as long (the default is 180 s, .taprc)
t.setTimeout(420_000);

cases('sqlite');
