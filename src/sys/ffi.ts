/**
 * ffi-rs, set up once for src/sys: the one place libc is opened, errno is
 * read and failures become SyscallErrors, for the modules that wrap the calls
 * (core.ts, memory.ts, batch.ts, sockets.ts; libc.ts puts them together).
 * No other layer imports ffi-rs (test/layers.test.ts).
 *
 * Conventions: host-process virtual addresses are JS numbers here (x86-64 user
 * addresses are < 2^47, exact in a double); everything public above src/sys uses
 * bigint. Every call is a `load({...literal})` (measured cheaper than `define()`).
 * Hot paths read errno from a live view of the thread's errno slot (cheaper
 * than `errno: true`), once the self-check (memory.ts) found it live.
 *
 * Naming, in all of src/sys: a function whose failure comes back as a -errno
 * value (its result, or per record in a `results` array) instead of a thrown
 * SyscallError ends in `Raw` (ioctlRaw, mmapRaw, readRaw, remapManyRaw...);
 * every other one throws.
 */
// First: pins ffi-rs resident so a worker thread's exit cannot unload it (see thread.ts).
import './thread.js';
import ffi from 'ffi-rs';
import { SyscallError } from '../errors.js';

export const { open: ffiOpen, load, DataType, createExternalBuffer } = ffi;
const { I32, U64, External } = DataType;
export const LIBC = 'libc';
ffiOpen({ library: LIBC, path: '' });

// A 4-byte live view of this thread's errno (ffi-rs calls run on the JS thread).
const errnoExt = load({ library: LIBC, funcName: '__errno_location', retType: External, paramsType: [], paramsValue: [] });
export const errnoView = new Int32Array(createExternalBuffer(errnoExt, 4).buffer, 0, 1);
/**
 * Whether errnoView is live. createExternalBuffer may hand back a copy on some
 * runtimes; errno must then come from ffi-rs itself (`errno: true`).
 */
export let errnoLive = false;
/** @internal the self-check's verdict on errnoView (memory.ts). */
export function setErrnoLive(live: boolean): void {
  errnoLive = live;
}

/** Throws the SyscallError of a failed call. */
export function fail(syscall: string, errno: number, path?: string, hint?: string): never {
  throw new SyscallError(errno, syscall, { ...(path === undefined ? {} : { path }), ...(hint === undefined ? {} : { hint }) });
}

/** What ffi-rs answers with `errno: true`. */
export type Errno<T> = { value: T; errnoCode: number };

/** A JsExternal for a numeric address: memset(p, 0, 0) returns p unchanged. */
export function externalAt(addr: number) {
  return load({ library: LIBC, funcName: 'memset', retType: External, paramsType: [U64, I32, U64], paramsValue: [addr, 0, 0] });
}
