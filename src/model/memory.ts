/**
 * Guest-physical memory of an introspected VM, as the model host sees it: a
 * file descriptor (a memfd for anonymous VMs, or an existing file: a raw
 * memory image or a live QEMU `memory-backend-file,share=on`) plus a list of
 * regions mapping guest-physical ranges to file offsets. Ranges that no region
 * covers are holes (the VGA/BIOS hole 0xA0000-0xFFFFF, the PCI hole below
 * 4 GiB): the host answers -EFAULT for them, like a gpa without a memslot.
 *
 * Addresses are bigint (gpa); file offsets handed to src/sys are JS numbers.
 */
import * as fs from 'node:fs';
import * as libc from '../sys/libc.js';
import { recordFd, release, type LedgerEntry } from '../sys/thread.js';
import { PAGE_SIZE } from '../abi/structs.js';
import { hex } from '../abi/errors.js';
import { UsageError } from '../errors.js';

const PAGE = BigInt(PAGE_SIZE);
const FOUR_GIB = 0x1_0000_0000n;

/** One contiguous guest-physical range backed by `size` bytes of the file at `fileOffset`. */
export interface MemoryRegion {
  readonly gpa: bigint;
  readonly size: bigint;
  readonly fileOffset: bigint;
}

/** What a gpa resolves to: where its bytes live. */
export interface ResolvedGpa {
  fd: number;
  /** File offset of the gpa (a JS number: files here are < 2^53 bytes). */
  offset: number;
  /** false for read-only images: the host maps them copy-on-write (see docs/driver-model.md). */
  writable: boolean;
  region: MemoryRegion;
}

export interface PcLayoutOptions {
  /** 'q35' (default; what the live target uses) or 'pc' (i440fx). Decides where RAM stops below 4 GiB. */
  machine?: 'q35' | 'pc';
  /** Leave out 0xA0000-0xFFFFF (VGA window + option/BIOS ROMs). Default true. */
  vgaHole?: boolean;
}

export interface AnonymousOptions {
  /** memfd name (shows in /proc/PID/maps); default 'kvmmem-guest'. */
  name?: string;
  /** Regions over the memfd; default one region: gpa 0 .. bytes. */
  regions?: readonly MemoryRegion[];
}

export interface FromFileOptions {
  /** Open read-only (a dump you do not want changed). Default false (read-write). */
  readOnly?: boolean;
  /** Regions over the file; default one region: gpa 0 .. file size. */
  regions?: readonly MemoryRegion[];
  /** Display name; default the file's path. */
  name?: string;
}

function toBig(what: string, v: bigint | number): bigint {
  if (typeof v === 'bigint') return v;
  if (typeof v === 'number' && Number.isSafeInteger(v)) return BigInt(v);
  throw new UsageError(`${what} must be a bigint or a safe integer, got ${String(v)}`);
}


export class GuestMemory {
  readonly name: string;
  /** The backing file's path, or undefined for an anonymous (memfd) VM. */
  readonly path: string | undefined;
  readonly writable: boolean;
  /** Size of the backing file in bytes (when the memory was opened). */
  readonly fileSize: bigint;
  /**
   * The backing file can shrink under a mapping (an existing file: someone may
   * truncate it). false for anonymous memory: its memfd is sealed against
   * shrinking and growing (a guest's RAM never changes size), so ftruncate fails
   * with EPERM.
   */
  readonly mayShrink: boolean;
  /** Sorted by gpa, non-overlapping, page-aligned. */
  readonly regions: readonly MemoryRegion[];
  #fd: number;
  /** The fd's entry in the thread ledger: closed for us if this thread is terminated. */
  readonly #ledger: LedgerEntry;
  /** _offsetOfPage(): the regions as numbers (built on first use), and the last region hit. */
  #numRegions: Float64Array | null | undefined;
  #lastRegion = 0;
  /** _sizeAt(): the size fstat saw for the stamp. */
  #sizeStamp = -1;
  #sizeSeen = 0;

