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
