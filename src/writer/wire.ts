/**
 * NAME        src/writer/wire — the messages between pigeon and its mail writer child
 * DESCRIPTION parent → child: `call` (an operation of src/writer/local-writer.ts by name, its
 *             arguments, for operations with a body its first chunk, and `solo`: the parent's
 *             requests have not overlapped for a while, see SOLO_MS), `data` (the next chunk,
 *             sent only after the child's `pull`; `end` after the last one; `error` when the
 *             parent could not read the body). child → parent: `pull`, `done` with the value,
 *             `fail` with an error code and message, `fault` (a PIGEON_FAULT step was reached),
 *             `notice` (src/delivery/notice.ts, for the parent's log).
 *             Plain data only; Buffers pass as bytes with `serialization: 'advanced'`.
 */
export interface WireError {
  readonly code: string;
  readonly message: string;
}

export type ParentMessage =
  | {
      readonly t: 'call';
      readonly id: number;
      readonly op: string;
      readonly args: unknown[];
      readonly data?: Uint8Array | null;
      readonly end?: boolean;
      /** the parent has sent no request while another was open for a while: nothing else is coming */
      readonly solo?: boolean;
    }
  | { readonly t: 'data'; readonly id: number; readonly data: Uint8Array | null; readonly end: boolean; readonly error?: string };

export type ChildMessage =
  | { readonly t: 'pull'; readonly id: number }
  | { readonly t: 'done'; readonly id: number; readonly value: unknown }
  | { readonly t: 'fail'; readonly id: number; readonly error: WireError }
  | { readonly t: 'fault'; readonly step: string }
  | { readonly t: 'notice'; readonly msg: string; readonly fields: Record<string, string | number> };

/**
 * A request is `solo` when the parent has sent none while another was still open for this long:
 * the child may then block on its fsyncs (src/writer/safe-fs.ts syncInPlaceWhen). One connection
 * delivering one message after another is solo; several at once are not, and their syncs stay on
 * the thread pool, in parallel, however slow the disk.
 */
export const SOLO_MS = 5000;

/** Largest body chunk on the channel. */
export const CHUNK = 256 * 1024;

/** Regroup a body into chunks of about CHUNK bytes (fewer round trips for many small pieces); each chunk is a copy. */
export async function* toChunks(body: AsyncIterable<Buffer>): AsyncGenerator<Buffer> {
  let parts: Buffer[] = [];
  let len = 0;
  for await (const b of body) {
    if (b.length === 0) continue;
    parts.push(b);
    len += b.length;
    if (len >= CHUNK) {
      yield Buffer.concat(parts, len);
      parts = [];
      len = 0;
    }
  }
  if (len > 0) yield Buffer.concat(parts, len);
}

export const asBuffer = (u: Uint8Array): Buffer => Buffer.from(u.buffer, u.byteOffset, u.byteLength);
