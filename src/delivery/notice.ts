/**
 * NAME        src/delivery/notice — informational events from inside an MDA module
 * DESCRIPTION An MDA module runs in the mail writer and has no logger; what an admin should see
 *             (an mbox delivery waiting for a lock Dovecot holds) goes through `notice`. The
 *             delivery environment (src/delivery/env.ts) sends notices to the log; inside the
 *             writer child they travel to the parent first (src/writer/writer-main.ts).
 */
export type NoticeFields = Record<string, string | number>;
export type NoticeSink = (msg: string, fields: NoticeFields) => void;

let sink: NoticeSink | null = null;

export function onNotice(f: NoticeSink): void {
  sink = f;
}

export function notice(msg: string, fields: NoticeFields): void {
  sink?.(msg, fields);
}
