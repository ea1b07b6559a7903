/**
 * Memory through libc: mappings (mmap, mlock, madvise, mincore...), live views
 * of native memory, and passing JS memory to native calls by address. Also the
 * self-check that runs before the first view or ioctl.
 */
import { ERRNO } from '../abi/errno.js';
import { SyscallError, UsageError } from '../errors.js';
import { DataType, LIBC, createExternalBuffer, errnoLive, errnoView, externalAt, fail, load, setErrnoLive, type Errno } from './ffi.js';

const { I32, I64, U64, U8Array, Void } = DataType;

// ---- constants (Linux x86-64) ----
export const PROT_NONE = 0, PROT_READ = 1, PROT_WRITE = 2;
export const MAP_SHARED = 0x01, MAP_PRIVATE = 0x02, MAP_FIXED = 0x10, MAP_ANONYMOUS = 0x20,
  MAP_NORESERVE = 0x4000, MAP_POPULATE = 0x8000, MAP_LOCKED = 0x2000;
export const MADV_DONTNEED = 4, MADV_POPULATE_READ = 22, MADV_POPULATE_WRITE = 23;
const _SC_PAGESIZE = 30;
const ENOMEM = ERRNO.ENOMEM!;
/** Node Buffers (and ffi-rs external views) are at most this long. */
export const MAX_VIEW_BYTES = 2 ** 32;

let pageSizeCache = 0;
export function pageSize(): number {
  if (pageSizeCache === 0) {
    pageSizeCache = load({ library: LIBC, funcName: 'sysconf', retType: I64, paramsType: [I32], paramsValue: [_SC_PAGESIZE] }) as number;
  }
  return pageSizeCache;
}

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
/** @internal The (non-reentrant) stager, reset for one call. Only synchronous calls may use it. */
export function stager(): Stager {
  if (stagerInstance === null) {
    const a = load({ library: LIBC, funcName: 'mmap', retType: I64, paramsType: [U64, U64, I32, I32, I32, I64], paramsValue: [0, ARENA_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0] }) as number;
    if (a === -1) throw new SyscallError(12, 'mmap', { hint: 'could not map the 1 MiB scratch arena for native calls' });
    stagerInstance = new Stager(a, view(a, ARENA_BYTES));
  }
  return stagerInstance.reset();
}

/** @internal The address of `v` if its ArrayBuffer is pinned, else -1. */
export function pinnedAddress(v: ArrayBufferView): number {
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
 * mincore(2): one byte per page into `vec`, bit 0 = resident. Returns false
 * when part of the range is not mapped at all (ENOMEM: an answer here, not a
 * failure: the model driver's find_vma()), true when it is; any other errno
 * throws.
 */
export function mincore(addr: number, length: number, vec: Uint8Array): boolean {
  if (errnoLive) {
    const need = Math.ceil(length / pageSize());
    const st = stager();
    const p = need <= vec.byteLength ? st.arg(vec, 0, need, false) : -1;
    if (p >= 0) {
      const v = load({ library: LIBC, funcName: 'mincore', retType: I32, paramsType: [U64, U64, U64], paramsValue: [addr, length, p] }) as number;
      if (v < 0) {
        const e = errnoView[0]!;
        if (e === ENOMEM) return false;
        fail('mincore', e);
      }
      st.done();
      return true;
    }
  }
  const r = load({ library: LIBC, funcName: 'mincore', retType: I32, paramsType: [U64, U64, U8Array], paramsValue: [addr, length, vec], errno: true }) as Errno<number>;
  if (r.value < 0) {
    if (r.errnoCode === ENOMEM) return false;
    fail('mincore', r.errnoCode);
  }
  return true;
}

/**
 * `len` bytes (1..64 KiB) at `addr` of this process, read with
 * process_vm_readv(getpid()): the kernel copies as copy_from_user() would,
 * honouring protections (a PROT_NONE or unmapped byte is -EFAULT, never a
 * fault; /proc/self/mem would read PROT_NONE pages). The bytes, or -errno.
 */
export function readSelfRaw(addr: number, len: number): Buffer | number {
  if (!Number.isSafeInteger(len) || len <= 0 || len > 65536) throw new UsageError(`readSelfRaw: length ${len} is outside 1..65536`);
  const out = Buffer.alloc(len);
  const iov = Buffer.alloc(32); // struct iovec local, remote { void *base; size_t len; }
  const st = stager();
  const local = st.arg(out, 0, len, false);
  const iovAt = st.arg(iov, 0, 32, true, false);
  if (local < 0 || iovAt < 0) throw new UsageError('readSelfRaw: no room in the scratch arena');
  // The iovecs are staged already: write them into the arena copy.
  const arena = view(iovAt, 32);
  arena.writeBigUInt64LE(BigInt(local), 0);
  arena.writeBigUInt64LE(BigInt(len), 8);
  arena.writeBigUInt64LE(BigInt(addr), 16);
  arena.writeBigUInt64LE(BigInt(len), 24);
  const r = load({ library: LIBC, funcName: 'process_vm_readv', retType: I64, paramsType: [I32, U64, U64, U64, U64, U64], paramsValue: [process.pid, iovAt, 1, iovAt + 16, 1, 0], errno: true }) as Errno<number>;
  if (r.value < 0) { st.reset(); return -r.errnoCode; }
  st.done();
  return r.value === len ? out : -ERRNO.EFAULT!;
}

// ---- live views ----
/**
 * A live, zero-copy Buffer over native memory at `addr`. Garbage collection of
 * the Buffer never unmaps anything: the caller owns the memory's lifetime.
 */
export function view(addr: number, length: number): Buffer {
  if (!Number.isSafeInteger(addr) || addr <= 0) throw new UsageError(`view: bad address ${addr}`);
  if (!Number.isSafeInteger(length) || length <= 0 || length > MAX_VIEW_BYTES) {
    throw new UsageError(`view: length ${length} is outside 1..${MAX_VIEW_BYTES} (a single view is at most 4 GiB)`);
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
    // errno through the live view: a failing call must leave its errno there (close(-1): EBADF, 9).
    errnoView[0] = 0;
    load({ library: LIBC, funcName: 'close', retType: I32, paramsType: [I32], paramsValue: [-1] });
    setErrnoLive(errnoView[0] === 9);
  } finally {
    munmap(addr, len);
  }
}
// Run on first use (the first view or ioctl), not on import: importing kvmmem
// costs no native calls, and a runtime without live views fails where views are needed.
/** @internal The self-check's outcome: not run yet (false), passed (true), or the error it failed with. */
export let checked: true | Error | false = false;
/** @internal Runs the self-check once; throws its error (again) if it failed. */
export function selfChecked(): void {
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