  private constructor(name: string, path: string | undefined, fd: number, fileSize: bigint, writable: boolean, regions: readonly MemoryRegion[] | undefined) {
    this.name = name;
    this.path = path;
    this.#fd = fd;
    this.#ledger = recordFd(fd);
    this.fileSize = fileSize;
    this.writable = writable;
    this.mayShrink = path !== undefined;
    try {
      this.regions = GuestMemory.#checkRegions(regions ?? [{ gpa: 0n, size: fileSize, fileOffset: 0n }], fileSize);
    } catch (e) {
      this.close();
      throw e;
    }
  }

  /** An anonymous VM of `bytes` bytes (a page multiple): a memfd, so it can be mapped MAP_SHARED. */
  static anonymous(bytes: bigint | number, opts: AnonymousOptions = {}): GuestMemory {
    const size = toBig('bytes', bytes);
    if (size <= 0n || size % PAGE !== 0n) throw new UsageError(`GuestMemory.anonymous: ${size} bytes is not a positive multiple of the page size ${PAGE_SIZE}`);
    const name = opts.name ?? 'kvmmem-guest';
    const fd = libc.memfdCreate(name, libc.MFD_ALLOW_SEALING);
    try {
      libc.ftruncate(fd, Number(size));
      // A page mapped past a shrunk file's end would SIGBUS the introspector: the size is fixed.
      libc.fcntl(fd, libc.F_ADD_SEALS, libc.F_SEAL_SHRINK | libc.F_SEAL_GROW | libc.F_SEAL_SEAL);
    } catch (e) {
      fs.closeSync(fd);
      throw e;
    }
    return new GuestMemory(name, undefined, fd, size, true, opts.regions);
  }

  /**
   * A VM over an existing file: a raw memory image, or the `mem-path` of a
   * running QEMU started with `memory-backend-file,share=on` (then the view is
   * live: what the guest writes, an introspector page mapped onto it shows).
   */
  static fromFile(path: string, opts: FromFileOptions = {}): GuestMemory {
    const readOnly = opts.readOnly ?? false;
    const fd = fs.openSync(path, readOnly ? 'r' : 'r+');
    let size: bigint;
    try {
      size = BigInt(fs.fstatSync(fd).size);
    } catch (e) {
      fs.closeSync(fd);
      throw e;
    }
    return new GuestMemory(opts.name ?? path, path, fd, size, !readOnly, opts.regions);
  }

  /**
   * Regions of a QEMU x86 PC whose RAM (`ramBytes`, as `-m`) is one linear
   * memory backend: RAM below the PCI hole at file offset = gpa (minus the VGA
   * hole), the rest above 4 GiB continuing in the file. QEMU's default
   * split: q35 keeps 2 GiB low when RAM >= 2.75 GiB, pc keeps 3 GiB low when
   * RAM >= 3.5 GiB (gigabyte-aligned); otherwise all RAM sits below 4 GiB.
   */
  static pcLayout(ramBytes: bigint | number, opts: PcLayoutOptions = {}): MemoryRegion[] {
    const ram = toBig('ramBytes', ramBytes);
    if (ram <= 0n || ram % PAGE !== 0n) throw new UsageError(`pcLayout: RAM size ${ram} is not a positive multiple of ${PAGE_SIZE}`);
    const machine = opts.machine ?? 'q35';
    const [threshold, lowIfAbove] = machine === 'q35' ? [0xb000_0000n, 0x8000_0000n] : [0xe000_0000n, 0xc000_0000n];
    const low = ram >= threshold ? lowIfAbove : ram;
    const out: MemoryRegion[] = [];
    if (opts.vgaHole ?? true) {
      if (low <= 0xa0000n) {
        out.push({ gpa: 0n, size: low, fileOffset: 0n });
      } else {
        out.push({ gpa: 0n, size: 0xa0000n, fileOffset: 0n });
        if (low > 0x100000n) out.push({ gpa: 0x100000n, size: low - 0x100000n, fileOffset: 0x100000n });
      }
    } else {
      out.push({ gpa: 0n, size: low, fileOffset: 0n });
    }
    if (ram > low) out.push({ gpa: FOUR_GIB, size: ram - low, fileOffset: low });
    return out;
  }

