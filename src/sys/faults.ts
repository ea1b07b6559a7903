/**
 * Guest RAM files that shrink while mapped: typed errors instead of SIGBUS.
 *
 * The model host maps pages of guest RAM files it does not control (a QEMU
 * memory-backend-file, a dump). If such a file is truncated below a mapped
 * page, the next access to the page raises SIGBUS, which kills Node. With the
 * batch helper (ABI 4) those pages are *guarded*: the helper's SIGBUS handler
 * puts a zero page there, counts the fault and records its page in a ring that
 * is read here through a live view (no native call). Without the helper, or
 * before a page is mapped, the host checks the file's size (fstat) and refuses
 * the MAP with EFAULT, reporting it here.
 *
 * Readers (scan, PhysicalReader, the CLI) hold a FaultWatch for the VM they
 * read and call check() after every chunk they read, and verify() (an fstat)
 * before reading when the helper does not guard pages: either throws
 * GuestMemoryShrunkError naming the file, its size now and the gpa.
 */
import { debuglog } from 'node:util';
import { ERRNO } from '../abi/errno.js';
import { KvmmemError } from '../errors.js';
import * as libc from './libc.js';

const debug = debuglog('kvmmem');

/** A guest RAM file that shrank under (or before) a mapping. */
export interface GuestMemoryFault {
  /** The VM's uuid (lower case). */
  uuid: string;
  /** The VM's name. */
  vm: string;
  /** The guest RAM file. */
  path: string;
  /** Its size when it was opened, in bytes. */
  fileSize: number;
  /** Its size now, in bytes. */
  size: number;
  /** The guest-physical page that faulted or could not be mapped, when known. */
  gpa?: bigint;
}

/** code 'ERR_GUEST_MEMORY_SHRUNK', errno -EFAULT: the guest's RAM file shrank while it was introspected. */
export class GuestMemoryShrunkError extends KvmmemError {
  readonly fault: GuestMemoryFault;
  constructor(f: GuestMemoryFault, syscall: string) {
    const where = f.gpa === undefined ? '' : `; gpa 0x${f.gpa.toString(16)} is past its end`;
    super(`${syscall}: the guest RAM file ${f.path} of VM ${f.vm} shrank to ${f.size} bytes while mapped (it had ${f.fileSize})${where}`, {
      code: 'ERR_GUEST_MEMORY_SHRUNK', errno: -ERRNO.EFAULT!, syscall, path: f.path,
      hint: 'a guest\'s RAM file must keep its size while it is introspected: find what truncated it (the VM was stopped or resized, the dump rewritten), then open it again',
    });
    this.fault = f;
  }
}

/** What the model host answers about its guest RAM files (see ModelHost). */
export interface FaultSource {
  /** The fault at a guarded introspector page this source mapped, else undefined. */
  resolve(address: number): GuestMemoryFault | undefined;
  /** The VM `uuid` of this source, when its RAM file is smaller now than when it was opened. */
  shrunk(uuid: string): GuestMemoryFault | undefined;
}

// Weak: a host nobody closes must not be kept alive by this registry.
const sources = new Set<WeakRef<FaultSource>>();
const refOf = new WeakMap<FaultSource, WeakRef<FaultSource>>();

export function addFaultSource(s: FaultSource): void {
  if (refOf.has(s)) return;
  const r = new WeakRef(s);
  refOf.set(s, r);
  sources.add(r);
}

export function removeFaultSource(s: FaultSource): void {
  const r = refOf.get(s);
  if (r === undefined) return;
  sources.delete(r);
  refOf.delete(s);
}

function eachSource<T>(fn: (s: FaultSource) => T | undefined): T | undefined {
  for (const r of sources) {
    const s = r.deref();
    if (s === undefined) { sources.delete(r); continue; }
    const v = fn(s);
    if (v !== undefined) return v;
  }
  return undefined;
}

// ---- MAPs the host refused because the file had shrunk ----
const REPORT_RING = 64;
const reports: GuestMemoryFault[] = [];
let reportCount = 0;

