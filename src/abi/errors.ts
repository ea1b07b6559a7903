// Error type for malformed wire/device data, plus the small validation
// helpers every codec in src/abi shares. Decoders throw AbiDecodeError (the
// data came from outside: a peer, a driver); encoders throw UsageError (the
// caller passed a bad value). Both are KvmmemErrors, as everything is.

import { Buffer } from 'node:buffer';
import { KvmmemError, UsageError } from '../errors.js';

export class AbiDecodeError extends KvmmemError {
  declare readonly code: 'ERR_KVMI_ABI';
  /** C struct name, e.g. 'kvmi_control_vm_events'. */
  readonly struct: string;
  /** Offending field, or undefined when the whole struct is at fault (short buffer). */
  readonly field: string | undefined;

  constructor(struct: string, field: string | undefined, detail: string) {
    super(field === undefined ? `${struct}: ${detail}` : `${struct}: ${field} ${detail}`, { code: 'ERR_KVMI_ABI' });
    this.struct = struct;
    this.field = field;
  }
}

// ---- internal helpers (not re-exported from index.ts) ----

/** @internal Hex for messages: 0x1, 0xffff. */
export function hex(v: number | bigint): string {
  return (v < 0 ? '-0x' : '0x') + (v < 0 ? -BigInt(v) : BigInt(v)).toString(16);
}

/** @internal Zero-copy Buffer view of any Uint8Array, so we can use Buffer's LE readers. */
export function asBuffer(u8: Uint8Array): Buffer {
  return Buffer.isBuffer(u8) ? u8 : Buffer.from(u8.buffer, u8.byteOffset, u8.byteLength);
}

/** @internal Decoder precondition: `n` bytes available at `offset`. */
export function needBytes(struct: string, buf: Uint8Array, offset: number, n: number): Buffer {
  if (!(buf instanceof Uint8Array)) throw new UsageError(`${struct}: expected a Uint8Array/Buffer`);
  if (!Number.isSafeInteger(offset) || offset < 0) {
    throw new UsageError(`${struct}: offset must be a non-negative integer, got ${String(offset)}`);
  }
  if (buf.length - offset < n) {
    throw new AbiDecodeError(struct, undefined,
      `need ${n} bytes at offset ${offset}, buffer has ${Math.max(0, buf.length - offset)}`);
  }
  return asBuffer(buf);
}

/** @internal Reserved fields must be zero on the wire. */
export function expectZero(struct: string, field: string, value: number): void {
  if (value !== 0) throw new AbiDecodeError(struct, field, `must be 0, got ${hex(value)}`);
}

/**
 * @internal Encoder output: `into` (checked for room) or a fresh zeroed Buffer.
 * Padding is always written explicitly by callers, so reuse of `into` is safe.
 */
export function outBuffer(struct: string, size: number, into: Buffer | undefined, offset: number): Buffer {
  if (into === undefined) {
    if (offset !== 0) throw new UsageError(`${struct}: offset given without a target buffer`);
    return Buffer.alloc(size);
  }
  if (!Number.isSafeInteger(offset) || offset < 0 || into.length - offset < size) {
    throw new UsageError(`${struct}: no room for ${size} bytes at offset ${String(offset)} in a ${into.length}-byte buffer`);
  }
  return into;
}

/** @internal Unsigned integer of `bits` (<= 32) bits held in a JS number. */
export function checkUint(what: string, v: number, bits: 8 | 16 | 32): number {
  const max = bits === 32 ? 0xffffffff : (1 << bits) - 1;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > max) {
    throw new UsageError(`${what} must be a u${bits} (0..${hex(max)}), got ${String(v)}`);
  }
  return v;
}

/** @internal Signed 32-bit integer (fds, error codes). */
export function checkInt32(what: string, v: number): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < -0x80000000 || v > 0x7fffffff) {
    throw new UsageError(`${what} must be an s32, got ${String(v)}`);
  }
  return v;
}

const U64_MAX = (1n << 64n) - 1n;
const S64_MIN = -(1n << 63n);
const S64_MAX = (1n << 63n) - 1n;

/** @internal u64 as bigint; a number is rejected (addresses above 2^53 would silently lose bits). */
export function checkU64(what: string, v: bigint): bigint {
  if (typeof v !== 'bigint') throw new UsageError(`${what} must be a bigint, got ${typeof v}`);
  if (v < 0n || v > U64_MAX) throw new UsageError(`${what} must be a u64 (0..2^64-1), got ${v}`);
  return v;
}

/** @internal s64 as bigint. */
export function checkS64(what: string, v: bigint): bigint {
  if (typeof v !== 'bigint') throw new UsageError(`${what} must be a bigint, got ${typeof v}`);
  if (v < S64_MIN || v > S64_MAX) throw new UsageError(`${what} must be an s64, got ${v}`);
  return v;
}

/** @internal Fixed-length byte array (token, uuid, hash). */
export function checkBytes(what: string, v: Uint8Array, len: number): Uint8Array {
  if (!(v instanceof Uint8Array)) throw new UsageError(`${what} must be a Uint8Array`);
  if (v.length !== len) throw new UsageError(`${what} must be ${len} bytes, got ${v.length}`);
  return v;
}

/** @internal Detached copy, returned as a plain Uint8Array (never a view into the input). */
export function copyBytes(buf: Buffer, start: number, len: number): Uint8Array {
  return new Uint8Array(buf.subarray(start, start + len));
}
