/**
 * NAME        src/proxy/splice — join a logged-in client with its backend, both ways
 * SYNOPSIS    splice({ client: { input, output }, backend: { input, output } }, { clientEnded, backendEnded })
 * DESCRIPTION Client → backend and backend → client with Readable.pipe(), so backpressure works
 *             both ways (a slow reader pauses the other side's socket or child), and one watcher
 *             per stream for the end of each direction. The relays of src/proxy/router.ts (local
 *             Dovecot/Courier child) and backends/peer.ts (peer link) both use it.
 *             Why not two stream.pipeline() calls: the client is one duplex socket, source of one
 *             pipeline and destination of the other, and each pipeline puts its own end-of-stream
 *             watchers on it (close, end, finish, error, three times over). With node:tls' own two
 *             that made 11 'close' listeners on every relayed TLS socket and a
 *             MaxListenersExceededWarning per session. Here a relayed socket carries at most five.
 *             Errors: every stream gets one error listener (a reset client or a dead link never
 *             throws); the direction it breaks ends like EOF, and the caller's clientEnded /
 *             backendEnded decides what to tear down.
 * SECURITY    Bytes are passed as they are; nothing is parsed or logged.
 */
import type { Readable, Writable } from 'node:stream';

export interface SpliceEnds {
  /** the client: what it sends (input) and where its replies go (output; may be the same socket) */
  readonly client: { readonly input: Readable; readonly output: Writable };
  /** the backend: where client bytes go (a child's stdin, a link) and what it answers */
  readonly backend: { readonly input: Writable; readonly output: Readable };
}

export interface SpliceEvents {
  /** the client stopped sending (EOF, reset, closed); called once */
  clientEnded(): void;
  /** the backend stopped answering and everything it said reached the client's socket; called once */
  backendEnded(): void;
}

export interface Splice {
  /** bytes from the client to the backend so far */
  readonly bytesIn: number;
  /** bytes from the backend to the client so far */
  readonly bytesOut: number;
}

const ignore = (): void => undefined;

/** Call `fn` once, on the first of `events`; the other listeners are removed then. */
function onFirst(e: NodeJS.EventEmitter, events: readonly string[], fn: () => void): void {
  const h = (): void => {
    for (const ev of events) e.off(ev, h);
    fn();
  };
  for (const ev of events) e.on(ev, h);
}

function isClosed(s: Readable | Writable): boolean {
  return s.destroyed || ('closed' in s && s.closed === true);
}

export function splice(ends: SpliceEnds, on: SpliceEvents): Splice {
  const { client, backend } = ends;
  const counts = { bytesIn: 0, bytesOut: 0 };
  for (const s of new Set<Readable | Writable>([client.input, client.output, backend.input, backend.output])) s.on('error', ignore);
  client.input.on('data', (c: Buffer) => {
    counts.bytesIn += c.length;
  });
  backend.output.on('data', (c: Buffer) => {
    counts.bytesOut += c.length;
  });
  client.input.pipe(backend.input);
  backend.output.pipe(client.output);

  if (isClosed(client.input) || client.input.readableEnded) queueMicrotask(on.clientEnded);
  else onFirst(client.input, ['end', 'close'], on.clientEnded);

  const outputDone = (): void => {
    // pipe() ends the client's output on the backend's EOF; after an error or a close it does not
    if (!client.output.writableEnded && !isClosed(client.output)) client.output.end();
    if (client.output.writableFinished || isClosed(client.output)) on.backendEnded();
    else onFirst(client.output, ['finish', 'close'], on.backendEnded);
  };
  if (isClosed(backend.output) || backend.output.readableEnded) queueMicrotask(outputDone);
  else onFirst(backend.output, ['end', 'close'], outputDone);
  return counts;
}