  static #checkRegions(regions: readonly MemoryRegion[], fileSize: bigint): MemoryRegion[] {
    const out = regions.map((r, i) => {
      const gpa = toBig(`regions[${i}].gpa`, r.gpa);
      const size = toBig(`regions[${i}].size`, r.size);
      const fileOffset = toBig(`regions[${i}].fileOffset`, r.fileOffset);
      if (gpa < 0n || size <= 0n || fileOffset < 0n || gpa % PAGE || size % PAGE || fileOffset % PAGE) {
        throw new UsageError(`regions[${i}] (gpa ${hex(gpa)}, size ${hex(size)}, file offset ${hex(fileOffset)}) must be page-aligned with a positive size`);
      }
      if (fileOffset + size > fileSize) {
        throw new UsageError(`regions[${i}] reaches file offset ${hex(fileOffset + size)}, past the end of the ${hex(fileSize)}-byte backing file`);
      }
      return Object.freeze({ gpa, size, fileOffset });
    }).sort((a, b) => (a.gpa < b.gpa ? -1 : a.gpa > b.gpa ? 1 : 0));
    for (let i = 1; i < out.length; i++) {
      if (out[i - 1]!.gpa + out[i - 1]!.size > out[i]!.gpa) throw new UsageError(`regions overlap at gpa ${hex(out[i]!.gpa)}`);
    }
    if (out.length === 0) throw new UsageError('a VM needs at least one memory region');
    return Object.freeze(out) as MemoryRegion[];
  }

  /**
   * The backing file's size now, in bytes (fstat; -1 once closed). Equal to
   * fileSize unless the file was truncated (or grown) after it was opened.
   */
  currentFileSize(): number {
    if (this.#fd < 0) return -1;
    return fs.fstatSync(this.#fd).size;
  }

  /**
   * @internal currentFileSize(), fstat'ed once per `stamp` (a batch of the
   * model host); stamp -1: always fstat. -1 once closed.
   */
  _sizeAt(stamp: number): number {
    if (stamp >= 0 && stamp === this.#sizeStamp) return this.#sizeSeen;
    const size = this.currentFileSize();
    this.#sizeStamp = stamp;
    this.#sizeSeen = size;
    return size;
  }

  /** The backing fd (-1 once closed). */
  get fd(): number { return this.#fd; }
  get closed(): boolean { return this.#fd < 0; }

  /** Bytes of guest RAM (sum of the regions). */
  get size(): bigint {
    let s = 0n;
    for (const r of this.regions) s += r.size;
    return s;
  }

  /** One past the highest guest-physical address with RAM. */
  get end(): bigint {
    const last = this.regions[this.regions.length - 1]!;
    return last.gpa + last.size;
  }

  /** The region holding `gpa`, or undefined (a hole or beyond the end). */
  regionOf(gpa: bigint): MemoryRegion | undefined {
    const rs = this.regions;
    let lo = 0, hi = rs.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const r = rs[mid]!;
      if (gpa < r.gpa) hi = mid - 1;
      else if (gpa >= r.gpa + r.size) lo = mid + 1;
      else return r;
    }
    return undefined;
  }

  /**
   * gpa -> (fd, offset) for `len` bytes that must lie in one region; null for
   * a hole, a range running off its region, or a closed memory.
   */
  resolve(gpa: bigint, len: number | bigint = 1): ResolvedGpa | null {
    if (this.#fd < 0 || typeof gpa !== 'bigint' || gpa < 0n) return null;
    const n = BigInt(len);
    if (n <= 0n) return null;
    const r = this.regionOf(gpa);
    if (r === undefined || gpa + n > r.gpa + r.size) return null;
    return { fd: this.#fd, offset: Number(r.fileOffset + (gpa - r.gpa)), writable: this.writable, region: r };
  }

  /**
   * @internal resolve(gpaPage, PAGE_SIZE) for a page-aligned gpa given as a
   * number: the file offset of the page, or -1 where resolve() answers null
   * (a hole, beyond the end, or closed). No bigint, no object per call.
   */
  _offsetOfPage(gpaPage: number): number {
    if (this.#fd < 0 || !(gpaPage >= 0)) return -1;
    let t = this.#numRegions;
    if (t === undefined) t = this.#numRegions = GuestMemory.#numeric(this.regions);
    if (t === null) return -2; // regions past 2^53: the caller takes the bigint path
    const last = this.#lastRegion;
    if (gpaPage >= t[last]! && gpaPage + PAGE_SIZE <= t[last]! + t[last + 1]!) return t[last + 2]! + (gpaPage - t[last]!);
    for (let i = 0; i < t.length; i += 3) {
      if (gpaPage >= t[i]! && gpaPage + PAGE_SIZE <= t[i]! + t[i + 1]!) {
        this.#lastRegion = i;
        return t[i + 2]! + (gpaPage - t[i]!);
      }
    }
    return -1;
  }

  /** The regions as (gpa, size, fileOffset) numbers, or null when one is not exact as a number. */
  static #numeric(regions: readonly MemoryRegion[]): Float64Array | null {
    const t = new Float64Array(regions.length * 3);
    const MAX = BigInt(Number.MAX_SAFE_INTEGER);
    for (let i = 0; i < regions.length; i++) {
      const r = regions[i]!;
      if (r.gpa + r.size > MAX || r.fileOffset + r.size > MAX) return null;
      t[3 * i] = Number(r.gpa);
      t[3 * i + 1] = Number(r.size);
      t[3 * i + 2] = Number(r.fileOffset);
    }
    return t;
  }

  /** Reads guest-physical memory (may cross adjacent regions; a hole throws UsageError). */
  read(gpa: bigint, len: number): Buffer {
    const out = Buffer.alloc(len);
    this.#pieces(gpa, len, (fd, off, at, n) => {
      const got = fs.readSync(fd, out, at, n, off);
      if (got < n) out.fill(0, at + got, at + n); // sparse tail past EOF reads as zeros
    });
    return out;
  }

  /** Writes guest-physical memory (the guest "storing"); read-only memory throws. */
  write(gpa: bigint, bytes: Uint8Array): void {
    if (!this.writable) throw new UsageError(`GuestMemory ${this.name} is read-only`);
    this.#pieces(gpa, bytes.length, (fd, off, at, n) => {
      let done = 0;
      while (done < n) done += fs.writeSync(fd, bytes, at + done, n - done, off + done);
    });
  }

  #pieces(gpa: bigint, len: number, fn: (fd: number, fileOffset: number, at: number, n: number) => void): void {
    if (this.#fd < 0) throw new UsageError(`GuestMemory ${this.name} is closed`);
    if (typeof gpa !== 'bigint' || gpa < 0n) throw new UsageError(`gpa must be a non-negative bigint, got ${String(gpa)}`);
    let at = 0;
    while (at < len) {
      const cur = gpa + BigInt(at);
      const r = this.regionOf(cur);
      if (r === undefined) throw new UsageError(`gpa ${hex(cur)} of VM ${this.name} is not RAM (hole or beyond ${hex(this.end)})`);
      const n = Math.min(len - at, Number(r.gpa + r.size - cur));
      fn(this.#fd, Number(r.fileOffset + (cur - r.gpa)), at, n);
      at += n;
    }
  }

  /**
   * Closes the fd. Pages already mapped into an introspector stay valid (a
   * mapping holds its own reference); new MAPs of this memory get -EFAULT.
   */
  close(): void {
    if (this.#fd < 0) return;
    const fd = this.#fd;
    this.#fd = -1;
    release(this.#ledger); // before the close: a reaper must never close a reused fd number
    fs.closeSync(fd);
  }
}
