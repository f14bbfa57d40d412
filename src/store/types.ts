/**
 * NAME        src/store/types — the storage contract, under the name it was first given
 * DESCRIPTION The contract now lives in src/store.ts as `Store` (with `openStore`); this file keeps
 *             the first names (`ConfigStore`) for code written against them.
 */
export type {
  Store as ConfigStore,
  Store,
  StoreChange,
  SchemaStatus,
  ServerInfo,
  TableDump,
  Allocation,
  UserRecord,
  ScopeRef,
  NodeRow,
  NodeState,
  SelfRegistration,
  Flag,
  SettingRow,
  Json,
  OpenOptions,
} from '../store.js';
