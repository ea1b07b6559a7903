/**
 * Errors of the Linux views. A guest is untrusted and changes while it is
 * read: what does not look like the kernel structure it should be is a
 * LinuxStructureError naming the structure and the address, never a hang.
 */
import { KvmmemError } from '../../errors.js';
import { hex } from '../../client/address.js';

export type LinuxErrorCode =
  /** The kernel's base, kallsyms or BTF could not be found (or the layout found is not one this code decodes). */
  | 'ERR_LINUX_NOT_FOUND'
  /** A kallsyms/BTF layout was found but is not one this code supports. */
  | 'ERR_LINUX_UNSUPPORTED'
  /** A kernel structure read from memory is inconsistent (cycle, wild pointer, bad length). */
  | 'ERR_LINUX_BAD_STRUCTURE'
  /** A symbol, type, member or process asked for does not exist. */
  | 'ERR_LINUX_NO_SUCH';

export class LinuxError extends KvmmemError {
  constructor(code: LinuxErrorCode, message: string, hint?: string) {
    super(message, hint === undefined ? { code } : { code, hint });
  }
}

/** Locating the kernel failed: `what` names what was searched and what was found instead. */
export class LinuxNotFoundError extends LinuxError {
  constructor(message: string, hint = 'the guest must run a Linux kernel with CONFIG_KALLSYMS_ALL and CONFIG_DEBUG_INFO_BTF (Debian, Ubuntu and Fedora kernels have both)') {
    super('ERR_LINUX_NOT_FOUND', message, hint);
  }
}

/** A layout this code does not decode (names what was found). */
export class LinuxUnsupportedError extends LinuxError {
  constructor(message: string) {
    super('ERR_LINUX_UNSUPPORTED', message, 'supported: the base-relative kallsyms layouts of Linux 4.6-6.3 (with or without kallsyms_seqs_of_names) and 6.4 onwards until PC-relative offsets');
  }
}

/** A broken structure: `struct` at `address` (a guest-virtual address unless said otherwise). */
export class LinuxStructureError extends LinuxError {
  readonly struct: string;
  readonly address: bigint;
  constructor(struct: string, address: bigint, why: string) {
    super('ERR_LINUX_BAD_STRUCTURE', `${struct} at ${hex(address)}: ${why}`, 'the guest changed the structure while it was read, or it is corrupted; retry, or read between QMP stop and cont');
    this.struct = struct;
    this.address = address;
  }
}

/** A name (symbol, type, member, pid) that does not exist. */
export class LinuxNoSuchError extends LinuxError {
  constructor(message: string) {
    super('ERR_LINUX_NO_SUCH', message);
  }
}
