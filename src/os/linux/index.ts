// Linux guests seen without a profile: kernel base, kallsyms and BTF from the guest's own memory, and views built on them.
export { LinuxGuest, LinuxProcessView, type AttachOptions, type LinuxProcess, type LinuxModule, type LinuxVma, type DmesgRecord, type Uname, type QemuMonitor } from './guest.js';
export { KernelSymbols, KALLSYMS_DIGITS, decodeKallsyms, type KernelSymbol, type KallsymsLocation } from './kallsyms.js';
export { Btf, BtfKind, BTF_MAGIC, type BtfMember, type ResolvedMember, type BtfEnumerator } from './btf.js';
export { KernelMemory, type KernelLayout } from './memory.js';
export { START_KERNEL_MAP, baseFromCr3 } from './attach.js';
export { buildSyntheticLinux, BtfWriter, writeKallsyms, type SyntheticLinuxOptions, type SyntheticLinuxTruth, type SyntheticLinuxTask, type SymbolSpec } from './synthetic.js';
export { LinuxError, LinuxNotFoundError, LinuxUnsupportedError, LinuxStructureError, LinuxNoSuchError, type LinuxErrorCode } from './errors.js';
