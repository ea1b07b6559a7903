/**
 * The binding interface between the client and a kvmmem device, in the style of
 * node-serialport's bindings: the real /dev/kvmmem (LinuxDevice) and the
 * hypercall model (ModelDevice) both implement it and receive the *same bytes*
 * the kernel would: a request number and either a pointer to a struct (a
 * Uint8Array holding the 48-byte kvmi_mem_map) or a plain value (the address
 * passed to KVM_INTRO_MEM_UNMAP).
 */
import type { KvmmemError } from '../errors.js';

export type IoctlArg = Uint8Array | bigint | number;

export interface Device {
  /** Where it came from: a device path, or 'model:<name>'. */
  readonly path: string;
  readonly closed: boolean;
  /** One ioctl. Returns the (non-negative) result; throws a DeviceError on failure. */
  ioctl(request: number, arg: IoctlArg): number;
  /**
   * Many ioctls of one request in one call, each independent (a failure does not
   * stop the rest). `args` holds `count` records of `stride` bytes (pointer
   * arguments) when stride > 0, or `count` u64 values (value arguments) when
   * stride === 0. `results[i]` receives 0/the result or -errno. Returns how
   * many succeeded. Never throws for per-record errors.
   */
  ioctlBatch(request: number, args: Uint8Array, stride: number, count: number, results: Int32Array): number;
  /** The typed error (code, errno, hint) for a request that failed with -errno, e.g. a batch result. */
  error(request: number, negErrno: number): KvmmemError;
  /** Closes the file: the driver's release() tears down everything this file mapped. */
  close(): void;
}

/** Runs a batch one ioctl at a time: the fallback when no native batch helper is loaded. */
export function ioctlBatchByOne(
  one: (request: number, arg: IoctlArg) => number,
  request: number, args: Uint8Array, stride: number, count: number, results: Int32Array,
): number {
  let ok = 0;
  const dv = new DataView(args.buffer, args.byteOffset, args.byteLength);
  for (let i = 0; i < count; i++) {
    const arg: IoctlArg = stride > 0
      ? args.subarray(i * stride, (i + 1) * stride)
      : Number(dv.getBigUint64(i * 8, true));
    const r = one(request, arg);
    results[i] = r;
    if (r >= 0) ok++;
  }
  return ok;
}
