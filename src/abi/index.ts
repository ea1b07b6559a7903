// Public surface of kvmmem/abi: pure data and codecs, no I/O.
// errors.ts also holds internal validation helpers, hence the explicit export.

export { AbiDecodeError } from './errors.js';
export * from './errno.js';
export * from './hypercall.js';
export * from './ioctl.js';
export * from './kvmi.js';
export * from './structs.js';
