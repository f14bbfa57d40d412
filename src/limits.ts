/**
 * NAME        src/limits — every protocol limit, in one place (LIMITS.md)
 * DESCRIPTION A violation sends one final reply (`* BYE`, `-ERR`) and closes the connection.
 *             Values an admin may tune are also in pigeon.yaml `limits:` (line length, failure
 *             delay and its cap, pre-auth timeout, connection limits); these are the defaults
 *             and the hard caps.
 */
export const IMAP_MAX_LINE = 8192; // pre-auth command incl. CRLFs and inline literals
export const IMAP_MAX_NONSYNC_LITERAL = 4096; // LITERAL- (RFC 7888)
export const IMAP_MAX_TAG = 126;
export const IMAP_MAX_NESTING = 1; // `(` depth before login
export const MAX_BAD_COMMANDS = 3;
export const MAX_AUTH_FAILURES = 3;
export const MAX_PREAUTH_COMMANDS = 50;
export const POP3_MAX_LINE = 255; // incl. CRLF (RFC 2449)
export const SASL_MAX_LINE = 8192; // one SASL response line incl. CRLF
export const ID_MAX_PAIRS = 30;
export const ID_MAX_FIELD = 30;
export const ID_MAX_VALUE = 1024;
export const PROXY_V1_MAX = 107; // a PROXY v1 line incl. CRLF (the spec's maximum)
export const PROXY_V2_MAX = 1500; // a PROXY v2 header incl. its TLVs (HAProxy's own bound: one packet)
export const PREAUTH_IDLE_MS = 60_000;
export const PREAUTH_ABSOLUTE_MS = 180_000;
export const BACKEND_START_MS = 30_000;
export const AUTH_FAILURE_DELAY_MS = 2_000;
export const AUTH_PENALTY_MAX_MS = 15_000; // default of limits.auth_failure_delay_max_ms
export const AUTH_PENALTY_RESET_MS = 29_000; // a client key's failures are forgotten this long after the last one
// node-wide (src/anvil), defaults of limits.preauth_per_ip, .max_connections, .max_userip_connections:
// a webmail server's 100 concurrent logins from one address fit twice; one address never takes
// more than a fifth of the node
export const PREAUTH_CONNS_PER_IP = 200;
export const MAX_CONNECTIONS = 1_000;
export const MAX_USERIP_CONNECTIONS = 10; // Dovecot's mail_max_userip_connections
// the node state service (src/anvil)
export const ANVIL_MAX_LINE = 65_536; // one request or reply
export const ANVIL_REQUEST_MS = 5_000; // no answer: the service counts as unreachable (generous: an overloaded host is not an outage)
export const METRICS_WORKER_MS = 2_000; // a scrape of serve --workers N leaves out a worker that has not answered within this (src/metrics.ts)
export const ANVIL_START_MS = 5_000; // an auto-started service must be ready within this
export const ANVIL_RETRY_MS = 5_000; // after a failure, per-process state this long before retrying
export const ANVIL_IDLE_MS = 30_000; // an auto-started service exits after this long with no client and no live penalty
export const ANVIL_CHECK_MS = 2_000; // how often the service checks that its socket is still its own
// delivery
export const LMTP_IDLE_MS = 300_000; // an LMTP session that sends nothing for this long is closed (421)
export const DELIVER_HANDOFF_MAX_HEADER = 1024 * 1024; // `pigeon deliver` → serve hand-off: the request line (argv is smaller than this)
export const DELIVER_HANDOFF_MAX_FRAME = 1024 * 1024; // … and one frame of the message (deliver sends at most 64 KiB)
export const MBOX_STALE_LOCK_MS = 300_000; // an mbox dotlock older than this belongs to a dead process and is removed
export const MAX_MESSAGE_SIZE = 64 * 1024 * 1024; // default of mailstore.max_size: larger is 552 5.3.4
export const ALLOCATION_LOCK_WAIT_MS = 20_000; // creator `lock`: how long a first login or mail waits for another allocator
// backends and the relay
export const RELAY_GRACE_MS = 2_000; // a backend whose client left gets this long to go, then SIGTERM / the link is cut
export const HANDOFF_MAX_INPUT = 16 * 1024; // bytes pipelined after the login that still allow a hand-off of the socket
export const HANDOFF_MAX_REPLAY = 64 * 1024; // most bytes a hand-off replays to Dovecot (CLIENT_INPUT is one environment string)
export const BACKEND_MAX_LINE = 65_536; // a backend's greeting or capability line
export const BACKEND_PROBE_MS = 10_000; // `pigeon config test`: a backend binary must finish its probe within this
// the peer link (delivery and mailbox moves)
export const PEER_STORE_ANSWER_MS = 300_000; // the home node must confirm a delivery within this once it has the message
export const MOVE_STALL_MS = 60_000; // a mailbox copy in which no byte moves for this long is abandoned
export const MOVE_ANSWER_MS = 300_000; // the receiving node confirms a copied mailbox within this
export const MOVE_OUT_MS = 600_000; // the node that holds a mailbox must have sent it (move-out) within this
export const MOVE_LINE_MAX = 8192; // one file header line of a mailbox copy
// defaults of pigeon.yaml settings that are not in `limits:`
export const CLAMD_ADDRESS = '/var/run/clamav/clamd.ctl'; // clamd.address: Debian's clamd LocalSocket
export const CLAMD_TIMEOUT_S = 30; // clamd.timeout_s: one scan (connect, send, answer), then antivirus.on_error
export const MDA_LOCK_WAIT_MS = 20_000; // limits.mda_lock_wait_s: an mbox delivery waits this long for the locks, then 4.2.0
export const TLS_HANDSHAKE_MS = 15_000; // limits.tls_handshake_timeout_s
export const PROXY_HEADER_MS = 3_000; // limits.proxy_header_timeout_s: a `,proxy` listener's PROXY header must arrive within this
export const PEER_HANDOFF_MS = 10_000; // peer.handoff_timeout_s: a peer must send its whole hand-off within this
export const PEER_CONNECT_MS = 10_000; // peer.connect_timeout_s
export const PEER_POOL_SIZE = 4; // peer.pool_size: verified spare links kept per other node, per process (0: none)
export const PEER_RESUME_S = 300; // peer.resume_s: a link may resume the TLS session of an earlier full handshake to the same node this long (0: never)
export const PEER_POOL_IDLE_MS = 5_000; // peer.pool_idle_s: a spare unused this long is closed (at most half of peer.handoff_timeout_s)
export const PEER_TLS_HANDSHAKE_MS = 15_000; // a node connecting to the peer listener must finish its TLS handshake within this
export const PAIR_SNDBUF = 1024 * 1024; // each end of a session's local socket pair to its backend asks for this send buffer (src/peer/pair.ts; Linux keeps twice it, within net.core.wmem_max)
// a database server (PostgreSQL), per process, defaults of pigeon.yaml database_pool_size,
// database_connect_timeout_s (per host of the URL) and database_statement_timeout_s
export const PG_POOL_SIZE = 4;
export const PG_CONNECT_TIMEOUT_S = 5;
export const PG_STATEMENT_TIMEOUT_S = 5;
// database_listen_check_s: the LISTEN connection (change notifications) is checked this often
export const PG_LISTEN_CHECK_S = 30;
