/**
 * libc through ffi-rs. This is the only module that imports ffi-rs.
 *
 * Conventions: host-process virtual addresses are JS numbers here (x86-64 user
 * addresses are < 2^47, exact in a double); everything public above src/sys uses
 * bigint. Every call is a `load({...literal})` (measured cheaper than `define()`),
 * and failures throw SyscallError with code/errno/syscall.  The hot ioctl path
 * returns -errno instead of throwing and reads errno from a live view of the
 * thread's errno slot (cheaper than `errno: true`), verified at start-up.
 */
// First: pins ffi-rs resident so a worker thread's exit cannot unload it (see thread.ts).
import './thread.js';
import ffi from 'ffi-rs';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { debuglog } from 'node:util';
import { SyscallError } from '../errors.js';

const { open: ffiOpen, load, DataType, createExternalBuffer } = ffi;
const { I32, I64, U64, U8Array, External, String: Str, Void } = DataType;
const LIBC = 'libc';
ffiOpen({ library: LIBC, path: '' });

// ---- constants (Linux x86-64) ----
export const O_RDONLY = 0, O_WRONLY = 1, O_RDWR = 2, O_CREAT = 0o100, O_CLOEXEC = 0o2000000;
export const PROT_NONE = 0, PROT_READ = 1, PROT_WRITE = 2;
export const MAP_SHARED = 0x01, MAP_PRIVATE = 0x02, MAP_FIXED = 0x10, MAP_ANONYMOUS = 0x20,
  MAP_NORESERVE = 0x4000, MAP_POPULATE = 0x8000, MAP_LOCKED = 0x2000;
export const MADV_DONTNEED = 4, MADV_POPULATE_READ = 22, MADV_POPULATE_WRITE = 23;
export const MFD_CLOEXEC = 1, MFD_ALLOW_SEALING = 2;
export const F_GETFD = 1, FD_CLOEXEC = 1;
export const F_ADD_SEALS = 1033, F_GET_SEALS = 1034, F_SEAL_SEAL = 1, F_SEAL_SHRINK = 2, F_SEAL_GROW = 4;
const _SC_PAGESIZE = 30;
/** Node Buffers (and ffi-rs external views) are at most this long. */
export const MAX_VIEW_BYTES = 2 ** 32;

// ---- errno ----
// A 4-byte live view of this thread's errno (ffi-rs calls run on the JS thread).
const errnoExt = load({ library: LIBC, funcName: '__errno_location', retType: External, paramsType: [], paramsValue: [] });
const errnoView = new Int32Array(createExternalBuffer(errnoExt, 4).buffer, 0, 1);
// createExternalBuffer may hand back a copy on some runtimes; errno must then come from ffi-rs itself.
let errnoLive = false;

function fail(syscall: string, errno: number, path?: string, hint?: string): never {
  throw new SyscallError(errno, syscall, { ...(path === undefined ? {} : { path }), ...(hint === undefined ? {} : { hint }) });
}

type Errno<T> = { value: T; errnoCode: number };

// ---- pointer arguments without ffi-rs's per-array marshalling ----
// ffi-rs marshals every U8Array argument on every call (measured 5-7 us each on
// the bench machine, more than the call itself); a U64 address costs next to
// nothing. So pointer arguments go as addresses: a view whose ArrayBuffer has a
// known ("pinned") address is passed as base + offset; a small one is staged
// through a native scratch arena (copied in before the call, out after it).
// ArrayBuffer backing stores never move while the ArrayBuffer lives (a detached
// or resized one no longer matches its recorded length and is looked up again).
const pinned = new WeakMap<ArrayBufferLike, { base: number; len: number }>();
/** Views of at most this many bytes are staged; bigger ones are pinned (one ffi call, once per buffer). */
const STAGE_MAX = 64 * 1024;
const ARENA_BYTES = 1 << 20;

