// test/cases/cluster-admin.ts on a private PostgreSQL server (test/helpers/postgres.ts): the
// admin commands, the joining node and what the shared database holds, as on SQLite.
import t from 'tap';
import cases from './cases/cluster-admin.js';

// tap's per-file timeout: as test/cluster-admin.test.ts plus a server's start
t.setTimeout(360_000);

cases('postgres');
