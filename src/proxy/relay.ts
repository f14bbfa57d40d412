/**
 * NAME        src/proxy/relay — after login: join the client with its backend session until both end
 * DESCRIPTION One relay for every backend (backends/types.ts BackendSession): a local Dovecot or
 *             Courier child, the peer link to the node that holds the mailbox, a backend loaded
 *             from a file. The backend's first words go out, the bytes the client already sent
 *             go in, then src/proxy/splice.ts joins the two both ways (backpressure both ways, one
 *             watcher per stream). When the client stops sending the backend is told
 *             (clientEnded: EOF, then it is made to go); when the backend's last bytes reached
 *             the client, the client connection is closed. Done when the backend is gone and its
 *             last words reached the client (or cannot any more); a backend that is gone but
 *             whose output stays open is given RELAY_GRACE_MS.
 *             A handed-off session (the backend owns the client socket) is not relayed: the
 *             router supervises it (src/proxy/router.ts superviseHandedOff).
 * SECURITY    Bytes are passed as they are; nothing is parsed or logged.
 */
import type { Writable } from 'node:stream';
import type { BackendEnd, BackendSession } from '../../backends/types.js';
import type { ClientConn } from './conn.js';
import { splice } from './splice.js';
import { RELAY_GRACE_MS } from '../limits.js';

export interface Relayed {
  /** client → backend bytes, -1 when handed off */
  readonly in: number;
  /** backend → client bytes, -1 when handed off */
  readonly out: number;
  readonly end: BackendEnd;
}

/** Relay until both sides are done. `leftover`: what the client sent after its login command. */
export function relay(conn: ClientConn, s: BackendSession, leftover: Buffer): Promise<Relayed> {
  const { stream, pending } = conn.detach();
  return new Promise((resolve) => {
    let end: BackendEnd | null = null;
    let answered = false;
    let finished = false;
    let early = 0;
    const finish = (): void => {
      if (finished) return;
      finished = true;
      stream.destroy();
      resolve({ in: early + counts.bytesIn, out: counts.bytesOut, end: end ?? { exit: null } });
    };
    // done when the backend is gone and its last words reached the client (or cannot any more)
    const settle = (): void => {
      if (end !== null && (answered || stream.destroyed || stream.writableFinished)) finish();
    };
    stream.write(s.greeting);
    for (const p of [leftover, ...pending]) {
      if (p.length === 0) continue;
      early += p.length;
      s.input.write(p);
    }
    const counts = splice(
      { client: { input: stream, output: stream as Writable }, backend: { input: s.input, output: s.output } },
      {
        clientEnded: () => {
          s.clientEnded();
          settle();
        },
        // the backend said its last word and the client's socket has it: close our side
        backendEnded: () => {
          answered = true;
          stream.destroy();
          settle();
        },
      },
    );
    void s.ended.then((e) => {
      end = e;
      settle();
      // its output normally ends with it (backendEnded); if something else holds it open, do not wait for ever
      if (!finished) setTimeout(finish, RELAY_GRACE_MS).unref();
    });
  });
}
