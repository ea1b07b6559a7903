// ioctl request numbers, Linux asm-generic layout (x86-64 uses it as is):
//   bits 0-7 nr, 8-15 type, 16-29 size, 30-31 dir.
// Results are unsigned 32-bit numbers, as the kernel's `unsigned int cmd` sees them.

import { UsageError } from '../errors.js';

export const IOC_NONE = 0;
export const IOC_WRITE = 1;
export const IOC_READ = 2;

const NRBITS = 8;
const TYPEBITS = 8;
const SIZEBITS = 14;
const DIRBITS = 2;
const NRSHIFT = 0;
const TYPESHIFT = NRSHIFT + NRBITS;
const SIZESHIFT = TYPESHIFT + TYPEBITS;
const DIRSHIFT = SIZESHIFT + SIZEBITS;

function field(name: string, v: number, bits: number): number {
  const max = 2 ** bits - 1;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > max) {
    throw new UsageError(`_IOC: ${name} must be an integer in 0..${max}, got ${String(v)}`);
  }
  return v;
}

function typeCode(type: number | string): number {
  if (typeof type === 'string') {
    // One character, like the C char literal 'i'.
    if (type.length !== 1) throw new UsageError(`_IOC: type must be a single character, got ${JSON.stringify(type)}`);
    return field('type', type.charCodeAt(0), TYPEBITS);
  }
  return field('type', type, TYPEBITS);
}

export function _IOC(dir: number, type: number | string, nr: number, size: number): number {
  // Multiply instead of << for dir so bit 31 does not turn the result negative.
  return field('dir', dir, DIRBITS) * 2 ** DIRSHIFT
    + ((field('size', size, SIZEBITS) << SIZESHIFT)
      | (typeCode(type) << TYPESHIFT)
      | (field('nr', nr, NRBITS) << NRSHIFT));
}

export const _IO = (type: number | string, nr: number): number => _IOC(IOC_NONE, type, nr, 0);
/** Userspace writes (the kernel reads the argument). */
export const _IOW = (type: number | string, nr: number, size: number): number => _IOC(IOC_WRITE, type, nr, size);
export const _IOR = (type: number | string, nr: number, size: number): number => _IOC(IOC_READ, type, nr, size);
export const _IOWR = (type: number | string, nr: number, size: number): number =>
  _IOC(IOC_READ | IOC_WRITE, type, nr, size);

export interface IoctlFields { dir: number; type: number; nr: number; size: number }

/** Splits a request number. Accepts the uint32 value or its int32 reinterpretation. */
export function decodeIoctl(req: number): IoctlFields {
  if (typeof req !== 'number' || !Number.isInteger(req) || req < -0x80000000 || req > 0xffffffff) {
    throw new UsageError(`decodeIoctl: request must be a 32-bit integer, got ${String(req)}`);
  }
  const r = req >>> 0;
  return {
    dir: r >>> DIRSHIFT,
    type: (r >>> TYPESHIFT) & 0xff,
    nr: (r >>> NRSHIFT) & 0xff,
    size: (r >>> SIZESHIFT) & ((1 << SIZEBITS) - 1),
  };
}

// Sizes are spelled out (not imported from structs.ts) so this file stays
// dependency-free; the C cross-check test pins both.

/** _IOW('i', 0x01, struct kvmi_mem_map): the 48-byte struct is copied in. */
export const KVM_INTRO_MEM_MAP = _IOW('i', 0x01, 48);
/** _IOW('i', 0x02, unsigned long), but the address is the argument value itself, not a pointer. */
export const KVM_INTRO_MEM_UNMAP = _IOW('i', 0x02, 8);

/**
 * The *other* /dev/kvmmem: libkvmi's "remote mapping v2" reuses the name and
 * 'i' 0x01 (KVM_GUEST_MEM_OPEN, a different request). Only probed, to tell
 * the user which interface a device speaks: kvmmem speaks v1 (RFC v4).
 */
export const KVM_GUEST_MEM_UNMAP_V2 = _IOW('i', 0x03, 8);

export const KVMIO = 0xae;
/** VM ioctl, _IOW(KVMIO, 0xc3, struct kvm_introspection_hook). */
export const KVM_INTROSPECTION_HOOK = _IOW(KVMIO, 0xc3, 24);
/** VM ioctl. Note: numerically equal to KVM_S390_CLEAR_RESET (an s390 vcpu ioctl). */
export const KVM_INTROSPECTION_UNHOOK = _IO(KVMIO, 0xc4);
export const KVM_INTROSPECTION_PREUNHOOK = _IO(KVMIO, 0xcc);

const NAMES: ReadonlyMap<number, string> = new Map([
  [KVM_INTRO_MEM_MAP, 'KVM_INTRO_MEM_MAP'],
  [KVM_INTRO_MEM_UNMAP, 'KVM_INTRO_MEM_UNMAP'],
  [KVM_INTROSPECTION_HOOK, 'KVM_INTROSPECTION_HOOK'],
  [KVM_INTROSPECTION_UNHOOK, 'KVM_INTROSPECTION_UNHOOK'],
  [KVM_INTROSPECTION_PREUNHOOK, 'KVM_INTROSPECTION_PREUNHOOK'],
  [KVM_GUEST_MEM_UNMAP_V2, 'KVM_GUEST_MEM_UNMAP (v2)'],
]);

/** Symbolic name of a known request, else its hex value (e.g. '0x40086903'). */
export function ioctlName(req: number): string {
  if (!Number.isInteger(req)) return String(req);
  const r = req >>> 0;
  return NAMES.get(r) ?? '0x' + r.toString(16).padStart(8, '0');
}
