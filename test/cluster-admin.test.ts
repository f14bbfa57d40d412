// test/cases/cluster-admin.ts on one SQLite file the nodes share.
import t from 'tap';
import cases from './cases/cluster-admin.js';

// tap's per-file timeout for this file: it ran 60 s alone on a lightly loaded machine, and two
// suites at once on 2 cores make a file take 2-3 times as long (the default is 180 s, .taprc)
t.setTimeout(300_000);

cases('sqlite');
