// Structs passed to ioctls: the guest device's kvmi_mem_map and the host VM's
// kvm_introspection_hook. Layouts are data (offsets/sizes as in C, checked
// against the compiler by test/abi.test.ts); the codecs read them.

import { Buffer } from 'node:buffer';
import {
  checkBytes, checkInt32, checkU64, checkUint, copyBytes, needBytes, outBuffer,
} from './errors.js';

export interface FieldLayout { readonly offset: number; readonly size: number }
export interface StructLayout {
  /** C struct tag, without `struct`. */
  readonly name: string;
  /** sizeof() on x86-64. */
  readonly size: number;
  /** Every member, in declaration order. */
  readonly fields: Readonly<Record<string, FieldLayout>>;
}

export const MEM_TOKEN_SIZE = 32;
export const MEM_MAP_SIZE = 48;
export const HOOK_SIZE = 24;
export const PAGE_SIZE = 4096;
export const PAGE_SHIFT = 12;
/** x86-64 TASK_SIZE_MAX: access_ok() accepts [addr, addr+len) only below this. */
export const X86_64_USER_LIMIT = 0x7ffffffff000n;

export const KVMI_MAP_MEM_TOKEN_LAYOUT = {
  name: 'kvmi_map_mem_token',
  size: MEM_TOKEN_SIZE,
  fields: { token: { offset: 0, size: 32 } }, // __u64 token[4]: opaque bytes to us
} as const satisfies StructLayout;

export const KVMI_MEM_MAP_LAYOUT = {
  name: 'kvmi_mem_map',
  size: MEM_MAP_SIZE,
  fields: {
    token: { offset: 0, size: MEM_TOKEN_SIZE },
    gpa: { offset: 32, size: 8 },
    gva: { offset: 40, size: 8 },
  },
} as const satisfies StructLayout;

export const KVM_INTROSPECTION_HOOK_LAYOUT = {
  name: 'kvm_introspection_hook',
  size: HOOK_SIZE,
  fields: {
    fd: { offset: 0, size: 4 },
    padding: { offset: 4, size: 4 },
    uuid: { offset: 8, size: 16 },
  },
} as const satisfies StructLayout;

/** Device/host ioctl structs, for tooling and the C cross-check. */
export const DEVICE_STRUCT_LAYOUTS: readonly StructLayout[] = [
  KVMI_MAP_MEM_TOKEN_LAYOUT, KVMI_MEM_MAP_LAYOUT, KVM_INTROSPECTION_HOOK_LAYOUT,
];

// ---- struct kvmi_mem_map ----

export interface MemMap {
  /** 32 opaque bytes from KVMI_GET_MAP_TOKEN. */
  token: Uint8Array;
  /** Guest-physical address in the introspected VM. */
  gpa: bigint;
  /** Virtual address in the caller's process. */
  gva: bigint;
}

/**
 * Writes the 48-byte record into `into` at `offset` (so batches of records
 * can share one Buffer), or into a new Buffer. Returns the buffer written.
 */
export function encodeMemMap(m: MemMap, into?: Buffer, offset = 0): Buffer {
  const L = KVMI_MEM_MAP_LAYOUT;
  checkBytes('kvmi_mem_map.token', m.token, MEM_TOKEN_SIZE);
  const gpa = checkU64('kvmi_mem_map.gpa', m.gpa);
  const gva = checkU64('kvmi_mem_map.gva', m.gva);
  const buf = outBuffer(L.name, L.size, into, offset);
  buf.set(m.token, offset + L.fields.token.offset);
  buf.writeBigUInt64LE(gpa, offset + L.fields.gpa.offset);
  buf.writeBigUInt64LE(gva, offset + L.fields.gva.offset);
  return buf;
}

/** The returned token is a copy, safe to keep after `buf` is reused. */
export function decodeMemMap(buf: Uint8Array, offset = 0): MemMap {
  const L = KVMI_MEM_MAP_LAYOUT;
  const b = needBytes(L.name, buf, offset, L.size);
  return {
    token: copyBytes(b, offset + L.fields.token.offset, MEM_TOKEN_SIZE),
    gpa: b.readBigUInt64LE(offset + L.fields.gpa.offset),
    gva: b.readBigUInt64LE(offset + L.fields.gva.offset),
  };
}

// ---- struct kvm_introspection_hook ----

export interface IntrospectionHook {
  /** Socket fd connected to the introspection tool (s32). */
  fd: number;
  /** Must be 0 for the host to accept it (EINVAL otherwise). */
  padding: number;
  uuid: Uint8Array;
}

/** `padding` defaults to 0; a non-zero value can be sent to exercise the host's EINVAL path. */
export function encodeHook(
  h: Omit<IntrospectionHook, 'padding'> & { padding?: number },
  into?: Buffer,
  offset = 0,
): Buffer {
  const L = KVM_INTROSPECTION_HOOK_LAYOUT;
  const fd = checkInt32('kvm_introspection_hook.fd', h.fd);
  const padding = checkUint('kvm_introspection_hook.padding', h.padding ?? 0, 32);
  checkBytes('kvm_introspection_hook.uuid', h.uuid, 16);
  const buf = outBuffer(L.name, L.size, into, offset);
  buf.writeInt32LE(fd, offset + L.fields.fd.offset);
  buf.writeUInt32LE(padding, offset + L.fields.padding.offset);
  buf.set(h.uuid, offset + L.fields.uuid.offset);
  return buf;
}

/** Padding is returned as found: rejecting it (EINVAL) is the host's decision, not the codec's. */
export function decodeHook(buf: Uint8Array, offset = 0): IntrospectionHook {
  const L = KVM_INTROSPECTION_HOOK_LAYOUT;
  const b = needBytes(L.name, buf, offset, L.size);
  return {
    fd: b.readInt32LE(offset + L.fields.fd.offset),
    padding: b.readUInt32LE(offset + L.fields.padding.offset),
    uuid: copyBytes(b, offset + L.fields.uuid.offset, 16),
  };
}
