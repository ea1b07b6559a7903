/**
 * The optional native batch helper (native/batch/kvmmem_batch.c, built by
 * `npm run build:native`): many ioctls or page remaps in one native call, a
 * single remap or MAP in one, and the SIGBUS guard for guest RAM files. Each
 * entry point says which helper ABI it needs; without the helper, or with an
 * older one, the callers take the per-call path.
 */
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { debuglog } from 'node:util';
import { DataType, LIBC, ffiOpen, load } from './ffi.js';
import { MADV_POPULATE_READ, MAP_ANONYMOUS, MAP_FIXED, MAP_PRIVATE, MAP_SHARED, PROT_READ, PROT_WRITE, mlockRaw, mmapRaw, stager, view } from './memory.js';

const { I32, I64, U64, U8Array } = DataType;
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
      debug('native batch helper absent (%s): using the per-call path; build it with a C compiler: `npm rebuild kvmmem` (in a checkout: `npm run build:native`)', path);
    } else {
      try {
        ffiOpen({ library: BATCH, path });
        const v = load({ library: BATCH, funcName: 'kvmmem_batch_abi_version', retType: I32, paramsType: [], paramsValue: [] }) as number;
        batchState = v >= 1 && v <= 4 ? 'loaded' : 'absent';
        batchAbi = batchState === 'loaded' ? v : 0;
        if (batchState === 'absent') debug('native batch helper at %s has ABI version %d, expected 1 to 4: ignored', path, v);
        else if (v < 2) debug('native batch helper at %s is ABI 1 (no single remaps): rebuild it: `npm rebuild kvmmem` (in a checkout: `npm run build:native`)', path);
        else if (v < 4) debug('native batch helper at %s is ABI %d (no SIGBUS guard for guest RAM files): rebuild it: `npm rebuild kvmmem` (in a checkout: `npm run build:native`)', path, v);
      } catch (e) {
        batchState = 'absent';
        debug('native batch helper at %s failed to load (%s): using the per-call path', path, (e as Error).message);
      }
    }
  }
  return batchState === 'loaded';
}

const bytesOf = (a: ArrayBufferView) => Buffer.from(a.buffer, a.byteOffset, a.byteLength);

/** `count` ioctls with pointer arguments base + i*stride: results[i] = the i-th result or -errno; returns how many succeeded. Needs batchAvailable(). */
export function ioctlManyPtrRaw(fd: number, request: number, base: Uint8Array, stride: number, count: number, results: Int32Array): number {
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

/** `count` ioctls with value arguments (little-endian u64s in `values`), results as ioctlManyPtrRaw. Needs batchAvailable(). */
export function ioctlManyValRaw(fd: number, request: number, values: Uint8Array, count: number, results: Int32Array): number {
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
 * read-only image, see remapReadOnlyImageRaw (ABI 2); REMAP_FRESH: fresh private zero
 * pages, re-locked).
 * Needs batchAvailable().
 */
export function remapManyRaw(kind: number, addrs: BigUint64Array, lens: BigUint64Array, fd: number, offs: BigInt64Array, count: number, results: Int32Array): number {
  if (kind === REMAP_SHARED_RO && batchAbi < 2) {
    let ok = 0;
    for (let i = 0; i < count; i++) {
      results[i] = remapReadOnlyImageRaw(Number(addrs[i]), Number(lens[i]), fd, Number(offs[i]));
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

/** Whether remapOneRaw() is one native call (batch helper ABI 2) rather than mmap + mlock. */
export function remapOneNative(): boolean {
  return batchAvailable() && batchAbi >= 2;
}

/**
 * One remap, re-locked (kinds as remapManyRaw): 0 or -errno. One native call with
 * the batch helper (ABI 2), else mmap + mlock through libc.
 */
export function remapOneRaw(kind: number, addr: number, length: number, fd: number, offset: number): number {
  if (batchAbi >= 2 || remapOneNative()) {
    return load({ library: BATCH, funcName: 'kvmmem_remap_one', retType: I32,
      paramsType: [I32, U64, U64, I32, I64], paramsValue: [kind, addr, length, fd, offset] }) as number;
  }
  if (kind === REMAP_SHARED_RO) return remapReadOnlyImageRaw(addr, length, fd, offset);
  const r = kind === REMAP_FRESH
    ? mmapRaw(addr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0)
    : mmapRaw(addr, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, offset);
  return r < 0 ? r : mlockRaw(addr, length);
}

/** What mapOneRaw() found: the page was present (then `remap` holds the remap's 0 or -errno), or not. */
export const MAP_ONE_UNMAPPED = 1, MAP_ONE_ABSENT = 2, MAP_ONE_UNKNOWN = 3;

/** Whether mapOneRaw() is one native call (batch helper ABI 3). */
export function mapOneNative(): boolean {
  return batchAbi >= 3 || (batchState === 'unknown' && batchAvailable() && (batchAbi as number) >= 3);
}

/**
 * The model's single MAP in one native call (batch helper ABI 3): mincore of the
 * page at `addr` (find_vma/follow_page), then, only if a page is present there,
 * remapOneRaw(kind, addr, length, fd, offset). Returns the remap's 0 or -errno when
 * the page was present, else MAP_ONE_UNMAPPED (mincore ENOMEM), MAP_ONE_ABSENT
 * (not resident) or MAP_ONE_UNKNOWN (mincore failed otherwise); in those cases
 * nothing was remapped. Only when mapOneNative(); callers fall back to
 * mincore() then remapOneRaw().
 */
export function mapOneRaw(kind: number, addr: number, length: number, fd: number, offset: number): number {
  return load({ library: BATCH, funcName: 'kvmmem_map_one', retType: I32,
    paramsType: [I32, U64, U64, I32, I64], paramsValue: [kind, addr, length, fd, offset] }) as number;
}

/**
 * Kind flag for remapOneRaw/remapManyRaw/mapOneRaw (kinds REMAP_SHARED and REMAP_SHARED_RO;
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
function remapReadOnlyImageRaw(addr: number, length: number, fd: number, offset: number): number {
  const r = mmapRaw(addr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd, offset);
  if (r < 0) return r;
  load({ library: LIBC, funcName: 'madvise', retType: I32, paramsType: [U64, U64, I32], paramsValue: [addr, length, MADV_POPULATE_READ] });
  return 0;
}

