/**
 * SIGINT, SIGTERM and SIGHUP end the command through process.exit(), so the
 * thread's exit hooks run (src/sys/thread.ts: every open ModelLab closes its
 * sessions and host and removes its kvmi.sock directory) -- Node's default for
 * these signals is to die at once, leaving the directory behind. The exit code
 * is the shell's convention for death by that signal: 128 + its number.
 */
import { constants } from 'node:os';

export const EXIT_SIGNALS = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;

export function exitOnSignals(): void {
  for (const sig of EXIT_SIGNALS) {
    process.once(sig, () => process.exit(128 + constants.signals[sig]));
  }
}
