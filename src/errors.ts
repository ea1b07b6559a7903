/**
 * One error hierarchy for the whole library, modelled on Node's SystemError:
 * `code` (a string to switch on), `errno` (negative, as the kernel returns it and
 * as Node reports it), `syscall` (what was being done) and a `hint` sentence
 * saying what to do about it. Leaf module: every layer may import it.
 */
import { errnoName, strerror } from './abi/errno.js';

export interface ErrorDetails {
  code: string;
  errno?: number;
  syscall?: string;
  path?: string;
  hint?: string;
  cause?: unknown;
}

export class KvmmemError extends Error {
  readonly code: string;
  readonly errno?: number;
  readonly syscall?: string;
  readonly path?: string;
  readonly hint?: string;
  /** The guest-physical address an operation failed at, when it failed at one (set by the session). */
  readonly gpa?: bigint;

  constructor(message: string, details: ErrorDetails) {
    super(details.hint ? `${message}: ${details.hint}` : message, details.cause === undefined ? undefined : { cause: details.cause });
    this.name = new.target.name;
    this.code = details.code;
    if (details.errno !== undefined) this.errno = details.errno;
    if (details.syscall !== undefined) this.syscall = details.syscall;
    if (details.path !== undefined) this.path = details.path;
    if (details.hint !== undefined) this.hint = details.hint;
  }
}

/** Builds the "syscall path: strerror (CODE)" head used by system-level errors. */
export function describeErrno(errno: number, syscall: string, path?: string): string {
  const n = Math.abs(errno);
  return `${syscall}${path === undefined ? '' : ` ${path}`}: ${strerror(n)} (${errnoName(n)})`;
}

/** A libc call failed (src/sys). */
export class SyscallError extends KvmmemError {
  constructor(errno: number, syscall: string, opts: { path?: string; hint?: string } = {}) {
    const n = Math.abs(errno);
    super(describeErrno(n, syscall, opts.path), { code: errnoName(n), errno: -n, syscall, ...opts });
  }
}

/** An ioctl on a kvmmem device (real or model) failed; hypercall errors arrive here too. */
export class DeviceError extends KvmmemError {
  constructor(errno: number, syscall: string, opts: { path?: string; hint?: string } = {}) {
    const n = Math.abs(errno);
    super(describeErrno(n, syscall, opts.path), { code: errnoName(n), errno: -n, syscall, ...opts });
  }
}

/** There is no /dev/kvmmem (or the path given does not exist). */
export class NoDeviceError extends KvmmemError {
  constructor(path: string) {
    super(`open ${path}: no such device node`, {
      code: 'ENOENT', errno: -2, syscall: 'open', path,
      hint: `no ${path}: not an introspector VM with the kvmmem driver loaded; use the built-in model instead (KvmMem.open({ model: host }) with a ModelHost from 'kvmmem/model', or \`kvmmem selftest --model\`)`,
    });
  }
}

/** The path opened fine but answers ENOTTY to KVM_INTRO_MEM_MAP/UNMAP. */
export class NotKvmmemDeviceError extends KvmmemError {
  constructor(path: string, syscall: string) {
    super(`${syscall} ${path}: Inappropriate ioctl for device (ENOTTY)`, {
      code: 'ENOTTY', errno: -25, syscall, path,
      hint: `${path} is not a kvmmem device; open /dev/kvmmem inside an introspector VM, or use the built-in model`,
    });
  }
}

/** Anything used after close(): never reaches the kernel with a stale fd. */
/** A /dev/kvmmem of libkvmi's remote mapping v2 (KVM_GUEST_MEM_*), not the v1 interface this library speaks. */
export class KvmmemV2DeviceError extends KvmmemError {
  constructor(path: string) {
    super(`${path} is a kvmmem device of libkvmi's remote mapping v2 (KVM_GUEST_MEM_OPEN/MAP/UNMAP)`, {
      code: 'ENOTTY', errno: -25, syscall: 'ioctl', path,
      hint: 'kvmmem speaks the v1 interface of the RFC v4 patches (KVM_INTRO_MEM_MAP/UNMAP per page); load that driver, or use libkvmi for v2',
    });
  }
}

export class ClosedError extends KvmmemError {
  constructor(what: string, syscall = 'ioctl') {
    super(`${syscall}: ${what} is closed`, {
      code: 'EBADF', errno: -9, syscall,
      hint: `open a new ${what.split(' ')[0]} instead of reusing a closed one`,
    });
  }
}

/** Misuse of the API that no kernel call could fix (bad argument types, ranges). */
export class UsageError extends KvmmemError {
  constructor(message: string, hint?: string) {
    super(message, hint === undefined ? { code: 'ERR_INVALID_ARG' } : { code: 'ERR_INVALID_ARG', hint });
  }
}
