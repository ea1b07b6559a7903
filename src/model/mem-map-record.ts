/**
 * The driver's arguments read in place: struct kvmi_mem_map records (fields at
 * KVMI_MEM_MAP_LAYOUT's offsets) and the u64 values of a batch UNMAP, straight
 * from the caller's bytes (little-endian), with no decode copy and no bigint for
 * a value that is an exact number.
 */
import { KVMI_MEM_MAP_LAYOUT, PAGE_SIZE } from '../abi/structs.js';
import { USER_LIMIT } from './uaccess.js';

/** kvmi_mem_map field offsets, from the ABI's layout. */
export const MAP_GPA = KVMI_MEM_MAP_LAYOUT.fields.gpa.offset;
export const MAP_GVA = KVMI_MEM_MAP_LAYOUT.fields.gva.offset;

/** Little-endian u32 at `off` of `b`. */
export function u32le(b: Uint8Array, off: number): number {
  return (b[off]! | (b[off + 1]! << 8) | (b[off + 2]! << 16)) + b[off + 3]! * 0x1000000;
}

/** Little-endian u64 at `off` of `b`, as a bigint. */
export function u64leBig(b: Uint8Array, off: number): bigint {
  return (BigInt(u32le(b, off + 4)) << 32n) | BigInt(u32le(b, off));
}

/** Little-endian u64 at `off` of `b`: a number when exact (< 2^53), else the bigint. */
export function u64le(b: Uint8Array, off: number): number | bigint {
  const hi = u32le(b, off + 4);
  return hi < 0x200000 ? hi * 0x100000000 + u32le(b, off) : u64leBig(b, off);
}

/**
 * map->gva of the record at `off` when access_ok(map->gva, PAGE_SIZE) holds
 * (the page lies below the x86-64 user limit), else -1.
 */
export function accessOkGva(b: Uint8Array, off: number): number {
  const hi = u32le(b, off + MAP_GVA + 4);
  if (hi >= 0x8000) return -1; // >= 2^47
  const gva = hi * 0x100000000 + u32le(b, off + MAP_GVA);
  return gva + PAGE_SIZE > USER_LIMIT ? -1 : gva;
}

/** map->gpa of the record at `off`: a number when exact (< 2^53), else the bigint. */
export function mapGpa(b: Uint8Array, off: number): number | bigint {
  return u64le(b, off + MAP_GPA);
}
