/**
 * NAME        src/drain — wait until a stream can take more, or is gone
 * SYNOPSIS    if (!sock.write(b)) await drained(sock);
 * DESCRIPTION Resolves on the stream's next 'drain' or 'close', whichever comes first, and
 *             removes both listeners then (a stream that closes never drains: without the
 *             'close' a writer would wait for ever). Node built-ins only, so the `pigeon deliver`
 *             hand-off may load it before anything else.
 * SEE ALSO    src/delivery/handoff-client.ts, src/delivery/clamd.ts
 */
import type { Writable } from 'node:stream';

export function drained(stream: Writable): Promise<void> {
  return new Promise((resolve) => {
    const go = (): void => {
      stream.off('drain', go);
      stream.off('close', go);
      resolve();
    };
    stream.on('drain', go);
    stream.on('close', go);
  });
}
