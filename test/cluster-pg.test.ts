// test/cases/cluster.ts on a private PostgreSQL server (test/helpers/postgres.ts): the nodes
// share nothing but the database, as separate machines would.
import t from 'tap';
import cases from './cases/cluster.js';

// tap's per-file timeout: as test/cluster.test.ts (76 s alone) plus a server's start, and two
// suites at once on 2 cores make a file take 2-3 times as long
t.setTimeout(480_000);

cases('postgres');
