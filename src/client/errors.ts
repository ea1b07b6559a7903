import { KvmmemError } from '../errors.js';

/** A MappedPage/MappedRange used after unmap(), close() or its VM's unhook. */
export class UseAfterUnmapError extends KvmmemError {
  constructor(what: string, why: 'unmapped' | 'session closed' | 'vm unhooked') {
    super(`${what} was ${why === 'unmapped' ? 'unmapped' : why === 'session closed' ? 'torn down when its session closed' : 'revoked when its VM was unhooked'}`, {
      code: 'USE_AFTER_UNMAP',
      hint: 'map the guest page again (session.map / session.mapRange) instead of keeping references to old pages',
    });
  }
}

/** Retries of a transient MAP failure (EAGAIN/EBUSY) ran out. */
export class RetryExhaustedError extends KvmmemError {
  constructor(code: string, errno: number, tries: number, ms: number, cause: unknown) {
    super(`KVM_INTRO_MEM_MAP: still ${code} after ${tries} tries over ${ms} ms`, {
      code, errno, syscall: 'KVM_INTRO_MEM_MAP', cause,
      hint: 'the host stayed busy: raise the session\'s retry options ({ retries, deadlineMs }) or try again later',
    });
  }
}

const mib = (n: number): string => n === Infinity ? 'unlimited' : n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MiB` : `${Math.ceil(n / 1024)} KiB`;

/** Local pages could not be locked within RLIMIT_MEMLOCK, even after giving back every cached page. */
export class LockedMemoryError extends KvmmemError {
  constructor(wanted: number, locked: number, limit: number, quarantined: number, cause: unknown) {
    super(`mlock: cannot lock ${mib(wanted)} more of local pages (kvmmem holds ${mib(locked)} locked, ${mib(quarantined)} of it behind stale views; RLIMIT_MEMLOCK ${mib(limit)})`, {
      code: 'ENOMEM', errno: -12, syscall: 'mlock', cause,
      hint: 'unmap pages you no longer need or map fewer at once, drop references to Buffers of unmapped pages so they can be collected, or raise the limit (ulimit -l, systemd LimitMEMLOCK=, or CAP_IPC_LOCK)',
    });
  }
}