/** The host refused a MAP past the end of a shrunk guest RAM file (it answers EFAULT). */
export function reportShrink(f: GuestMemoryFault): void {
  reports[reportCount % REPORT_RING] = f;
  reportCount++;
  debug('guest RAM file %s of VM %s is %d bytes now (was %d): MAP of gpa 0x%s refused', f.path, f.vm, f.size, f.fileSize, f.gpa?.toString(16) ?? '?');
}

// ---- the helper's SIGBUS record ----
let state: Uint32Array | null | undefined;
let ring: BigUint64Array | null = null;

function nativeState(): Uint32Array | null {
  if (state === undefined) {
    if (libc.faultGuardAvailable()) {
      const b = libc.faultState();
      state = new Uint32Array(b.buffer, b.byteOffset, 4);
      ring = new BigUint64Array(b.buffer, b.byteOffset + libc.FAULT_STATE.RING_BYTE_OFFSET, state[libc.FAULT_STATE.RING_SIZE]!);
    } else {
      state = null;
    }
  }
  return state;
}

/** Whether pages of guest RAM files are guarded against SIGBUS (the batch helper, ABI 4). */
export function guarded(): boolean {
  return nativeState() !== null;
}

/** Guarded pages that faulted so far in this process (0 without the helper). */
export function faultCount(): number {
  const s = nativeState();
  return s === null ? 0 : s[libc.FAULT_STATE.COUNT]!;
}

/**
 * Watches one VM's guest RAM for faults from the moment it is made: check()
 * throws GuestMemoryShrunkError for a fault of that VM since the last check.
 * Faults of other VMs are skipped; a fault no host can place (its page was
 * unmapped already, or more faults than the ring holds) is this VM's when its
 * file is smaller now than it was.
 */
export class FaultWatch {
  readonly uuid: string;
  #native: number;
  #reports: number;

  constructor(uuid: string) {
    this.uuid = uuid.toLowerCase();
    this.#native = faultCount();
    this.#reports = reportCount;
  }

  /** Throws if this VM's RAM faulted, or a MAP of it was refused as past the file's end, since the last check. */
  check(syscall: string): void {
    const s = state; // (nativeState() ran in the constructor)
    if (s !== null && s !== undefined && s[0] !== this.#native) this.#checkNative(s[0]!, syscall);
    if (reportCount !== this.#reports) this.#checkReports(syscall);
  }

  /** Throws if this VM's RAM file is smaller now than when it was opened (one fstat per file-backed VM). */
  verify(syscall: string): void {
    const f = eachSource((src) => src.shrunk(this.uuid));
    if (f !== undefined) throw new GuestMemoryShrunkError(f, syscall);
  }

  #checkNative(n: number, syscall: string): void {
    const since = this.#native;
    this.#native = n;
    const r = ring!;
    const count = (n - since) >>> 0;
    let unplaced = count > r.length;
    for (let k = 0; !unplaced && k < count; k++) {
      const page = Number(r[((since + k) >>> 0) % r.length]!);
      const f = eachSource((src) => src.resolve(page));
      debug('guarded page 0x%s faulted (%s)', page.toString(16), f === undefined ? 'no host maps it now' : `VM ${f.vm} gpa 0x${f.gpa?.toString(16)}`);
      if (f === undefined) unplaced = true;
      else if (f.uuid === this.uuid) throw new GuestMemoryShrunkError(f, syscall);
    }
    if (unplaced) this.verify(syscall);
  }

  #checkReports(syscall: string): void {
    const since = this.#reports;
    this.#reports = reportCount;
    if (reportCount - since > REPORT_RING) {
      this.verify(syscall);
      return;
    }
    for (let k = since; k < reportCount; k++) {
      const f = reports[k % REPORT_RING]!;
      if (f.uuid === this.uuid) throw new GuestMemoryShrunkError(f, syscall);
    }
  }
}

/** A FaultWatch for the VM with this uuid. */
export function watch(uuid: string): FaultWatch {
  nativeState();
  return new FaultWatch(uuid);
}