class Stager {
  readonly #addr: number;
  readonly #arena: Uint8Array;
  #top = 0;
  #out: { v: ArrayBufferView; off: number; len: number; at: number }[] = [];
  constructor(addr: number, arena: Uint8Array) {
    this.#addr = addr;
    this.#arena = arena;
  }
  reset(): this {
    if (this.#top > 0) this.#arena.fill(0, 0, this.#top); // a call that threw before done()
    this.#top = 0;
    if (this.#out.length > 0) this.#out = [];
    return this;
  }
  /**
   * An address for bytes [off, off+len) of `v` valid for one native call, or -1
   * (use the U8Array path). copyIn: the callee reads them; copyOut: it writes them.
   */
  arg(v: ArrayBufferView, off: number, len: number, copyIn: boolean, copyOut = true): number {
    if (off < 0 || len < 0 || off + len > v.byteLength) return -1;
    if (len === 0) return this.#addr;
    const known = pinnedAddress(v);
    if (known >= 0) return known + off;
    if (len > STAGE_MAX) {
      const base = pin(v);
      return base >= 0 ? base + off : -1;
    }
    const at = (this.#top + 7) & ~7;
    if (at + len > ARENA_BYTES) return -1;
    this.#top = at + len;
    if (copyIn) this.#arena.set(new Uint8Array(v.buffer, v.byteOffset + off, len), at);
    if (copyOut) this.#out.push({ v, off, len, at });
    return this.#addr + at;
  }
  /**
   * After the call: copy the callee's writes back, and clear what was staged (MAP
   * records hold single-use tokens: no copy of them stays behind in the arena).
   */
  done(): void {
    for (const o of this.#out) new Uint8Array(o.v.buffer, o.v.byteOffset + o.off, o.len).set(this.#arena.subarray(o.at, o.at + o.len));
    if (this.#out.length > 0) this.#out = [];
    if (this.#top > 0) this.#arena.fill(0, 0, this.#top);
    this.#top = 0;
  }
}
let stagerInstance: Stager | null = null;
/** The (non-reentrant) stager, reset for one call. Only synchronous calls may use it. */
function stager(): Stager {
  if (stagerInstance === null) {
    const a = load({ library: LIBC, funcName: 'mmap', retType: I64, paramsType: [U64, U64, I32, I32, I32, I64], paramsValue: [0, ARENA_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0] }) as number;
    if (a === -1) throw new SyscallError(12, 'mmap', { hint: 'could not map the 1 MiB scratch arena for native calls' });
    stagerInstance = new Stager(a, view(a, ARENA_BYTES));
  }
  return stagerInstance.reset();
}

function pinnedAddress(v: ArrayBufferView): number {
  const ab = v.buffer;
  const p = pinned.get(ab);
  return p !== undefined && p.len === ab.byteLength && p.len > 0 ? p.base + v.byteOffset : -1;
}

/**
 * Records the address of `v`'s whole ArrayBuffer (one native call) so that later
 * calls pass pointers into it as plain addresses. For buffers reused across
 * many native calls. Returns the address of v's first byte, or -1 for an empty buffer.
 */
export function pin(v: ArrayBufferView): number {
  const known = pinnedAddress(v);
  if (known >= 0) return known;
  const ab = v.buffer;
  if (ab.byteLength === 0) return -1;
  const whole = Buffer.from(ab, 0, ab.byteLength);
  const base = load({ library: LIBC, funcName: 'memset', retType: U64, paramsType: [U8Array, I32, U64], paramsValue: [whole, 0, 0] }) as number;
  pinned.set(ab, { base, len: ab.byteLength });
  return base + v.byteOffset;
}

// ---- files ----
/** open(2), always with O_CLOEXEC. Returns the fd. */
export function open(path: string, flags: number, mode = 0): number {
  const r = load({ library: LIBC, funcName: 'open', retType: I32, paramsType: [Str, I32, I32], paramsValue: [path, flags | O_CLOEXEC, mode], errno: true }) as Errno<number>;
  if (r.value < 0) fail('open', r.errnoCode, path);
  return r.value;
}

export function close(fd: number): void {
  const r = load({ library: LIBC, funcName: 'close', retType: I32, paramsType: [I32], paramsValue: [fd], errno: true }) as Errno<number>;
  if (r.value < 0) fail('close', r.errnoCode);
}

/** fcntl(fd, cmd, arg) for integer commands (F_GETFD ...). */
export function fcntl(fd: number, cmd: number, arg = 0): number {
  const r = load({ library: LIBC, funcName: 'fcntl', retType: I32, paramsType: [I32, I32, I32], paramsValue: [fd, cmd, arg], errno: true }) as Errno<number>;
  if (r.value < 0) fail('fcntl', r.errnoCode);
  return r.value;
}

export function ftruncate(fd: number, length: number): void {
  const r = load({ library: LIBC, funcName: 'ftruncate', retType: I32, paramsType: [I32, I64], paramsValue: [fd, length], errno: true }) as Errno<number>;
  if (r.value < 0) fail('ftruncate', r.errnoCode);
}

/** memfd_create(2) with MFD_CLOEXEC: anonymous memory that can be mapped MAP_SHARED. */
export function memfdCreate(name: string, flags = 0): number {
  const r = load({ library: LIBC, funcName: 'memfd_create', retType: I32, paramsType: [Str, I32], paramsValue: [name, flags | MFD_CLOEXEC], errno: true }) as Errno<number>;
  if (r.value < 0) fail('memfd_create', r.errnoCode);
  return r.value;
}

let pageSizeCache = 0;
export function pageSize(): number {
  if (pageSizeCache === 0) {
    pageSizeCache = load({ library: LIBC, funcName: 'sysconf', retType: I64, paramsType: [I32], paramsValue: [_SC_PAGESIZE] }) as number;
  }
  return pageSizeCache;
}

// ---- ioctl ----
/**
 * ioctl(fd, request, arg) returning the result, or -errno on failure (no throw:
 * the device layer turns errno into an error that knows the request).
 * A Uint8Array arg is passed as a pointer to its bytes (zero-copy); a number or
 * bigint is passed as the argument value itself (as KVM_INTRO_MEM_UNMAP wants).
 */
export function ioctlRaw(fd: number, request: number, arg: Uint8Array | number | bigint): number {
  if (checked !== true) selfChecked();
  let v: number;
  if (errnoLive) {
    if (typeof arg === 'number') {
      v = load({ library: LIBC, funcName: 'ioctl', retType: I32, paramsType: [I32, U64, U64], paramsValue: [fd, request, arg] }) as number;
    } else if (typeof arg === 'bigint') {
      v = load({ library: LIBC, funcName: 'ioctl', retType: I32, paramsType: [I32, U64, DataType.BigInt], paramsValue: [fd, request, arg] }) as number;
    } else {
      const st = stager();
      const p = st.arg(arg, 0, arg.byteLength, true);
      if (p >= 0) {
        v = load({ library: LIBC, funcName: 'ioctl', retType: I32, paramsType: [I32, U64, U64], paramsValue: [fd, request, p] }) as number;
        const e = errnoView[0]!;
        st.done();
        return v < 0 ? -e : v;
      }
      v = load({ library: LIBC, funcName: 'ioctl', retType: I32, paramsType: [I32, U64, U8Array], paramsValue: [fd, request, arg] }) as number;
    }
    return v < 0 ? -errnoView[0]! : v;
  }
  const t = typeof arg === 'number' ? U64 : typeof arg === 'bigint' ? DataType.BigInt : U8Array;
  const r = load({ library: LIBC, funcName: 'ioctl', retType: I32, paramsType: [I32, U64, t], paramsValue: [fd, request, arg], errno: true }) as Errno<number>;
  return r.value < 0 ? -r.errnoCode : r.value;
}

/** ioctl(2) that throws SyscallError (code, errno, syscall 'ioctl') instead of returning -errno. */
export function ioctl(fd: number, request: number, arg: Uint8Array | number | bigint): number {
  const r = ioctlRaw(fd, request, arg);
  if (r < 0) fail('ioctl', -r);
  return r;
}

// ---- memory ----
/** mmap(2); returns the address. */
export function mmap(addr: number, length: number, prot: number, flags: number, fd = -1, offset = 0): number {
  if (errnoLive) {
    const v = load({ library: LIBC, funcName: 'mmap', retType: I64, paramsType: [U64, U64, I32, I32, I32, I64], paramsValue: [addr, length, prot, flags, fd, offset] }) as number;
    if (v === -1) fail('mmap', errnoView[0]!);
    return v;
  }
  const r = load({ library: LIBC, funcName: 'mmap', retType: I64, paramsType: [U64, U64, I32, I32, I32, I64], paramsValue: [addr, length, prot, flags, fd, offset], errno: true }) as Errno<number>;
  if (r.value === -1) fail('mmap', r.errnoCode);
  return r.value;
}

/** mmap returning -errno instead of throwing (for the model's per-page hot path). */
export function mmapRaw(addr: number, length: number, prot: number, flags: number, fd: number, offset: number): number {
  if (errnoLive) {
    const v = load({ library: LIBC, funcName: 'mmap', retType: I64, paramsType: [U64, U64, I32, I32, I32, I64], paramsValue: [addr, length, prot, flags, fd, offset] }) as number;
    return v === -1 ? -errnoView[0]! : v;
  }
  const r = load({ library: LIBC, funcName: 'mmap', retType: I64, paramsType: [U64, U64, I32, I32, I32, I64], paramsValue: [addr, length, prot, flags, fd, offset], errno: true }) as Errno<number>;
  return r.value === -1 ? -r.errnoCode : r.value;
}

export function munmap(addr: number, length: number): void {
  if (errnoLive) {
    const v = load({ library: LIBC, funcName: 'munmap', retType: I32, paramsType: [U64, U64], paramsValue: [addr, length] }) as number;
    if (v < 0) fail('munmap', errnoView[0]!);
    return;
  }
  const r = load({ library: LIBC, funcName: 'munmap', retType: I32, paramsType: [U64, U64], paramsValue: [addr, length], errno: true }) as Errno<number>;
  if (r.value < 0) fail('munmap', r.errnoCode);
}

const MLOCK_HINT = 'raise RLIMIT_MEMLOCK (ulimit -l) or run with CAP_IPC_LOCK: kvmmem locks the pages it hands to the driver';
export function mlock(addr: number, length: number): void {
  if (errnoLive) {
    const v = load({ library: LIBC, funcName: 'mlock', retType: I32, paramsType: [U64, U64], paramsValue: [addr, length] }) as number;
    if (v < 0) fail('mlock', errnoView[0]!, undefined, MLOCK_HINT);
    return;
  }
  const r = load({ library: LIBC, funcName: 'mlock', retType: I32, paramsType: [U64, U64], paramsValue: [addr, length], errno: true }) as Errno<number>;
  if (r.value < 0) fail('mlock', r.errnoCode, undefined, MLOCK_HINT);
}

/** mlock returning -errno instead of throwing. */
export function mlockRaw(addr: number, length: number): number {
  if (errnoLive) {
    const v = load({ library: LIBC, funcName: 'mlock', retType: I32, paramsType: [U64, U64], paramsValue: [addr, length] }) as number;
    return v < 0 ? -errnoView[0]! : v;
  }
  const r = load({ library: LIBC, funcName: 'mlock', retType: I32, paramsType: [U64, U64], paramsValue: [addr, length], errno: true }) as Errno<number>;
  return r.value < 0 ? -r.errnoCode : r.value;
}

export function munlock(addr: number, length: number): void {
  const r = load({ library: LIBC, funcName: 'munlock', retType: I32, paramsType: [U64, U64], paramsValue: [addr, length], errno: true }) as Errno<number>;
  if (r.value < 0) fail('munlock', r.errnoCode);
}

export function madvise(addr: number, length: number, advice: number): void {
  if (errnoLive) {
    const v = load({ library: LIBC, funcName: 'madvise', retType: I32, paramsType: [U64, U64, I32], paramsValue: [addr, length, advice] }) as number;
    if (v < 0) fail('madvise', errnoView[0]!);
    return;
  }
  const r = load({ library: LIBC, funcName: 'madvise', retType: I32, paramsType: [U64, U64, I32], paramsValue: [addr, length, advice], errno: true }) as Errno<number>;
  if (r.value < 0) fail('madvise', r.errnoCode);
}

/**
 * mincore(2): one byte per page, bit 0 = resident. Returns -ENOMEM (not a throw)
 * when part of the range is not mapped at all: the model driver uses exactly
 * that to reproduce find_vma() failing.
 */
export function mincore(addr: number, length: number, vec: Uint8Array): number {
  if (errnoLive) {
    const need = Math.ceil(length / pageSize());
    const st = stager();
    const p = need <= vec.byteLength ? st.arg(vec, 0, need, false) : -1;
    if (p >= 0) {
      const v = load({ library: LIBC, funcName: 'mincore', retType: I32, paramsType: [U64, U64, U64], paramsValue: [addr, length, p] }) as number;
      if (v < 0) {
        const e = errnoView[0]!;
        if (e === 12) return -12;
        fail('mincore', e);
      }
      st.done();
      return 0;
    }
  }
  const r = load({ library: LIBC, funcName: 'mincore', retType: I32, paramsType: [U64, U64, U8Array], paramsValue: [addr, length, vec], errno: true }) as Errno<number>;
  if (r.value < 0) {
    if (r.errnoCode === 12) return -12;
    fail('mincore', r.errnoCode);
  }
  return 0;
}

// ---- live views ----
/** A JsExternal for a numeric address: memset(p, 0, 0) returns p unchanged. */
function externalAt(addr: number) {
  return load({ library: LIBC, funcName: 'memset', retType: External, paramsType: [U64, I32, U64], paramsValue: [addr, 0, 0] });
}

/**
 * A live, zero-copy Buffer over native memory at `addr`. Garbage collection of
 * the Buffer never unmaps anything: the caller owns the memory's lifetime.
 */
export function view(addr: number, length: number): Buffer {
  if (!Number.isSafeInteger(addr) || addr <= 0) throw new RangeError(`view: bad address ${addr}`);
  if (!Number.isSafeInteger(length) || length <= 0 || length > MAX_VIEW_BYTES) {
    throw new RangeError(`view: length ${length} is outside 1..${MAX_VIEW_BYTES} (a single view is at most 4 GiB)`);
  }
  if (checked !== true) selfChecked();
  return createExternalBuffer(externalAt(addr), length);
}

/** The numeric address of a Buffer's bytes (zero-copy: memset(buf, 0, 0) returns buf). */
export function addressOf(buf: Uint8Array): number {
  const known = pinnedAddress(buf);
  if (known >= 0) return known;
  return load({ library: LIBC, funcName: 'memset', retType: U64, paramsType: [U8Array, I32, U64], paramsValue: [buf, 0, 0] }) as number;
}

/** memset on a numeric address (used by tests and the self-check as a "native write"). */
export function memsetAt(addr: number, byte: number, length: number): void {
  load({ library: LIBC, funcName: 'memset', retType: Void, paramsType: [U64, I32, U64], paramsValue: [addr, byte, length] });
}

/** memcmp of native memory against a JS buffer (a "native read"). */
export function memcmpAt(addr: number, bytes: Uint8Array): number {
  return load({ library: LIBC, funcName: 'memcmp', retType: I32, paramsType: [U64, U8Array, U64], paramsValue: [addr, bytes, bytes.length] }) as number;
}

// ---- start-up self-checks ----
class ViewNotLiveError extends SyscallError {}
function selfCheck(): void {
  const len = pageSize();
  const addr = mmap(0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  try {
    const v = createExternalBuffer(externalAt(addr), len);
    memsetAt(addr, 0x5a, 16);
    v[1] = 0xa5;
    const expect = Buffer.alloc(16, 0x5a);
    expect[1] = 0xa5;
    if (v[0] !== 0x5a || memcmpAt(addr, expect) !== 0) {
      throw new ViewNotLiveError(95, 'createExternalBuffer', {
        hint: 'this runtime hands back copies instead of live external buffers (e.g. Electron); kvmmem needs zero-copy views: run it under plain Node.js >= 20',
      });
    }
    // errno through the live view: a failing call must leave ENOENT (2) in it.
    errnoView[0] = 0;
    load({ library: LIBC, funcName: 'open', retType: I32, paramsType: [Str, I32, I32], paramsValue: ['/nonexistent/kvmmem-errno-check', O_RDONLY | O_CLOEXEC, 0] });
    errnoLive = errnoView[0] === 2;
  } finally {
    munmap(addr, len);
  }
}
// Run on first use (the first view or ioctl), not on import: importing kvmmem
// costs no native calls, and a runtime without live views fails where views are needed.
let checked: true | Error | false = false;
function selfChecked(): void {
  if (checked === false) {
    try {
      selfCheck();
      checked = true;
    } catch (e) {
      checked = e as Error;
    }
  }
  if (checked !== true) throw checked;
}

/** Whether errno is read from the live view (fast) or via ffi-rs's errno option. */
export function errnoMode(): 'live-view' | 'ffi-rs' {
  selfChecked();
  return errnoLive ? 'live-view' : 'ffi-rs';
}

// ---- the optional native batch helper (native/batch/kvmmem_batch.c) ----
const BATCH = 'kvmmem_batch';
let batchState: 'unknown' | 'loaded' | 'absent' = 'unknown';
let batchAbi = 0;
const debug = debuglog('kvmmem');

/** Loads native/build/libkvmmem_batch.so once; false (and one debug line) when it is not built. */
export function batchAvailable(): boolean {
  if (batchState === 'unknown') {
    const path = process.env.KVMMEM_BATCH_LIB
      ?? fileURLToPath(new URL('../../native/build/libkvmmem_batch.so', import.meta.url));
    if (process.env.KVMMEM_NO_BATCH === '1' || !existsSync(path)) {
      batchState = 'absent';
      debug('native batch helper absent (%s): using the per-call path; run `npm run build:native` with a C compiler to build it', path);
    } else {
      try {
        ffiOpen({ library: BATCH, path });
        const v = load({ library: BATCH, funcName: 'kvmmem_batch_abi_version', retType: I32, paramsType: [], paramsValue: [] }) as number;
        batchState = v >= 1 && v <= 4 ? 'loaded' : 'absent';
        batchAbi = batchState === 'loaded' ? v : 0;
        if (batchState === 'absent') debug('native batch helper at %s has ABI version %d, expected 1 to 4: ignored', path, v);
        else if (v < 4) debug('native batch helper at %s is ABI %d (no SIGBUS guard for guest RAM files): rebuild it with `npm run build:native`', path, v);
        else if (v < 2) debug('native batch helper at %s is ABI 1 (no single remaps): rebuild it with `npm run build:native`', path);
      } catch (e) {
        batchState = 'absent';
        debug('native batch helper at %s failed to load (%s): using the per-call path', path, (e as Error).message);
      }
    }
  }
  return batchState === 'loaded';
}

const bytesOf = (a: ArrayBufferView) => Buffer.from(a.buffer, a.byteOffset, a.byteLength);

/** `count` ioctls with pointer arguments base + i*stride; per-record results. Needs batchAvailable(). */
export function ioctlManyPtr(fd: number, request: number, base: Uint8Array, stride: number, count: number, results: Int32Array): number {
  const st = stager();
  const pb = st.arg(base, 0, stride * count, true);
  const pr = st.arg(results, 0, 4 * count, false);
  if (pb < 0 || pr < 0) {
    return load({ library: BATCH, funcName: 'kvmmem_ioctl_many_ptr', retType: I32,
      paramsType: [I32, U64, U8Array, U64, I32, U8Array],
      paramsValue: [fd, request, bytesOf(base), stride, count, bytesOf(results)] }) as number;
  }
  const ok = load({ library: BATCH, funcName: 'kvmmem_ioctl_many_ptr', retType: I32,
    paramsType: [I32, U64, U64, U64, I32, U64], paramsValue: [fd, request, pb, stride, count, pr] }) as number;
  st.done();
  return ok;
}

/** `count` ioctls with value arguments (little-endian u64s in `values`). Needs batchAvailable(). */
export function ioctlManyVal(fd: number, request: number, values: Uint8Array, count: number, results: Int32Array): number {
  const st = stager();
  const pv = st.arg(values, 0, 8 * count, true, false);
  const pr = st.arg(results, 0, 4 * count, false);
  if (pv < 0 || pr < 0) {
    return load({ library: BATCH, funcName: 'kvmmem_ioctl_many_val', retType: I32,
      paramsType: [I32, U64, U8Array, I32, U8Array],
      paramsValue: [fd, request, bytesOf(values), count, bytesOf(results)] }) as number;
  }
  const ok = load({ library: BATCH, funcName: 'kvmmem_ioctl_many_val', retType: I32,
    paramsType: [I32, U64, U64, I32, U64], paramsValue: [fd, request, pv, count, pr] }) as number;
  st.done();
  return ok;
}

export const REMAP_SHARED = 0, REMAP_FRESH = 1, REMAP_SHARED_RO = 2;
/**
 * Many page remaps in one native call (kind REMAP_SHARED: the file's pages at
 * offs[i] put at addrs[i] with MAP_SHARED|MAP_FIXED, re-locked; REMAP_SHARED_RO: a
 * read-only image, see remapReadOnlyImage (ABI 2); REMAP_FRESH: fresh private zero
 * pages, re-locked).
 * Needs batchAvailable().
 */
export function remapMany(kind: number, addrs: BigUint64Array, lens: BigUint64Array, fd: number, offs: BigInt64Array, count: number, results: Int32Array): number {
  if (kind === REMAP_SHARED_RO && batchAbi < 2) {
    let ok = 0;
    for (let i = 0; i < count; i++) {
      results[i] = remapReadOnlyImage(Number(addrs[i]), Number(lens[i]), fd, Number(offs[i]));
      if (results[i] === 0) ok++;
    }
    return ok;
  }
  const st = stager();
  const pa = st.arg(addrs, 0, 8 * count, true, false);
  const pl = st.arg(lens, 0, 8 * count, true, false);
  const po = st.arg(offs, 0, 8 * count, true, false);
  const pr = st.arg(results, 0, 4 * count, false);
  if (pa < 0 || pl < 0 || po < 0 || pr < 0) {
    return load({ library: BATCH, funcName: 'kvmmem_remap_many', retType: I32,
      paramsType: [I32, U8Array, U8Array, I32, U8Array, I32, U8Array],
      paramsValue: [kind, bytesOf(addrs), bytesOf(lens), fd, bytesOf(offs), count, bytesOf(results)] }) as number;
  }
  const ok = load({ library: BATCH, funcName: 'kvmmem_remap_many', retType: I32,
    paramsType: [I32, U64, U64, I32, U64, I32, U64], paramsValue: [kind, pa, pl, fd, po, count, pr] }) as number;
  st.done();
  return ok;
}

/** Whether remapOne() is one native call (batch helper ABI 2) rather than mmap + mlock. */
export function remapOneNative(): boolean {
  return batchAvailable() && batchAbi >= 2;
}

/**
 * One remap, re-locked (kinds as remapMany): 0 or -errno. One native call with
 * the batch helper (ABI 2), else mmap + mlock through libc.
 */
export function remapOne(kind: number, addr: number, length: number, fd: number, offset: number): number {
  if (batchAbi >= 2 || remapOneNative()) {
    return load({ library: BATCH, funcName: 'kvmmem_remap_one', retType: I32,
      paramsType: [I32, U64, U64, I32, I64], paramsValue: [kind, addr, length, fd, offset] }) as number;
  }
  if (kind === REMAP_SHARED_RO) return remapReadOnlyImage(addr, length, fd, offset);
  const r = kind === REMAP_FRESH
    ? mmapRaw(addr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0)
    : mmapRaw(addr, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, offset);
  return r < 0 ? r : mlockRaw(addr, length);
}

/** What mapOne() found: the page was present (then `remap` holds the remap's 0 or -errno), or not. */
export const MAP_ONE_UNMAPPED = 1, MAP_ONE_ABSENT = 2, MAP_ONE_UNKNOWN = 3;

/** Whether mapOne() is one native call (batch helper ABI 3). */
export function mapOneNative(): boolean {
  return batchAbi >= 3 || (batchState === 'unknown' && batchAvailable() && (batchAbi as number) >= 3);
}

/**
 * The model's single MAP in one native call (batch helper ABI 3): mincore of the
 * page at `addr` (find_vma/follow_page), then, only if a page is present there,
 * remapOne(kind, addr, length, fd, offset). Returns the remap's 0 or -errno when
 * the page was present, else MAP_ONE_UNMAPPED (mincore ENOMEM), MAP_ONE_ABSENT
 * (not resident) or MAP_ONE_UNKNOWN (mincore failed otherwise); in those cases
 * nothing was remapped. Only when mapOneNative(); callers fall back to
 * mincore() then remapOne().
 */
export function mapOne(kind: number, addr: number, length: number, fd: number, offset: number): number {
  return load({ library: BATCH, funcName: 'kvmmem_map_one', retType: I32,
    paramsType: [I32, U64, U64, I32, I64], paramsValue: [kind, addr, length, fd, offset] }) as number;
}

/**
 * Kind flag for remapOne/remapMany/mapOne (kinds REMAP_SHARED and REMAP_SHARED_RO;
 * batch helper ABI 4, see faultGuardAvailable()): the pages are *guarded* until
 * something remaps them: a SIGBUS on one (its file shrank below it) puts a zero
 * page there and is counted in faultState() instead of killing the process.
 */
export const REMAP_GUARD = 0x100;

/** Whether the batch helper guards pages (ABI 4): REMAP_GUARD, faultState(), faultGuarded(). */
export function faultGuardAvailable(): boolean {
  return batchAvailable() && batchAbi >= 4;
}

/** Layout of the helper's struct kvmmem_fault_state (u32 count, ring_size, installed, passed_on; u64 ring[]). */
export const FAULT_STATE = { COUNT: 0, RING_SIZE: 1, INSTALLED: 2, PASSED_ON: 3, RING_BYTE_OFFSET: 16 } as const;
let faultStateCache: Buffer | null = null;

/**
 * A live view of the helper's fault state (needs faultGuardAvailable()): read
 * it after touching guarded pages, no native call needed. The n-th fault's page
 * address is the u64 at RING_BYTE_OFFSET + 8 * ((n - 1) % ring_size).
 */
export function faultState(): Buffer {
  if (faultStateCache === null) {
    const addr = load({ library: BATCH, funcName: 'kvmmem_fault_state', retType: U64, paramsType: [], paramsValue: [] }) as number;
    const head = view(addr, 16);
    const ring = head.readUInt32LE(4 * FAULT_STATE.RING_SIZE);
    faultStateCache = view(addr, FAULT_STATE.RING_BYTE_OFFSET + 8 * ring);
  }
  return faultStateCache;
}

/** Whether the page holding `addr` is guarded now (needs faultGuardAvailable()). */
export function faultGuarded(addr: number): boolean {
  return (load({ library: BATCH, funcName: 'kvmmem_fault_guarded', retType: I32, paramsType: [U64], paramsValue: [addr] }) as number) === 1;
}

/**
 * A read-only memory image goes in as a copy-on-write private mapping: reads see
 * the file live, a write stays local and never reaches the image -- and never
 * faults the process, as a PROT_READ page would. Populated, not locked: mlock of
 * a writable private mapping copies every page at once and ends the liveness.
 */
function remapReadOnlyImage(addr: number, length: number, fd: number, offset: number): number {
  const r = mmapRaw(addr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd, offset);
  if (r < 0) return r;
  load({ library: LIBC, funcName: 'madvise', retType: I32, paramsType: [U64, U64, I32], paramsValue: [addr, length, MADV_POPULATE_READ] });
  return 0;
}

// ---- sockets (vsock transport) ----
// Node cannot drive an AF_VSOCK fd (net.Socket({ fd }) throws ERR_INVALID_FD_TYPE),
// so src/channel does socket I/O on raw fds. Everything here is non-blocking and
// returns -errno (no throw) except socket/bind/listen/getsockname/pipe2, which
// throw SyscallError. The only call that blocks is poll(), run through ffi-rs's
// `runInNewThread` (a libuv thread-pool thread), so the event loop never blocks.
export const AF_UNIX = 1, AF_VSOCK = 40;
export const SOCK_STREAM = 1, SOCK_NONBLOCK = 0o4000, SOCK_CLOEXEC = 0o2000000;
export const O_NONBLOCK = 0o4000;
export const SHUT_RD = 0, SHUT_WR = 1, SHUT_RDWR = 2;
export const VMADDR_CID_ANY = 0xffffffff, VMADDR_CID_LOCAL = 1, VMADDR_CID_HOST = 2, VMADDR_PORT_ANY = 0xffffffff;
export const POLLIN = 0x1, POLLOUT = 0x4, POLLERR = 0x8, POLLHUP = 0x10, POLLNVAL = 0x20;
export const SOCKADDR_VM_SIZE = 16, SOCKADDR_UN_SIZE = 110, POLLFD_SIZE = 8;

/** struct sockaddr_vm { u16 family; u16 reserved1; u32 port; u32 cid; u8 zero[4]; } (16 bytes). */
export function sockaddrVm(port: number, cid: number = VMADDR_CID_ANY): Buffer {
  if (!Number.isInteger(port) || port < 0 || port > 0xffffffff) throw new RangeError(`vsock port must be a u32, got ${String(port)}`);
  if (!Number.isInteger(cid) || cid < 0 || cid > 0xffffffff) throw new RangeError(`vsock cid must be a u32, got ${String(cid)}`);
  const a = Buffer.alloc(SOCKADDR_VM_SIZE);
  a.writeUInt16LE(AF_VSOCK, 0);
  a.writeUInt32LE(port, 4);
  a.writeUInt32LE(cid, 8);
  return a;
}

/** struct sockaddr_un { u16 family; char path[108]; }; the path must fit with its NUL. */
export function sockaddrUn(path: string): Buffer {
  const p = Buffer.from(path, 'utf8');
  if (p.length === 0 || p.length > 107 || p.includes(0)) throw new RangeError(`unix socket path must be 1..107 bytes without NUL, got ${p.length} bytes`);
  const a = Buffer.alloc(SOCKADDR_UN_SIZE);
  a.writeUInt16LE(AF_UNIX, 0);
  p.copy(a, 2);
  return a;
}

/** socket(2); always add SOCK_CLOEXEC. Returns the fd. */
export function socket(domain: number, type: number, protocol = 0): number {
  const r = load({ library: LIBC, funcName: 'socket', retType: I32, paramsType: [I32, I32, I32], paramsValue: [domain, type | SOCK_CLOEXEC, protocol], errno: true }) as Errno<number>;
  if (r.value < 0) {
    fail('socket', r.errnoCode, undefined, r.errnoCode === 97 || r.errnoCode === 93
      ? 'this kernel has no support for that socket family (for vsock: load the vsock/vhost_vsock or vmw_vsock_virtio_transport module)'
      : undefined);
  }
  return r.value;
}

/** bind(2) to an address built by sockaddrVm/sockaddrUn. */
export function bind(fd: number, addr: Buffer): void {
  const r = load({ library: LIBC, funcName: 'bind', retType: I32, paramsType: [I32, U8Array, I32], paramsValue: [fd, addr, addr.length], errno: true }) as Errno<number>;
  if (r.value < 0) fail('bind', r.errnoCode);
}

export function listen(fd: number, backlog: number): void {
  const r = load({ library: LIBC, funcName: 'listen', retType: I32, paramsType: [I32, I32], paramsValue: [fd, backlog], errno: true }) as Errno<number>;
  if (r.value < 0) fail('listen', r.errnoCode);
}

/** getsockname(2) into a buffer of `size` bytes (e.g. SOCKADDR_VM_SIZE). */
export function getsockname(fd: number, size: number): Buffer {
  const addr = Buffer.alloc(size);
  const len = Buffer.alloc(4);
  len.writeUInt32LE(size, 0);
  const r = load({ library: LIBC, funcName: 'getsockname', retType: I32, paramsType: [I32, U8Array, U8Array], paramsValue: [fd, addr, len], errno: true }) as Errno<number>;
  if (r.value < 0) fail('getsockname', r.errnoCode);
  return addr.subarray(0, Math.min(size, len.readUInt32LE(0)));
}

/** accept4(fd, NULL, NULL, flags | SOCK_CLOEXEC): the new fd, or -errno (-EAGAIN on an idle non-blocking listener). */
export function accept4(fd: number, flags = 0): number {
  const r = load({ library: LIBC, funcName: 'accept4', retType: I32, paramsType: [I32, U64, U64, I32], paramsValue: [fd, 0, 0, flags | SOCK_CLOEXEC], errno: true }) as Errno<number>;
  return r.value < 0 ? -r.errnoCode : r.value;
}

/** read(2) into buf[0, len): bytes read (0 = EOF) or -errno. */
export function read(fd: number, buf: Uint8Array, len: number = buf.length): number {
  if (len > buf.length) throw new RangeError(`read: len ${len} exceeds the ${buf.length}-byte buffer`);
  const r = load({ library: LIBC, funcName: 'read', retType: I64, paramsType: [I32, U8Array, U64], paramsValue: [fd, buf, len], errno: true }) as Errno<number>;
  return r.value < 0 ? -r.errnoCode : r.value;
}

/** write(2) of buf[0, len): bytes written or -errno (Node ignores SIGPIPE, so a closed peer gives -EPIPE). */
export function write(fd: number, buf: Uint8Array, len: number = buf.length): number {
  if (len > buf.length) throw new RangeError(`write: len ${len} exceeds the ${buf.length}-byte buffer`);
  const r = load({ library: LIBC, funcName: 'write', retType: I64, paramsType: [I32, U8Array, U64], paramsValue: [fd, buf, len], errno: true }) as Errno<number>;
  return r.value < 0 ? -r.errnoCode : r.value;
}

/** shutdown(2): 0 or -errno. */
export function shutdown(fd: number, how: number): number {
  const r = load({ library: LIBC, funcName: 'shutdown', retType: I32, paramsType: [I32, I32], paramsValue: [fd, how], errno: true }) as Errno<number>;
  return r.value < 0 ? -r.errnoCode : r.value;
}

/** close(2) returning 0 or -errno (for teardown paths that must not throw). */
export function closeRaw(fd: number): number {
  const r = load({ library: LIBC, funcName: 'close', retType: I32, paramsType: [I32], paramsValue: [fd], errno: true }) as Errno<number>;
  return r.value < 0 ? -r.errnoCode : r.value;
}

/** pipe2(2) with O_CLOEXEC | flags: [readFd, writeFd]. */
export function pipe2(flags = 0): [number, number] {
  const fds = Buffer.alloc(8);
  const r = load({ library: LIBC, funcName: 'pipe2', retType: I32, paramsType: [U8Array, I32], paramsValue: [fds, flags | O_CLOEXEC], errno: true }) as Errno<number>;
  if (r.value < 0) fail('pipe2', r.errnoCode);
  return [fds.readInt32LE(0), fds.readInt32LE(4)];
}

/**
 * poll(2) over `nfds` struct pollfd {i32 fd; i16 events; i16 revents} in `fds`,
 * run on a libuv thread-pool thread (ffi-rs runInNewThread): resolves with the
 * number of ready fds or -errno; revents are written into `fds` in place. The
 * caller must keep `fds` referenced and untouched until the promise settles.
 */
export async function poll(fds: Buffer, nfds: number, timeoutMs: number): Promise<number> {
  if (nfds * POLLFD_SIZE > fds.length) throw new RangeError(`poll: ${nfds} pollfds do not fit in ${fds.length} bytes`);
  const r = await load({ library: LIBC, funcName: 'poll', retType: I32, paramsType: [U8Array, U64, I32], paramsValue: [fds, nfds, timeoutMs], errno: true, runInNewThread: true }) as Errno<number>;
  return r.value < 0 ? -r.errnoCode : r.value;
}
