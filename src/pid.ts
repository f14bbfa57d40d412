/**
 * NAME        src/pid — whether a process exists
 * DESCRIPTION `pidAlive(pid)` asks the kernel with signal 0: the process exists when the signal
 *             could be sent, or when it could not only for lack of permission (EPERM: it runs
 *             under another user). Used wherever a lock or record names the pid that holds it.
 * SECURITY    Signal 0 is only a check: nothing is delivered.
 */

/** Whether process `pid` exists (EPERM: it does, under another user). */
export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}
